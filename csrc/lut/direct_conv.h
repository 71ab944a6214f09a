// The direct AVX-512 convolution of exp_conv2d_lut (issue 13): no im2col, no
// native convolution call, for the small convs of batch-1..8 CNN inference
// (ResNet-20 on CIFAR), where the fixed costs of the oneDNN path (tensors,
// dispatch, primitive setup, separate passes) dominated.
//
// Plain C++ (no ATen, no inline code): direct_conv_avx512.cpp, compiled for
// AVX-512, defines the functions; fast_conv.cpp (ATen side) calls them only
// when active_isa() == Isa::kAvx512.
//
// The activations are quantized straight into "shifted planes": for each
// input channel c, row phase py (< stride_h) and kernel column kw, a plane of
// Hq x Wo floats (row stride exactly Wo) with
//   plane(c, py, kw)[i][j] = xq_padded[c][i * sh + py][j * sw + kw * dw],
// zero where that falls in the padding. Then the input of output position
// (oh, ow) at tap (kh, kw) is plane(c, (kh*dh) % sh, kw)[oh + (kh*dh)/sh][ow]:
// as a function of the flattened output position p = oh * Wo + ow it is
// plane + p + ((kh*dh)/sh) * Wo, unit stride whatever the stride, dilation
// and width. The micro-kernel takes 16 consecutive output positions per zmm,
// 4 output channels x up to 6 vectors per register tile, and accumulates with
// FMA over (c, kh, kw) in that order; bias added at the store.
#pragma once

#include <cstdint>

namespace dnateq {
namespace cpu {
namespace fast {

// Bounds of the direct kernel (the caller falls back to the native conv
// outside them): taps per filter and padded input width.
constexpr int64_t kDirectMaxTaps = 64;
constexpr int64_t kDirectMaxWp = 2048;
// Output channels per register tile.
constexpr int64_t kDirectOcBlock = 4;

struct DirectConvArgs {
  // geometry, filled by the caller
  int64_t B, C, H, W, O, KH, KW, sh, sw, ph, pw, dh, dw, Ho, Wo;
  // derived by direct_conv_setup
  int64_t Hp, Wp, Hq;         // padded input, rows per phase plane
  int64_t plane;              // floats per shifted plane (Hq * Wo)
  int64_t chan;               // floats per input channel (sh * KW * plane)
  int64_t image;              // floats per image (C * chan)
  int64_t workspace;          // floats of `planes` (B * image)
  int64_t ob;                 // output channel blocks of kDirectOcBlock
  uint64_t py_used;           // bit py: some tap reads row phase py
  int64_t off[kDirectMaxTaps];  // tap kh * KW + kw -> offset in a channel's planes
  // activation quantizer (ExpTables of x)
  const float* thr;
  int n_thr;
  const float* levels;
  const float* x;     // [B, C, H, W] float32, contiguous
  float* planes;      // workspace floats
  // weights: decoded levels, row o (ob * 4 rows, the rows >= O zero) at w + o * ldw,
  // tap (c, kh, kw) at column (c * KH + kh) * KW + kw
  const float* w;
  int64_t ldw;
  const float* bias;  // [O] or null
  float* y;           // [B, O, Ho, Wo] float32
};

// Fills the derived fields; false when the shape is outside the kernel's
// bounds (taps, padded width, stride_h <= 64).
bool direct_conv_setup(DirectConvArgs& a);
// Quantizes the (image, channel) pairs [i0, i1) (i = b * C + c) of x into
// their shifted planes. Returns false when some input is NaN or +-Inf.
bool direct_conv_quantize_avx512(const DirectConvArgs& a, int64_t i0, int64_t i1);
// Computes the tasks [t0, t1) (t = b * ob + block) of y.
void direct_conv_run_avx512(const DirectConvArgs& a, int64_t t0, int64_t t1);

}  // namespace fast
}  // namespace cpu
}  // namespace dnateq
