// The fit family's front: exp_error, exp_fit (SPEC section 2) and the
// CPU-only batch forms exp_errors and exp_fits. Each entry validates every
// argument (checks.h), builds the candidate tables and runs the plan on its
// device (common/plan.h); the kernels are in cpu.cpp (the exact sorted-
// magnitude error, the base searches) and cuda.cu (the device sort; the fit
// itself runs on the CPU) beside this file.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "common/plan.h"

namespace dnateq {

struct ErrorPlan {
  c10::Device device{at::kCPU};
  at::Tensor x;
  ExpTables t;
};
// The exact RMAE; raises on non-finite x (the message names x).
double run_cpu(const ErrorPlan& p);
double run_cuda(const ErrorPlan& p);

struct FitPlan {
  c10::Device device{at::kCPU};
  at::Tensor x;
  int64_t bits = 0;
  bool paper = false;  // search="paper", else "golden"
  Rounding rounding = Rounding::kNearest;
  c10::optional<double> alpha;
};
std::tuple<double, double, double, double> run_cpu(const FitPlan& p);
std::tuple<double, double, double, double> run_cuda(const FitPlan& p);

// CPU only (registered for the CPU; ops.py copies a CUDA x for exp_fits).
struct ErrorsPlan {
  c10::Device device{at::kCPU};
  at::Tensor x;
  std::vector<ExpTables> tables;  // one per candidate
};
at::Tensor run_cpu(const ErrorsPlan& p);

struct FitsPlan {
  c10::Device device{at::kCPU};
  at::Tensor x;
  std::vector<int64_t> bits;
  bool paper = false;
  Rounding rounding = Rounding::kNearest;
  std::vector<double> alpha;  // empty: searched
};
at::Tensor run_cpu(const FitsPlan& p);

inline void check_search(c10::string_view search) {
  TORCH_CHECK(search == "golden" || search == "paper",
              "dnateq: search must be \"golden\" or \"paper\", got \"", std::string(search),
              "\"");
}

inline double exp_error(const at::Tensor& x, double alpha, double scale, double offset,
                        int64_t bits, c10::string_view rounding = "nearest") {
  ErrorPlan p;
  make_checked_tables(p.t, alpha, scale, offset, bits, parse_rounding(rounding), "scale",
                      "offset");
  check_float_input(x, "x");
  p.device = x.device();
  p.x = x;
  return run(p);
}

inline std::tuple<double, double, double, double> exp_fit(
    const at::Tensor& x, int64_t bits, c10::string_view search = "golden",
    c10::string_view rounding = "nearest", c10::optional<double> alpha = c10::nullopt) {
  FitPlan p;
  check_bits(bits);
  p.rounding = parse_rounding(rounding);
  check_search(search);
  if (alpha.has_value()) check_alpha(*alpha);
  check_float_input(x, "x");
  p.device = x.device();
  p.x = x;
  p.bits = bits;
  p.paper = search == "paper";
  p.alpha = alpha;
  return run(p);
}

inline at::Tensor exp_errors(const at::Tensor& x, at::ArrayRef<double> alpha,
                             at::ArrayRef<double> scale, at::ArrayRef<double> offset,
                             int64_t bits, c10::string_view rounding = "nearest") {
  TORCH_CHECK(alpha.size() == scale.size() && alpha.size() == offset.size(),
              "dnateq: alpha, scale and offset must have the same length, got ",
              alpha.size(), ", ", scale.size(), ", ", offset.size());
  const Rounding r = parse_rounding(rounding);
  ErrorsPlan p;
  p.tables.resize(alpha.size());
  for (size_t i = 0; i < alpha.size(); ++i) {
    make_checked_tables(p.tables[i], alpha[i], scale[i], offset[i], bits, r, "scale",
                        "offset");
  }
  check_float_input(x, "x");
  p.device = x.device();
  p.x = x;
  return run_cpu(p);
}

inline at::Tensor exp_fits(const at::Tensor& x, at::IntArrayRef bits,
                           c10::string_view search = "golden",
                           c10::string_view rounding = "nearest",
                           c10::optional<at::ArrayRef<double>> alpha = c10::nullopt) {
  TORCH_CHECK(!bits.empty(), "dnateq: bits must list at least one bit width");
  for (const int64_t b : bits) check_bits(b);
  FitsPlan p;
  p.rounding = parse_rounding(rounding);
  check_search(search);
  if (alpha.has_value()) {
    TORCH_CHECK(alpha->size() == bits.size(),
                "dnateq: alpha must have one value per bit width, got ", alpha->size(),
                " values for ", bits.size(), " bit widths");
    for (const double a : *alpha) check_alpha(a);
    p.alpha.assign(alpha->begin(), alpha->end());
  }
  check_float_input(x, "x");
  p.device = x.device();
  p.x = x;
  p.bits.assign(bits.begin(), bits.end());
  p.paper = search == "paper";
  return run_cpu(p);
}

}  // namespace dnateq
