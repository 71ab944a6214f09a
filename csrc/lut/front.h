// The LUT family's front: exp_linear_lut and exp_conv2d_lut, the fast path
// (SPEC section 4): quantize-dequantize the float activations through the
// layer's tables, dequantize the packed weights, multiply. Each entry
// validates every argument (checks.h), builds both tensors' tables, computes
// the output geometry and runs the plan on its device (common/plan.h); the
// kernels are in cpu.cpp (+ fast_lut.cpp, fast_avx512.cpp) and cuda.cu (+
// gemv.cu) beside this file. The backends produce the output themselves
// (most paths end in a native matmul / convolution), of the plan's geometry
// and x's dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <array>
#include <vector>

#include "checks.h"
#include "common/plan.h"
#include "lut/fast_lut.h"

namespace dnateq {

struct LutPlan {
  c10::Device device{at::kCPU};
  at::Tensor x;         // as given (float32/16, bfloat16; a backend may keep its layout)
  at::Tensor w_packed;  // uint8 [N, row_bytes] from exp_pack
  std::vector<int64_t> w_shape;
  LutArgs A;            // tables ta / tw, per-channel parameters, float32 bias
  double alpha = 2;
  int64_t bits = 0;
  bool w_signed = false;
  at::Tensor w_layout;  // exp_lut_layout's layout (CPU fast path) or undefined
  int64_t N = 0, K = 0;  // outputs and inputs per output
  int64_t M = 0;         // linear: rows of x viewed as [M, K]
  std::vector<int64_t> out_shape;
};

struct ConvLutPlan : LutPlan {
  std::array<int64_t, 2> stride{}, padding{}, dilation{};
  int64_t groups = 1, Ho = 0, Wo = 0;
};

// The output, of shape out_shape / [Nb, O, Ho, Wo] and x's dtype; a
// non-finite activation raises (the message names x).
at::Tensor run_cpu(const LutPlan& p);
at::Tensor run_cpu(const ConvLutPlan& p);
at::Tensor run_cuda(const LutPlan& p);
at::Tensor run_cuda(const ConvLutPlan& p);

namespace fronts {

inline void fill_lut_plan(LutPlan& p, const at::Tensor& x, const at::Tensor& w_packed,
                          at::IntArrayRef w_shape, double alpha, double sa, double ba,
                          double sw, double bw, int64_t bits, bool w_signed,
                          c10::string_view rounding, const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& w_scale,
                          const c10::optional<at::Tensor>& w_offset,
                          const c10::optional<at::Tensor>& w_layout) {
  p.A = check_lut_args(x, w_packed, p.N, p.K, alpha, sa, ba, sw, bw, bits, w_signed, rounding,
                       bias, p.N, w_scale, w_offset);
  p.device = x.device();
  p.x = x;
  p.w_packed = w_packed;
  p.w_shape.assign(w_shape.begin(), w_shape.end());
  p.alpha = alpha;
  p.bits = bits;
  p.w_signed = w_signed;
  if (w_layout.has_value() && w_layout->defined()) p.w_layout = *w_layout;
}

}  // namespace fronts

inline at::Tensor exp_linear_lut(const at::Tensor& x, const at::Tensor& w_packed,
                                 at::IntArrayRef w_shape, double alpha, double sa, double ba,
                                 double sw, double bw, int64_t bits, bool a_signed,
                                 bool w_signed, c10::string_view rounding,
                                 const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& w_scale = c10::nullopt,
                                 const c10::optional<at::Tensor>& w_offset = c10::nullopt,
                                 const c10::optional<at::Tensor>& w_layout = c10::nullopt) {
  // a_signed is deprecated (docs/FORMAT.md, "Deprecated operator arguments"):
  // accepted and ignored, because each code carries its own sign.
  (void)a_signed;
  LutPlan p;
  std::tie(p.N, p.K) = check_linear_lut_shapes(x, w_shape);
  fronts::fill_lut_plan(p, x, w_packed, w_shape, alpha, sa, ba, sw, bw, bits, w_signed,
                        rounding, bias, w_scale, w_offset, w_layout);
  p.out_shape.assign(x.sizes().begin(), x.sizes().end());
  p.out_shape.back() = p.N;
  p.M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  return run(p);
}

inline at::Tensor exp_conv2d_lut(const at::Tensor& x, const at::Tensor& w_packed,
                                 at::IntArrayRef w_shape, double alpha, double sa, double ba,
                                 double sw, double bw, int64_t bits, bool a_signed,
                                 bool w_signed, c10::string_view rounding,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups,
                                 const c10::optional<at::Tensor>& w_scale = c10::nullopt,
                                 const c10::optional<at::Tensor>& w_offset = c10::nullopt,
                                 const c10::optional<at::Tensor>& w_layout = c10::nullopt) {
  (void)a_signed;  // deprecated, ignored (see exp_linear_lut)
  ConvLutPlan p;
  check_w_shape(w_shape, 4, "[O, C/groups, kh, kw] for a conv weight");
  std::tie(p.Ho, p.Wo) = check_conv_geometry(x.sizes(), w_shape, stride, padding, dilation,
                                             groups, "x", "w_shape");
  p.N = w_shape[0];
  p.K = w_shape[1] * w_shape[2] * w_shape[3];
  fronts::fill_lut_plan(p, x, w_packed, w_shape, alpha, sa, ba, sw, bw, bits, w_signed,
                        rounding, bias, w_scale, w_offset, w_layout);
  for (int d = 0; d < 2; ++d) {
    p.stride[d] = stride[d];
    p.padding[d] = padding[d];
    p.dilation[d] = dilation[d];
  }
  p.groups = groups;
  p.out_shape = {x.size(0), p.N, p.Ho, p.Wo};
  return run(p);
}

}  // namespace dnateq
