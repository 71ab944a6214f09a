// The fast ("lut") path on CUDA (SPEC section 4): quantize-dequantize the
// float activations through the layer's thresholds and levels, dequantize the
// packed weights through a field -> level table, multiply, and round the
// result to x.dtype once.
//
// Numerics (the same on every backend and at every batch size): x_hat and
// w_hat are float32 levels, products accumulate in float32, TF32 is never
// used. fp16/bf16 inputs are not decoded to their own dtype (bf16 levels
// would lose mantissa bits, fp16 levels above 65504 would be Inf).
//  - M <= 8 rows: a fused GEMV reads the packed weights directly and
//    multiplies in float32 (csrc/lut/gemv.cu when its layout conditions hold,
//    else gemv_kernel below).
//  - more rows, float32 x: float32 x_hat @ w_hat^T by cuBLAS with TF32 off.
//  - more rows, fp16/bf16 x: the float32 product emulated on the tensor
//    cores with three bf16 GEMMs (csrc/lut/gemv.cu, bf16x3_linear): relative
//    error about 2^-16 per product, far below the output dtype's rounding.
//  - conv: float32 x_hat and w_hat, at::_convolution with allow_tf32=false.
// Non-finite activations raise (FiniteCheck, one host synchronization), as
// on the CPU, except inside CUDA graph capture.
//
// The fallback GEMV (gemv_kernel): one warp per output row n, 8 warps per
// block. 32 fields of b bits fill exactly b 32-bit words, so lane l takes
// 32-element chunks c = l, l + 32, ... of the row, loads the chunk's b words
// (the warp reads 32*b consecutive words per step: coalesced), decodes the
// 32 fields in registers (b is a template parameter, every shift is a
// constant) through a shared-memory table, and accumulates against the
// fake-quantized activations (float32, rows zero-padded to a multiple of 32
// so that chunks never need a bound check) for all M rows at once, in
// float32. A warp shuffle reduction ends each row.
//
// Per-output-channel weight parameters (w_scale/w_offset, SPEC section 9):
// the weights are decoded with ATen ops into per-row levels
// sign * float32(S_n * alpha^e + beta_n) (float64 products, the CPU's
// formula), then the native matmul / convolution; the fused GEMV serves the
// per-tensor case only.
#include <torch/library.h>

#include <vector>

#include "common/cuda_common.cuh"
#include "lut/front.h"
#include "pack/front.h"
#include "lut/gemv.cuh"

namespace dnateq {
namespace cuda {
namespace detail {
namespace {

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int64_t kGemvMaxRows = 8;

template <int FB, typename Tout>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const float* __restrict__ xq, int M, int64_t Kp,
                const uint32_t* __restrict__ wp, int64_t words_per_row,
                int64_t N, Lut256 lut, const float* __restrict__ bias,
                Tout* __restrict__ out) {
  constexpr uint32_t kMask = (1u << FB) - 1u;
  __shared__ float s_lut[1 << FB];
  for (int i = threadIdx.x; i < (1 << FB); i += blockDim.x) s_lut[i] = lut.v[i];
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t nchunks = Kp / 32;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp; n < N;
       n += static_cast<int64_t>(gridDim.x) * kGemvWarps) {  // warp-uniform
    float acc[kGemvMaxRows];
#pragma unroll
    for (int m = 0; m < kGemvMaxRows; ++m) acc[m] = 0.f;
    const uint32_t* row = wp + n * words_per_row;
    for (int64_t c = lane; c < nchunks; c += 32) {
      uint32_t wd[FB];
#pragma unroll
      for (int i = 0; i < FB; ++i) {
        const int64_t wi = c * FB + i;
        wd[i] = wi < words_per_row ? __ldg(row + wi) : 0u;  // past the row: 0
      }
      const float* xc = xq + c * 32;
#pragma unroll
      for (int j = 0; j < 32; j += 4) {
        float wv[4];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int bit = (j + jj) * FB;
          const int idx = bit >> 5, sh = bit & 31;
          uint32_t f = wd[idx] >> sh;
          if (sh + FB > 32) f |= wd[idx + 1] << (32 - sh);
          wv[jj] = s_lut[f & kMask];
        }
#pragma unroll
        for (int m = 0; m < kGemvMaxRows; ++m) {
          if (m < M) {
            const float4 xv = __ldg(reinterpret_cast<const float4*>(xc + m * Kp + j));
            float s = acc[m];
            s = fmaf(wv[0], xv.x, s);
            s = fmaf(wv[1], xv.y, s);
            s = fmaf(wv[2], xv.z, s);
            s = fmaf(wv[3], xv.w, s);
            acc[m] = s;
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kGemvMaxRows; ++m) {
      if (m < M) {
        float s = acc[m];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) {
          if (bias != nullptr) s += bias[n];
          out[m * N + n] = from_f32<Tout>(s);
        }
      }
    }
  }
}

template <int FB, typename Tout>
void launch_gemv_fb(const at::Tensor& xq, int M, const at::Tensor& packed,
                    int64_t N, const Lut256& lut, const float* bias,
                    at::Tensor& out) {
  const int64_t Kp = xq.size(1);
  const int64_t words = packed.size(1) / 4;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::max<int64_t>(
      1, std::min<int64_t>((N + kGemvWarps - 1) / kGemvWarps,
                           static_cast<int64_t>(sms) * 8));
  gemv_kernel<FB, Tout><<<grid, kGemvThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      xq.const_data_ptr<float>(), M, Kp,
      reinterpret_cast<const uint32_t*>(packed.const_data_ptr<uint8_t>()), words,
      N, lut, bias, out.data_ptr<Tout>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tout>
void launch_gemv(int fb, const at::Tensor& xq, int M, const at::Tensor& packed,
                 int64_t N, const Lut256& lut, const float* bias,
                 at::Tensor& out) {
  switch (fb) {
    case 2: return launch_gemv_fb<2, Tout>(xq, M, packed, N, lut, bias, out);
    case 3: return launch_gemv_fb<3, Tout>(xq, M, packed, N, lut, bias, out);
    case 4: return launch_gemv_fb<4, Tout>(xq, M, packed, N, lut, bias, out);
    case 5: return launch_gemv_fb<5, Tout>(xq, M, packed, N, lut, bias, out);
    case 6: return launch_gemv_fb<6, Tout>(xq, M, packed, N, lut, bias, out);
    case 7: return launch_gemv_fb<7, Tout>(xq, M, packed, N, lut, bias, out);
    case 8: return launch_gemv_fb<8, Tout>(xq, M, packed, N, lut, bias, out);
    default: TORCH_CHECK(false, "dnateq: internal error: packed field bits ", fb);
  }
}

// Per-channel decode: float levels [rows, K] in dtype from the packed codes.
at::Tensor decode_per_channel(const at::Tensor& w_packed, int64_t rows, int64_t K,
                              int64_t bits, bool w_signed, double alpha,
                              const ChannelParams& wc, at::ScalarType dtype) {
  const at::Tensor codes = dnateq::exp_unpack(w_packed, bits, w_signed, {rows, K});
  const at::Tensor u = codes.to(at::kInt).bitwise_and(0xFF);
  const at::Tensor mag = u.bitwise_and(kMagMask).to(at::kLong);
  const at::Tensor neg = u.bitwise_and(kSignBit).ne(0);
  double pw[kMaxLevels + 1];
  biased_powers(alpha, static_cast<int>(bits), pw);
  const at::Tensor pwt =
      at::from_blob(pw, {num_levels(static_cast<int>(bits)) + 1}, at::kDouble)
          .to(w_packed.device());
  const at::Tensor s = wc.scale_dev.to(at::kDouble).unsqueeze(1);
  const at::Tensor o = wc.offset_dev.to(at::kDouble).unsqueeze(1);
  at::Tensor lv = at::add(at::mul(s, pwt.take(mag)), o).to(at::kFloat);
  lv = at::where(mag.eq(0), at::zeros_like(lv), lv);
  lv = at::where(neg, lv.neg(), lv);
  return lv.to(dtype).contiguous();
}

}  // namespace
}  // namespace detail

}  // namespace cuda

at::Tensor run_cuda(const LutPlan& p) {
  namespace detail = cuda::detail;
  const at::Tensor &x = p.x, &w_packed = p.w_packed;
  const LutArgs& A = p.A;
  const int64_t N = p.N, K = p.K, M = p.M, bits = p.bits;
  const bool w_signed = p.w_signed;
  const double alpha = p.alpha;
  const std::vector<int64_t>& out_shape = p.out_shape;
  const c10::cuda::CUDAGuard guard(p.device);
  // p.w_layout: the CPU fast path's layout, not read here.
  if (M >= 1 && M <= detail::kGemvMaxRows && K > 0 && N > 0 && !A.wc.defined()) {
    if (detail::gemv2_eligible(x, w_packed, M, N, K, bits, w_signed)) {
      return detail::gemv2(x, w_packed, M, N, K, A, w_signed).reshape(out_shape);
    }
    const int64_t Kp = (K + 31) / 32 * 32;
    detail::FiniteCheck finite(x);
    const at::Tensor xq = detail::fake_quantize_padded_f32(x, A.ta, M, K, Kp, finite.ptr());
    const at::Tensor packed = detail::aligned_packed(w_packed);
    const detail::Lut256 lut = detail::field_lut(A.tw, w_signed);
    const int fb = packed_field_bits(static_cast<int>(bits), w_signed);
    const float* bp = A.bias.defined() ? A.bias.const_data_ptr<float>() : nullptr;
    at::Tensor out = at::empty({M, N}, x.options());
    DNATEQ_DISPATCH_FLOAT(x.scalar_type(), T, [&] {
      detail::launch_gemv<T>(fb, xq, static_cast<int>(M), packed, N, lut, bp, out);
    });
    finite.check("x");
    return out.reshape(out_shape);
  }

  // float32 x_hat and w_hat at every batch size (see the file comment).
  detail::FiniteCheck finite(x);
  const at::Tensor xq = detail::fake_quantize(x, A.ta, at::kFloat, finite.ptr()).reshape({M, K});
  const at::Tensor wq =
      A.wc.defined()
          ? detail::decode_per_channel(w_packed, N, K, bits, w_signed, alpha, A.wc, at::kFloat)
          : detail::decode_packed(w_packed, N, K, A.tw, w_signed, at::kFloat);
  at::Tensor y;
  if (x.scalar_type() == at::kFloat) {
    const detail::NoTF32Matmul no_tf32;
    y = A.bias.defined() ? at::linear(xq, wq, A.bias) : at::linear(xq, wq);
  } else {
    y = detail::bf16x3_linear(xq, wq, A.bias);
  }
  finite.check("x");
  return y.to(x.scalar_type()).reshape(out_shape);
}

at::Tensor run_cuda(const ConvLutPlan& p) {
  namespace detail = cuda::detail;
  const at::Tensor &x = p.x, &w_packed = p.w_packed;
  const LutArgs& A = p.A;
  const int64_t O = p.N, K = p.K, bits = p.bits;
  const bool w_signed = p.w_signed;
  const double alpha = p.alpha;
  const c10::cuda::CUDAGuard guard(p.device);
  const at::ScalarType dt = x.scalar_type();
  auto& ctx = at::globalContext();
  detail::FiniteCheck finite(x);
  if (O == 0 || K == 0) {
    // No output channels, or empty dot products (the output is the bias).
    detail::fake_quantize(x, A.ta, dt, finite.ptr());
    at::Tensor y = at::zeros(p.out_shape, x.options().dtype(at::kFloat));
    if (A.bias.defined()) y.add_(A.bias.view({1, O, 1, 1}));
    finite.check("x");
    return y.to(dt);
  }
  const at::Tensor xq = detail::fake_quantize(x, A.ta, at::kFloat, finite.ptr());  // keeps channels-last
  const at::Tensor wq =
      (A.wc.defined()
           ? detail::decode_per_channel(w_packed, O, K, bits, w_signed, alpha, A.wc, at::kFloat)
           : detail::decode_packed(w_packed, O, K, A.tw, w_signed, at::kFloat))
          .reshape(p.w_shape);
  // at::conv2d would let cuDNN use TF32 (allow_tf32 defaults to True for
  // convolutions): errors of ~3e-4 x max, beyond SPEC section 4's float32
  // tolerance. _convolution takes allow_tf32 as an argument.
  const int64_t zero_pad[2] = {0, 0};
  at::Tensor y = at::_convolution(
      xq, wq, A.bias.defined() ? c10::optional<at::Tensor>(A.bias) : c10::nullopt, p.stride,
      p.padding, p.dilation, /*transposed=*/false, zero_pad, p.groups, ctx.benchmarkCuDNN(),
      ctx.deterministicCuDNN() || ctx.deterministicAlgorithms(), ctx.userEnabledCuDNN(),
      /*allow_tf32=*/false);
  finite.check("x");
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CUDA, m) {
  m.impl("exp_linear_lut", &dnateq::exp_linear_lut);
  m.impl("exp_conv2d_lut", &dnateq::exp_conv2d_lut);
}
