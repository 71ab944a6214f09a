// The quantize family's front: exp_quantize and exp_dequantize (SPEC section
// 5). Each entry validates its arguments, builds the tables, allocates the
// output and runs the plan on its device (common/plan.h); the kernels are in
// cpu.cpp and cuda.cu beside this file.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "checks.h"
#include "common/plan.h"

namespace dnateq {

struct QuantizePlan {
  c10::Device device{at::kCPU};
  at::Tensor x;    // contiguous input (float32/16, bfloat16)
  at::Tensor out;  // int8 codes of x's shape
  ExpTables t;
  bool check_finite = true;
};
// false when x holds a non-finite value (the CPU always looks; CUDA only
// with check_finite, which saves a host synchronization).
bool run_cpu(const QuantizePlan& p);
bool run_cuda(const QuantizePlan& p);
// The encoder the last CPU quantization (exp_quantize, or the LUT operators'
// activations) ran on its first block, so tests can name what they checked:
// "avx512_word_cell5" / "avx512_word_cell4" (the 16-bit key search whose
// first steps are one cell lookup), "avx512_word", "avx512_float" (the float
// search), "avx2_compare", "bucket", "counting"; "none" before any.
std::string quantize_path();

struct DequantizePlan {
  c10::Device device{at::kCPU};
  at::Tensor codes;  // contiguous int8 codes
  at::Tensor out;    // levels of codes' shape, in the requested dtype
  ExpTables t;
};
// false when a code has bits above bit n-1 set.
bool run_cpu(const DequantizePlan& p);
bool run_cuda(const DequantizePlan& p);

inline at::Tensor exp_quantize(const at::Tensor& x, double alpha, double scale, double offset,
                               int64_t bits, c10::string_view rounding = "nearest",
                               bool check_finite = true) {
  check_float_input(x, "x");
  QuantizePlan p;
  make_checked_tables(p.t, alpha, scale, offset, bits, parse_rounding(rounding), "scale",
                      "offset");
  p.device = x.device();
  p.x = x.contiguous();
  p.out = at::empty(p.x.sizes(), p.x.options().dtype(at::kChar));
  p.check_finite = check_finite;
  const bool finite = p.out.numel() == 0 || run(p);
  TORCH_CHECK(finite,
              "dnateq: x contains non-finite values (NaN or Inf); "
              "exp_quantize needs finite input");
  return p.out;
}

inline at::Tensor exp_dequantize(const at::Tensor& codes, double alpha, double scale,
                                 double offset, int64_t bits,
                                 at::ScalarType dtype = at::kFloat) {
  DequantizePlan p;
  p.t = check_dequantize_args(codes, alpha, scale, offset, bits, dtype);
  p.device = codes.device();
  p.codes = codes.contiguous();
  p.out = at::empty(p.codes.sizes(), p.codes.options().dtype(dtype));
  check_codes_valid(p.out.numel() == 0 || run(p), "codes", bits);
  return p.out;
}

// exp_level_table: the level table of one format, float32 [2^bits] on the
// CPU, indexed by biased exponent (entry 0 = the zero code's 0); the very
// table the kernels build. A table, not a kernel: registered once for every
// device (CompositeExplicitAutograd, csrc/register.cpp).
inline at::Tensor exp_level_table(double alpha, double scale, double offset, int64_t bits) {
  ExpTables t;
  make_checked_tables(t, alpha, scale, offset, bits, Rounding::kNearest, "scale", "offset");
  at::Tensor out = at::empty({int64_t{1} << bits}, at::kFloat);
  std::copy(t.levels, t.levels + out.numel(), out.data_ptr<float>());
  return out;
}

}  // namespace dnateq
