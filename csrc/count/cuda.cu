// Count-based exponential dot product (SPEC section 4, the paper's Eq. 8) on
// CUDA: exact int32 counts C1..C4 per output in shared-memory histograms,
// then the float64 post-processing with a LUT of alpha^k, in the same order
// and with the same (unfused) float64 operations as the CPU backend
// (csrc/count/cpu.cpp), so that both give the same float32 result.
//
// Work split: one warp per output (m, n); a block of kWarps warps takes one
// activation row m and kWarps consecutive weight rows, so the row is read
// from L1/L2 once per block. Each warp owns a histogram of 4 * 2^n ints in
// shared memory: C1 (2^(n+1) bins indexed by biased(a) + biased(w)), C2 and
// C3 (2^n bins indexed by biased(w), biased(a)). Lanes stride over K and add
// the pair sign (+-1) with shared-memory atomics.
//
// Precomputed weight terms (w_terms, int32 [N, 2^n]): for an activation row
// with no negative code and fewer zero than nonzero positions, C2 bins are
// not counted from the nonzero pairs; instead the zero-activation positions
// add sign(w) to their C2 bin and the post-processing takes
// C2[b] = w_terms[n, b] - bin. Decided per row exactly as on the CPU (a small
// kernel computes it first); with counter_bits set the terms are not used.
// C4 = sum_b C2[b] (before clamping), then each of C1[k], C2[k], C3[k], C4 is
// clamped to [-2^(cb-1), 2^(cb-1) - 1] when counter_bits is given.
//
// Per-output-channel weight parameters (w_scale/w_offset, float32 [N] on
// the device): lane 0 forms sa*S_n, ba*S_n, sa*beta_n, ba*beta_n in float64
// for its output n, as the CPU does; otherwise the scalar products of sw/bw.
//
// Conv: im2col of the codes on the device into uint8 [N*Ho*Wo, C/g*kh*kw]
// per group (zero codes where padded), then the same counting kernel with an
// output map that writes NCHW directly.

#include <cmath>
#include <vector>

#include <torch/library.h>

#include "common/cuda_common.cuh"
#include "count/front.h"

namespace dnateq {
namespace cuda {
namespace detail {
namespace {

constexpr int kWarps = 8;                 // outputs (warps) per block
constexpr int kCountThreads = kWarps * 32;
constexpr int kMaxPw = 4 * ((1 << (kMaxBits - 1)) - 1) + 1;  // 4E + 1 = 253

struct PostArgs {
  double pw[kMaxPw + 3];  // pw[k + 2E] = alpha^k, k = -2E .. 2E
  double sasw, basw, sabw, babw;
  double sa, ba;  // for per-channel weight parameters
  long long lo, hi;
  int clamp;
};

// Output offset of (m, n): (m / hw) * s_b + (m % hw) * s_m + n * s_n.
struct OutMap {
  int64_t hw, s_b, s_m, s_n;
};

__device__ __forceinline__ long long clamp_count(long long c,
                                                 const PostArgs& p) {
  return p.clamp ? (c < p.lo ? p.lo : (c > p.hi ? p.hi : c)) : c;
}

// Flags (atomicOr `bit`) if any code has its magnitude above max_mag.
__global__ void __launch_bounds__(kThreads)
    validate_codes_kernel(const uint8_t* __restrict__ p, int64_t n,
                          int max_mag, int bit, int* __restrict__ flag) {
  bool bad = false;
  const int64_t stride = grid_threads();
  const int64_t nvec = aligned_to(p, 16) ? n / 16 : 0;
  for (int64_t v = global_thread(); v < nvec; v += stride) {
    const Vec<uint8_t, 16> c = reinterpret_cast<const Vec<uint8_t, 16>*>(p)[v];
#pragma unroll
    for (int j = 0; j < 16; ++j) bad |= (c.v[j] & kMagMask) > max_mag;
  }
  for (int64_t i = nvec * 16 + global_thread(); i < n; i += stride) {
    bad |= (p[i] & kMagMask) > max_mag;
  }
  if (bad) atomicOr(flag, bit);
}

// Per activation row: use the precomputed weight terms iff the row has no
// negative nonzero code and fewer zero positions than nonzero ones (the
// CPU's rule). One warp per row.
__global__ void __launch_bounds__(kThreads)
    row_terms_kernel(const uint8_t* __restrict__ a, int64_t M, int64_t K,
                     int8_t* __restrict__ use) {
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = global_thread() >> 5;
  const int64_t nwarps = grid_threads() >> 5;
  for (int64_t m = warp0; m < M; m += nwarps) {
    const uint8_t* row = a + m * K;
    long long zeros = 0;
    bool neg = false;
    for (int64_t k = lane; k < K; k += 32) {
      const uint8_t c = row[k];
      if ((c & kMagMask) == 0) ++zeros;
      else neg |= (c & kSignBit) != 0;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      zeros += __shfl_xor_sync(0xffffffffu, zeros, off);
    }
    const bool any_neg = __any_sync(0xffffffffu, neg);
    if (lane == 0) use[m] = (!any_neg && zeros < K - zeros) ? 1 : 0;
  }
}

template <bool VEC4>
__global__ void __launch_bounds__(kCountThreads)
    count_kernel(const uint8_t* __restrict__ a, const uint8_t* __restrict__ w,
                 int64_t M, int64_t N, int64_t K, int bits,
                 const int32_t* __restrict__ terms,
                 const int8_t* __restrict__ use_terms,
                 const float* __restrict__ bias, const float* __restrict__ ws,
                 const float* __restrict__ wo, float* __restrict__ out,
                 OutMap map, PostArgs post) {
  extern __shared__ __align__(16) unsigned char smem[];
  double* s_pw = reinterpret_cast<double*>(smem);
  int* s_hist = reinterpret_cast<int*>(s_pw + kMaxPw + 3);
  const int nb = 1 << bits;
  const int n_pw = 2 * nb - 3;  // 4E + 1
  for (int i = threadIdx.x; i < n_pw; i += blockDim.x) s_pw[i] = post.pw[i];
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  int* c1 = s_hist + warp * 4 * nb;  // [2^(n+1)]
  int* c2 = c1 + 2 * nb;             // [2^n]
  int* c3 = c2 + nb;                 // [2^n]
  const int64_t ngroups = (N + kWarps - 1) / kWarps;
  const int64_t tiles = M * ngroups;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t m = tile / ngroups;
    const int64_t n = (tile - m * ngroups) * kWarps + warp;
    if (n >= N) continue;  // warp-uniform
    for (int i = lane; i < 4 * nb; i += 32) c1[i] = 0;
    __syncwarp();
    const bool ut = use_terms != nullptr && use_terms[m] != 0;
    const uint8_t* ar = a + m * K;
    const uint8_t* wr = w + n * K;
    // Codes are validated beforehand: magnitudes are < 2^n.
    auto count_one = [&](uint32_t ua, uint32_t uw) {
      const uint32_t ma = ua & kMagMask, mw = uw & kMagMask;
      if (ma != 0 && mw != 0) {
        const int s = ((ua ^ uw) & kSignBit) ? -1 : 1;
        atomicAdd(&c1[ma + mw], s);
        atomicAdd(&c3[ma], s);
        if (!ut) atomicAdd(&c2[mw], s);
      } else if (ut && mw != 0) {
        // Zero activation: its contribution to the weight terms (as with a
        // positive activation) is removed in the post-processing.
        atomicAdd(&c2[mw], (uw & kSignBit) ? -1 : 1);
      }
    };
    if (VEC4) {
      const uint32_t* a4 = reinterpret_cast<const uint32_t*>(ar);
      const uint32_t* w4 = reinterpret_cast<const uint32_t*>(wr);
      const int64_t K4 = K >> 2;
      for (int64_t k = lane; k < K4; k += 32) {
        const uint32_t va = __ldg(a4 + k), vw = __ldg(w4 + k);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          count_one((va >> (8 * j)) & 0xffu, (vw >> (8 * j)) & 0xffu);
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) count_one(__ldg(ar + k), __ldg(wr + k));
    }
    __syncwarp();

    // Post-processing: three serial float64 sums (C1 on lane 0, C2 and C4 on
    // lane 1, C3 on lane 2) in ascending bin order, as on the CPU.
    double t = 0.0;
    long long c4 = 0;
    if (lane == 0) {
      for (int s = 2; s <= 2 * nb - 2; ++s) {  // s = biased sum = k + 2^n
        const long long c = c1[s];
        if (c != 0) {
          t = __dadd_rn(t, __dmul_rn(static_cast<double>(clamp_count(c, post)),
                                     s_pw[s - 2]));
        }
      }
    } else if (lane == 1) {
      const int32_t* tr = ut ? terms + n * nb : nullptr;
      for (int b = 1; b < nb; ++b) {  // b = biased exponent
        long long c = c2[b];
        if (tr != nullptr) c = static_cast<long long>(__ldg(tr + b)) - c;
        c4 += c;
        if (c != 0) {
          t = __dadd_rn(t, __dmul_rn(static_cast<double>(clamp_count(c, post)),
                                     s_pw[b + nb / 2 - 2]));
        }
      }
    } else if (lane == 2) {
      for (int b = 1; b < nb; ++b) {
        const long long c = c3[b];
        if (c != 0) {
          t = __dadd_rn(t, __dmul_rn(static_cast<double>(clamp_count(c, post)),
                                     s_pw[b + nb / 2 - 2]));
        }
      }
    }
    const double t2 = __shfl_sync(0xffffffffu, t, 1);
    const double t3 = __shfl_sync(0xffffffffu, t, 2);
    c4 = __shfl_sync(0xffffffffu, c4, 1);
    if (lane == 0) {
      double sasw = post.sasw, basw = post.basw, sabw = post.sabw, babw = post.babw;
      if (ws != nullptr) {
        const double sn = static_cast<double>(ws[n]), on = static_cast<double>(wo[n]);
        sasw = __dmul_rn(post.sa, sn);
        basw = __dmul_rn(post.ba, sn);
        sabw = __dmul_rn(post.sa, on);
        babw = __dmul_rn(post.ba, on);
      }
      double y = __dmul_rn(sasw, t);
      y = __dadd_rn(y, __dmul_rn(basw, t2));
      y = __dadd_rn(y, __dmul_rn(sabw, t3));
      y = __dadd_rn(y, __dmul_rn(babw,
                                 static_cast<double>(clamp_count(c4, post))));
      if (bias != nullptr) y = __dadd_rn(y, static_cast<double>(bias[n]));
      const int64_t q = m / map.hw;
      const int64_t off = q * map.s_b + (m - q * map.hw) * map.s_m + n * map.s_n;
      out[off] = __double2float_rn(y);
    }
    __syncwarp();
  }
}

// Geometry of one conv.
struct ConvGeom {
  int64_t C, H, W, Cg, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

// col[r, c] for r = (img, oh, ow), c = (ci, i, j) of group g; zero code where
// the receptive field reads padding. Column order matches
// w_codes.reshape(O, -1).
__global__ void __launch_bounds__(kThreads)
    im2col_kernel(const uint8_t* __restrict__ a, uint8_t* __restrict__ col,
                  int64_t rows, int64_t g, ConvGeom G) {
  const int64_t kk = G.kh * G.kw;
  const int64_t Kg = G.Cg * kk;
  const int64_t hw = G.Ho * G.Wo;
  const int64_t total = rows * Kg;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t r = idx / Kg, c = idx - r * Kg;
    const int64_t img = r / hw, p = r - img * hw;
    const int64_t oh = p / G.Wo, ow = p - oh * G.Wo;
    const int64_t ci = c / kk, rem = c - ci * kk;
    const int64_t i = rem / G.kw, j = rem - i * G.kw;
    const int64_t ih = oh * G.sh - G.ph + i * G.dh;
    const int64_t iw = ow * G.sw - G.pw + j * G.dw;
    uint8_t v = 0;
    if (ih >= 0 && ih < G.H && iw >= 0 && iw < G.W) {
      v = a[((img * G.C + g * G.Cg + ci) * G.H + ih) * G.W + iw];
    }
    col[idx] = v;
  }
}

// ---------------------------------------------------------------------------
// Host side.

PostArgs make_post(double alpha, double sa, double ba, double sw, double bw,
                   int64_t bits, c10::optional<int64_t> counter_bits) {
  PostArgs P;
  for (int i = 0; i < kMaxPw + 3; ++i) P.pw[i] = 0.0;
  const int E = exp_range(static_cast<int>(bits));
  for (int k = -2 * E; k <= 2 * E; ++k) P.pw[k + 2 * E] = std::pow(alpha, k);
  P.sasw = sa * sw;
  P.basw = ba * sw;
  P.sabw = sa * bw;
  P.babw = ba * bw;
  P.sa = sa;
  P.ba = ba;
  P.clamp = counter_bits.has_value() ? 1 : 0;
  P.lo = P.hi = 0;
  if (counter_bits.has_value()) {
    P.hi = (1LL << (*counter_bits - 1)) - 1;
    P.lo = -(1LL << (*counter_bits - 1));
  }
  return P;
}

// Range check of both code tensors with one host synchronization: 1
// (a_codes) | 2 (w_codes) where a code has bits above bit n-1 set.
int bad_codes(const at::Tensor& a, const at::Tensor& w, int64_t bits) {
  const int max_mag = num_levels(static_cast<int>(bits));
  DeviceFlag flag(a);
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor* ts[2] = {&a, &w};
  for (int i = 0; i < 2; ++i) {
    const int64_t n = ts[i]->numel();
    if (n == 0) continue;
    const int64_t grid = grid_for((n + 15) / 16, kThreads);
    validate_codes_kernel<<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<const uint8_t*>(ts[i]->const_data_ptr<int8_t>()), n,
        max_mag, 1 << i, flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return flag.value();
}

// Counts rows [0, M) of `a` ([M, K] contiguous codes) against weight rows
// [0, N) of `w` ([N, K]); terms/bias/out already offset to the first row.
void launch_count(const uint8_t* a, const uint8_t* w, int64_t M, int64_t N,
                  int64_t K, int64_t bits, const int32_t* terms,
                  bool want_terms, const float* bias, const float* ws,
                  const float* wo, float* out, const OutMap& map, const PostArgs& post,
                  const at::TensorOptions& opts) {
  if (M == 0 || N == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor use;
  if (want_terms) {
    use = at::empty({M}, opts.dtype(at::kChar));
    const int64_t grid = grid_for(M * 32, kThreads);
    row_terms_kernel<<<grid, kThreads, 0, stream>>>(a, M, K, use.data_ptr<int8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int nb = 1 << bits;
  const size_t smem = (kMaxPw + 3) * sizeof(double) +
                      static_cast<size_t>(kWarps) * 4 * nb * sizeof(int);
  const int64_t tiles = M * ((N + kWarps - 1) / kWarps);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::max<int64_t>(
      1, std::min<int64_t>(tiles, static_cast<int64_t>(sms) * 8));
  const bool vec4 = (K % 4 == 0) && aligned_to(a, 4) && aligned_to(w, 4);
  const int8_t* use_p = want_terms ? use.const_data_ptr<int8_t>() : nullptr;
  if (vec4) {
    count_kernel<true><<<grid, kCountThreads, smem, stream>>>(
        a, w, M, N, K, static_cast<int>(bits), terms, use_p, bias, ws, wo, out, map,
        post);
  } else {
    count_kernel<false><<<grid, kCountThreads, smem, stream>>>(
        a, w, M, N, K, static_cast<int>(bits), terms, use_p, bias, ws, wo, out, map,
        post);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace detail

}  // namespace cuda

int run_cuda(const CountPlan& p) {
  namespace d = cuda::detail;
  const c10::cuda::CUDAGuard guard(p.device);
  if (const int bad = d::bad_codes(p.a, p.w, p.bits)) return bad;
  if (p.out.numel() == 0) return 0;
  const int64_t N = p.N, K = p.K, M = p.out.numel() / N;
  const float* ws = p.wc.defined() ? p.wc.scale_dev.const_data_ptr<float>() : nullptr;
  const float* wo = p.wc.defined() ? p.wc.offset_dev.const_data_ptr<float>() : nullptr;
  const d::PostArgs post = d::make_post(p.alpha, p.sa, p.ba, p.sw, p.bw, p.bits, p.counter_bits);
  const bool want_terms = p.terms.defined() && !p.counter_bits.has_value();
  const d::OutMap map{M, 0, N, 1};
  d::launch_count(
      reinterpret_cast<const uint8_t*>(p.a.const_data_ptr<int8_t>()),
      reinterpret_cast<const uint8_t*>(p.w.const_data_ptr<int8_t>()), M, N, K, p.bits,
      want_terms ? p.terms.const_data_ptr<int32_t>() : nullptr, want_terms,
      p.bias.defined() ? p.bias.const_data_ptr<float>() : nullptr, ws, wo,
      p.out.data_ptr<float>(), map, post, p.a.options());
  return 0;
}

int run_cuda(const ConvCountPlan& p) {
  namespace d = cuda::detail;
  const c10::cuda::CUDAGuard guard(p.device);
  if (const int bad = d::bad_codes(p.a, p.w, p.bits)) return bad;
  if (p.out.numel() == 0) return 0;
  const int64_t C = p.a.size(1), H = p.a.size(2), Wd = p.a.size(3);
  const int64_t O = p.N, Cg = p.w.size(1), kh = p.w.size(2), kw = p.w.size(3);
  const int64_t groups = p.groups, HW = p.Ho * p.Wo, M = p.a.size(0) * HW;
  const int64_t Kg = Cg * kh * kw, Og = O / groups;
  const int nb = 1 << p.bits;
  const float* ws = p.wc.defined() ? p.wc.scale_dev.const_data_ptr<float>() : nullptr;
  const float* wo = p.wc.defined() ? p.wc.offset_dev.const_data_ptr<float>() : nullptr;
  const d::PostArgs post = d::make_post(p.alpha, p.sa, p.ba, p.sw, p.bw, p.bits, p.counter_bits);
  const bool want_terms = p.terms.defined() && !p.counter_bits.has_value();
  const d::OutMap map{HW, O * HW, 1, HW};
  const d::ConvGeom G{C,  H,          Wd,         Cg,          kh,
                      kw, p.stride[0],  p.stride[1],  p.padding[0],  p.padding[1],
                      p.dilation[0], p.dilation[1], p.Ho, p.Wo};
  // One im2col buffer, reused by every group (stream-ordered).
  at::Tensor col = at::empty({M, Kg}, p.a.options().dtype(at::kByte));
  const uint8_t* ap = reinterpret_cast<const uint8_t*>(p.a.const_data_ptr<int8_t>());
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(p.w.const_data_ptr<int8_t>());
  const float* bp = p.bias.defined() ? p.bias.const_data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t g = 0; g < groups; ++g) {
    if (M * Kg > 0) {
      const int64_t grid = d::grid_for(M * Kg, d::kThreads);
      d::im2col_kernel<<<grid, d::kThreads, 0, stream>>>(ap, col.data_ptr<uint8_t>(), M, g, G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    d::launch_count(
        col.const_data_ptr<uint8_t>(), wp + g * Og * Kg, M, Og, Kg, p.bits,
        want_terms ? p.terms.const_data_ptr<int32_t>() + g * Og * nb : nullptr, want_terms,
        bp ? bp + g * Og : nullptr, ws ? ws + g * Og : nullptr, wo ? wo + g * Og : nullptr,
        p.out.data_ptr<float>() + g * Og * HW, map, post, p.a.options());
  }
  return 0;
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CUDA, m) {
  m.impl("exp_linear_count", &dnateq::exp_linear_count);
  m.impl("exp_conv2d_count", &dnateq::exp_conv2d_count);
}
