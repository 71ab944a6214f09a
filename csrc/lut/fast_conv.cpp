// exp_conv2d_lut on the offline weight layout for small batches (issue 13):
// per image, the activations are quantized once (AVX-512 quantizer, straight
// to their float levels) into zero-padded planes, unfolded (im2col) from
// there into a [C*kh*kw, Ho*Wo] buffer, the weights are decoded from the
// layout in registers (vpermps / vpermi2b) into a small reused [O, Kp]
// buffer, and one native fp32 GEMM (bias fused) writes the image's NCHW
// output in place. No float copy of the weights outlives the call, there is
// no separate full fake-quantize pass, and the unfold is a few memcpy's per
// row instead of aten's generic im2col (that was 2-3x the GEMM's time at
// batch 1 on ResNet-20's 32x32 layers).
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
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  const int64_t dh = dilation[0], dw = dilation[1];
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t Ho = (Hp - dh * (KH - 1) - 1) / sh + 1;
  const int64_t Wo = (Wp - dw * (KW - 1) - 1) / sw + 1;
  const int64_t P = Ho * Wo;
  at::Tensor y = at::empty({B, O, Ho, Wo}, x.options().dtype(at::kFloat));
  if (B == 0 || P == 0) return y;

  WeightTables wt;
  fast::GemvArgs a{};
  fill_weight_args(a, h, layout, K, tw, alpha, w_scale, w_offset, w_signed, wt);
  const int64_t Kp = a.Kp;
  // Reused buffers of the calling thread (the workers below write disjoint parts).
  static thread_local std::vector<float> wbuf, xpad, cols;
  wbuf.resize(static_cast<size_t>(O * Kp));
  xpad.resize(static_cast<size_t>(C * Hp * Wp));
  cols.resize(static_cast<size_t>(K * P));
  float* wf = wbuf.data();
  float* xp = xpad.data();
  float* cl = cols.data();
  at::parallel_for(0, O, 16, [&](int64_t n0, int64_t n1) {
    fast::decode_rows_avx512(a, n0, n1, wf + n0 * Kp, Kp);
  });
  const at::Tensor wmat = at::from_blob(wf, {O, K}, {Kp, 1}, x.options().dtype(at::kFloat));
  const at::Tensor xc = x.contiguous();
  const at::Tensor cmat = at::from_blob(cl, {K, P}, x.options().dtype(at::kFloat));
  const c10::optional<at::Tensor> bcol =
      bias.defined() ? c10::optional<at::Tensor>(bias.view({O, 1}).expand({O, P})) : c10::nullopt;
  std::fill(xpad.begin(), xpad.end(), 0.f);
  for (int64_t b = 0; b < B; ++b) {
    // 1. quantize the image into the interior of the zero-padded planes
    std::atomic<bool> ok{true};
    at::parallel_for(0, C * H, 64, [&](int64_t r0, int64_t r1) {
      float tmp[detail::kBlock];
      bool good = true;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r / H, iy = r % H;
        float* dst = xp + (c * Hp + iy + ph) * Wp + pw;
        for (int64_t k0 = 0; k0 < W; k0 += detail::kBlock) {
          const int64_t len = std::min<int64_t>(detail::kBlock, W - k0);
          detail::load_as_float(xc, ((b * C + c) * H + iy) * W + k0, len, tmp);
          good &= fast::encode_levels_avx512(ta.thresholds, ta.n_thr, ta.levels, tmp, len,
                                             dst + k0);
        }
      }
      if (!good) ok.store(false, std::memory_order_relaxed);
    });
    TORCH_CHECK(ok.load(), "dnateq: x contains non-finite values (NaN or Inf)");
    // 2. unfold: row (c, i, j) of cols = the plane shifted by (i*dh, j*dw), strided
    at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c = k / (KH * KW), i = (k / KW) % KH, j = k % KW;
        const float* plane = xp + c * Hp * Wp + i * dh * Wp + j * dw;
        float* dst = cl + k * P;
        for (int64_t oy = 0; oy < Ho; ++oy) {
          const float* src = plane + oy * sh * Wp;
          float* d = dst + oy * Wo;
          if (sw == 1) {
            std::memcpy(d, src, static_cast<size_t>(Wo) * sizeof(float));
          } else {
            for (int64_t ox = 0; ox < Wo; ++ox) d[ox] = src[ox * sw];
          }
        }
      }
    });
    // 3. y[b] = W @ cols (+ bias), fp32 GEMM into the output
    at::Tensor yb = y.select(0, b).view({O, P});
    if (bcol.has_value()) {
      at::addmm_out(yb, *bcol, wmat, cmat);
    } else {
      at::mm_out(yb, wmat, cmat);
    }
  }
  return y;
}

}  // namespace cpu
}  // namespace dnateq
