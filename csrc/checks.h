// Argument validation shared by every backend. Messages name the argument,
// what was expected and what was given (SPEC section 5).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>
#include <utility>

#include "format.h"

namespace dnateq {

inline void check_bits(int64_t bits, const char* name = "bits") {
  TORCH_CHECK(bits >= kMinBits && bits <= kMaxBits, "dnateq: ", name,
              " must be in [", kMinBits, ", ", kMaxBits, "], got ", bits);
}

inline void check_alpha(double alpha, const char* name = "alpha") {
  TORCH_CHECK(std::isfinite(alpha) && alpha > 1.0, "dnateq: ", name,
              " must be a finite base > 1, got ", alpha);
}

inline void check_scale(double scale, const char* name = "scale") {
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, "dnateq: ", name,
              " must be finite and > 0, got ", scale);
}

inline void check_offset(double offset, const char* name = "offset") {
  TORCH_CHECK(std::isfinite(offset), "dnateq: ", name,
              " must be finite, got ", offset);
}

inline Rounding parse_rounding(c10::string_view r) {
  if (r == "log") return Rounding::kLog;
  if (r == "nearest") return Rounding::kNearest;
  TORCH_CHECK(false, "dnateq: rounding must be \"log\" or \"nearest\", got \"",
              std::string(r), "\"");
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(is_supported_float(x.scalar_type()), "dnateq: ", name,
              " must be float32, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_codes(const at::Tensor& c, const char* name) {
  TORCH_CHECK(c.scalar_type() == at::kChar, "dnateq: ", name,
              " must be int8 codes, got ", c.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an,
                              const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "dnateq: ", an, " and ", bn,
              " must be on the same device, got ", a.device(), " and ",
              b.device());
}

inline void check_counter_bits(const c10::optional<int64_t>& cb) {
  if (cb.has_value()) {
    TORCH_CHECK(*cb >= 2 && *cb <= 32,
                "dnateq: counter_bits must be in [2, 32] or None, got ", *cb);
  }
}

// Validates a conv2d's geometry (input [N, C, H, W], weight shape
// [O, C/groups, kh, kw]) and returns the output size (Ho, Wo).
inline std::pair<int64_t, int64_t> check_conv_geometry(
    at::IntArrayRef in, at::IntArrayRef w, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const char* in_name, const char* w_name) {
  TORCH_CHECK(in.size() == 4, "dnateq: ", in_name,
              " must be 4-D [N, C, H, W], got shape ", in);
  TORCH_CHECK(w.size() == 4, "dnateq: ", w_name,
              " must be 4-D [O, C/groups, kh, kw], got shape ", w);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "dnateq: stride, padding and dilation must have 2 elements");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0,
              "dnateq: stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0,
              "dnateq: dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0,
              "dnateq: padding must be non-negative, got ", padding);
  TORCH_CHECK(groups > 0, "dnateq: groups must be positive, got ", groups);
  for (int64_t s : w) {
    TORCH_CHECK(s >= 0, "dnateq: ", w_name, " must be non-negative, got ", w);
  }
  TORCH_CHECK(in[1] % groups == 0 && w[0] % groups == 0 && w[1] * groups == in[1],
              "dnateq: ", w_name, " ", w, " does not match ", in_name,
              " channels ", in[1], " with groups=", groups);
  const int64_t Ho =
      (in[2] + 2 * padding[0] - dilation[0] * (w[2] - 1) - 1) / stride[0] + 1;
  const int64_t Wo =
      (in[3] + 2 * padding[1] - dilation[1] * (w[3] - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "dnateq: ", in_name, " spatial size (", in[2],
              ", ", in[3], ") is too small for kernel (", w[2], ", ", w[3],
              ") with padding ", padding, " and dilation ", dilation);
  return {Ho, Wo};
}

// Validates the parameters of one tensor's format and builds its tables;
// rejects parameter sets whose levels or thresholds are not finite.
inline void make_checked_tables(ExpTables& t, double alpha, double scale,
                                double offset, int64_t bits,
                                Rounding rounding, const char* scale_name,
                                const char* offset_name) {
  check_bits(bits);
  check_alpha(alpha);
  check_scale(scale, scale_name);
  check_offset(offset, offset_name);
  make_tables(t, alpha, scale, offset, static_cast<int>(bits), rounding);
  for (int b = 1; b <= num_levels(static_cast<int>(bits)); ++b) {
    TORCH_CHECK(std::isfinite(t.levels[b]), "dnateq: alpha=", alpha, ", ",
                scale_name, "=", scale, ", ", offset_name, "=", offset,
                " give a non-finite level at bits=", bits,
                " (alpha^E overflows float32)");
  }
}

}  // namespace dnateq
