// exp_conv2d_lut on the offline weight layout for small batches (issue 13):
// the weights are decoded from the layout in registers (vpermps / vpermi2b)
// into a small reused buffer (no float copy outlives the call), the
// activations quantized straight to their float levels by the AVX-512
// quantizer in large chunks, and the native fp32 convolution runs on them.
// A first version unfolded the quantized planes itself (memcpy rows) and ran
// one sgemm per image: at batch 1 on ResNet-20's layers it was 1.3-1.6x
// F.conv2d, this one is F.conv2d plus the quantize/decode passes.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "checks.h"
#include "common/cpu_kernels.h"
#include "lut/fast_layout.h"
#include "lut/fast_lut.h"

namespace dnateq {
namespace cpu {

at::Tensor fast_conv2d(const at::Tensor& x, const at::Tensor& layout, const at::Tensor& w_packed,
                       at::IntArrayRef w_shape, const ExpTables& ta, const ExpTables& tw,
                       double alpha, const at::Tensor& w_scale, const at::Tensor& w_offset,
                       bool w_signed, const at::Tensor& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t O = w_shape[0], C = w_shape[1], KH = w_shape[2], KW = w_shape[3];
  const int64_t K = C * KH * KW;
  const fast::LayoutHeader h = validate_layout(layout, w_packed, O, K, tw.bits, w_signed);
  TORCH_CHECK(x.dim() == 4 && x.size(1) == C,
              "dnateq: internal: fast_conv2d needs groups == 1 and x [B, C, H, W]");
  WeightTables wt;
  fast::GemvArgs a{};
  fill_weight_args(a, h, layout, K, tw, alpha, w_scale, w_offset, w_signed, wt);
  const int64_t Kp = a.Kp;
  // 1. the weights, decoded from the layout in registers into a reused
  //    buffer ([O, Kp] rows, then packed to [O, K] in place)
  static thread_local std::vector<float> wbuf;
  wbuf.resize(static_cast<size_t>(O * Kp));
  float* wf = wbuf.data();
  at::parallel_for(0, O, 16, [&](int64_t n0, int64_t n1) {
    fast::decode_rows_avx512(a, n0, n1, wf + n0 * Kp, Kp);
  });
  if (Kp != K) {
    for (int64_t n = 1; n < O; ++n) {
      std::memmove(wf + n * K, wf + n * Kp, static_cast<size_t>(K) * sizeof(float));
    }
  }
  const at::Tensor wq = at::from_blob(wf, {O, C, KH, KW}, x.options().dtype(at::kFloat));
  // 2. the activations, quantized straight to their float levels (one
  //    quantizer call per chunk: its register tables are built once per call)
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  at::Tensor xq = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  float* q = xq.data_ptr<float>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    bool good = true;
    if (xc.scalar_type() == at::kFloat) {
      good = fast::encode_levels_avx512(ta.thresholds, ta.n_thr, ta.levels,
                                        xc.const_data_ptr<float>() + i0, i1 - i0, q + i0);
    } else {
      for (int64_t j = i0; j < i1; j += 4096) {   // to float in place, then quantize
        const int64_t len = std::min<int64_t>(4096, i1 - j);
        detail::load_as_float(xc, j, len, q + j);
        good &= fast::encode_levels_avx512(ta.thresholds, ta.n_thr, ta.levels, q + j, len, q + j);
      }
    }
    if (!good) ok.store(false, std::memory_order_relaxed);
  });
  TORCH_CHECK(ok.load(), "dnateq: x contains non-finite values (NaN or Inf)");
  // 3. the native fp32 convolution (oneDNN / im2col + sgemm, as F.conv2d picks)
  return at::conv2d(xq, wq, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt,
                    stride, padding, dilation, 1);
}

}  // namespace cpu
}  // namespace dnateq
