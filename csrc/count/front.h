// The count family's front: exp_linear_count and exp_conv2d_count, the
// count-based exponential dot product (SPEC section 4, the paper's Eq. 8).
// Each entry validates every argument (checks.h), computes the output
// geometry, allocates the float32 output and runs the plan on its device
// (common/plan.h); the kernels are in cpu.cpp and cuda.cu beside this file.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "checks.h"
#include "common/plan.h"

namespace dnateq {

struct CountPlan {
  c10::Device device{at::kCPU};
  at::Tensor a, w;    // contiguous int8 codes: a [.., K] / [Nb, C, H, W], w [N, ..]
  at::Tensor terms;   // contiguous int32 [N, 2^n] weight terms, or undefined
  at::Tensor bias;    // float32 [N] or undefined
  ChannelParams wc;   // per-output-channel weight parameters (undefined: sw/bw)
  at::Tensor out;     // float32 output
  double alpha = 2, sa = 1, ba = 0, sw = 1, bw = 0;
  int64_t bits = 0;
  c10::optional<int64_t> counter_bits;
  int64_t N = 0, K = 0;  // outputs and inputs per output (conv: O and C/groups*kh*kw)
};

struct ConvCountPlan : CountPlan {
  std::array<int64_t, 2> stride{}, padding{}, dilation{};
  int64_t groups = 1, Ho = 0, Wo = 0;
};

// Both check the codes first and return 1 (a_codes) | 2 (w_codes) for codes
// with bits above bit n-1 set, computing nothing; else fill p.out, return 0.
int run_cpu(const CountPlan& p);
int run_cpu(const ConvCountPlan& p);
int run_cuda(const CountPlan& p);
int run_cuda(const ConvCountPlan& p);

namespace fronts {

inline void fill_count_plan(CountPlan& p, const at::Tensor& a, const at::Tensor& w,
                            double alpha, double sa, double ba, double sw, double bw,
                            int64_t bits, const c10::optional<at::Tensor>& bias,
                            c10::optional<int64_t> counter_bits,
                            const c10::optional<at::Tensor>& w_terms, int64_t n_out,
                            const c10::optional<at::Tensor>& w_scale,
                            const c10::optional<at::Tensor>& w_offset) {
  CountArgs A = check_count_args(a, w, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                                 w_terms, n_out, w_scale, w_offset);
  p.device = a.device();
  p.bias = A.bias;
  p.wc = A.wc;
  p.a = a.contiguous();
  p.w = w.contiguous();
  if (w_terms.has_value() && w_terms->defined()) p.terms = w_terms->contiguous();
  p.alpha = alpha; p.sa = sa; p.ba = ba; p.sw = sw; p.bw = bw;
  p.bits = bits;
  p.counter_bits = counter_bits;
}

template <class Plan>
at::Tensor run_count(const Plan& p) {
  const int bad = run(p);
  check_codes_valid(!(bad & 1), "a_codes", p.bits);
  check_codes_valid(!(bad & 2), "w_codes", p.bits);
  return p.out;
}

}  // namespace fronts

inline at::Tensor exp_linear_count(const at::Tensor& a_codes, const at::Tensor& w_codes,
                                   double alpha, double sa, double ba, double sw, double bw,
                                   int64_t bits, const c10::optional<at::Tensor>& bias,
                                   c10::optional<int64_t> counter_bits,
                                   const c10::optional<at::Tensor>& w_terms,
                                   const c10::optional<at::Tensor>& w_scale = c10::nullopt,
                                   const c10::optional<at::Tensor>& w_offset = c10::nullopt) {
  CountPlan p;
  std::tie(p.N, p.K) = check_linear_count_shapes(a_codes, w_codes);
  fronts::fill_count_plan(p, a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                          w_terms, p.N, w_scale, w_offset);
  std::vector<int64_t> out_shape(p.a.sizes().begin(), p.a.sizes().end());
  out_shape.back() = p.N;
  p.out = at::empty(out_shape, p.a.options().dtype(at::kFloat));
  return fronts::run_count(p);
}

inline at::Tensor exp_conv2d_count(const at::Tensor& a_codes, const at::Tensor& w_codes,
                                   double alpha, double sa, double ba, double sw, double bw,
                                   int64_t bits, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups,
                                   c10::optional<int64_t> counter_bits,
                                   const c10::optional<at::Tensor>& w_terms,
                                   const c10::optional<at::Tensor>& w_scale = c10::nullopt,
                                   const c10::optional<at::Tensor>& w_offset = c10::nullopt) {
  ConvCountPlan p;
  std::tie(p.Ho, p.Wo) = check_conv_geometry(a_codes.sizes(), w_codes.sizes(), stride, padding,
                                             dilation, groups, "a_codes", "w_codes");
  p.N = w_codes.size(0);
  p.K = w_codes.size(1) * w_codes.size(2) * w_codes.size(3);
  fronts::fill_count_plan(p, a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                          w_terms, p.N, w_scale, w_offset);
  for (int d = 0; d < 2; ++d) {
    p.stride[d] = stride[d];
    p.padding[d] = padding[d];
    p.dilation[d] = dilation[d];
  }
  p.groups = groups;
  p.out = at::empty({a_codes.size(0), p.N, p.Ho, p.Wo}, p.a.options().dtype(at::kFloat));
  return fronts::run_count(p);
}

}  // namespace dnateq
