// exp_conv2d_lut on the offline weight layout for small batches (issue 13),
// two paths, both on AVX-512 and both decoding the weights from the layout in
// registers (vpermps / vpermi2b) into a small reused buffer (no float copy
// outlives the call):
//
// - the direct convolution (direct_conv.h, direct_conv_avx512.cpp, path
//   "avx512_direct_conv"): the activations quantized straight into zero-padded
//   shifted planes (a reused buffer), a register-tiled FMA kernel writing
//   straight into the output. No tensor but the output, no native conv call:
//   at ResNet-20's sizes the fixed costs of the path below (new tensors,
//   at::conv2d dispatch and oneDNN setup, separate passes) were most of its
//   time (ResNet-20 at batch 1 ran 1.5-1.7x the float model).
// - the native fp32 convolution on the quantized activations (path
//   "avx512_conv"): the activations quantized to their float levels in large
//   chunks, then at::conv2d (oneDNN), for the large convs where oneDNN's
//   blocking wins; see use_direct() for the rule.
// A first version unfolded the quantized planes itself (memcpy rows) and ran
// one sgemm per image: at batch 1 on ResNet-20's layers it was 1.3-1.6x
// F.conv2d.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "checks.h"
#include "common/cpu_kernels.h"
#include "lut/direct_conv.h"
#include "lut/fast_layout.h"
#include "lut/fast_lut.h"

namespace dnateq {
namespace cpu {

namespace {

// The direct kernel runs a conv when its workspace (the shifted planes, KW
// copies of the padded input per row phase) stays small, at most
// kDirectMaxWorkspace floats, and the work per call is small enough that the
// native conv's fixed costs matter: at most kDirectMaxMacs multiply-adds
// (B * O * Ho * Wo * C * KH * KW). Above that oneDNN's cache blocking of
// large channel counts and images wins (or its fixed costs no longer show).
constexpr int64_t kDirectMaxWorkspace = int64_t{1} << 21;   // 8 MB of floats
constexpr int64_t kDirectMaxMacs = int64_t{1} << 27;        // ~134 M

bool use_direct(const fast::DirectConvArgs& a) {
  const int64_t macs = a.B * a.O * a.Ho * a.Wo * a.C * a.KH * a.KW;
  return a.workspace <= kDirectMaxWorkspace && macs <= kDirectMaxMacs;
}

}  // namespace

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
  fast::DirectConvArgs d{};
  d.B = x.size(0);
  d.C = C;
  d.H = x.size(2);
  d.W = x.size(3);
  d.O = O;
  d.KH = KH;
  d.KW = KW;
  d.sh = stride[0];
  d.sw = stride[1];
  d.ph = padding[0];
  d.pw = padding[1];
  d.dh = dilation[0];
  d.dw = dilation[1];
  d.Ho = (d.H + 2 * d.ph - d.dh * (KH - 1) - 1) / d.sh + 1;
  d.Wo = (d.W + 2 * d.pw - d.dw * (KW - 1) - 1) / d.sw + 1;
  const bool direct = fast::direct_conv_setup(d) && use_direct(d);
  // 1. the weights, decoded from the layout in registers into a reused
  //    buffer: [O, Kp] rows (the direct kernel reads them so, past O padded
  //    with zero rows to whole blocks of 4), else packed to [O, K] in place
  static thread_local std::vector<float> wbuf;
  const int64_t rows = direct ? d.ob * fast::kDirectOcBlock : O;
  wbuf.resize(static_cast<size_t>(rows * Kp));
  float* wf = wbuf.data();
  at::parallel_for(0, O, 16, [&](int64_t n0, int64_t n1) {
    fast::decode_rows_avx512(a, n0, n1, wf + n0 * Kp, Kp);
  });
  if (direct) {
    std::fill(wf + O * Kp, wf + rows * Kp, 0.f);
    const at::Tensor xc = x.scalar_type() == at::kFloat ? x.contiguous()
                                                        : x.contiguous().to(at::kFloat);
    static thread_local std::vector<float> planes;
    planes.resize(static_cast<size_t>(d.workspace));
    d.thr = ta.thresholds;
    d.n_thr = ta.n_thr;
    d.levels = ta.levels;
    d.x = xc.const_data_ptr<float>();
    d.planes = planes.data();
    d.w = wf;
    d.ldw = Kp;
    d.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
    at::Tensor y = at::empty({d.B, O, d.Ho, d.Wo}, x.options().dtype(at::kFloat));
    d.y = y.data_ptr<float>();
    // 2. the activations, quantized into the shifted planes
    std::atomic<bool> ok{true};
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d.H * d.W));
    at::parallel_for(0, d.B * C, grain, [&](int64_t i0, int64_t i1) {
      if (!fast::direct_conv_quantize_avx512(d, i0, i1)) ok.store(false, std::memory_order_relaxed);
    });
    TORCH_CHECK(ok.load(), "dnateq: x contains non-finite values (NaN or Inf)");
    // 3. the convolution, over (image, block of 4 output channels)
    at::parallel_for(0, d.B * d.ob, 1, [&](int64_t t0, int64_t t1) {
      fast::direct_conv_run_avx512(d, t0, t1);
    });
    note_lut_path(LutPath::kAvx512DirectConv);
    return y;
  }
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
  note_lut_path(LutPath::kAvx512Conv);
  return at::conv2d(xq, wq, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt,
                    stride, padding, dilation, 1);
}

}  // namespace cpu
}  // namespace dnateq
