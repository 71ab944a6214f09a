// Packed-weight GEMV of exp_linear_lut on CUDA (1 <= M <= 8 rows of x),
// second design (issue 17). One launch does everything:
//
// Prologue. Each block fake-quantizes its K-slice of x (all M rows) into
// shared memory, float32, with the activation thresholds and levels (passed
// by value), and flags non-finite values (block x == 0 of each slice only).
// Before the prologue every warp has already issued the weight loads of its
// first unit, so they are in flight while x is being quantized.
//
// Weights. A row of the packed format (SPEC section 1) is K fields of FB bits
// LSB-first in 32-bit words; with K % 128 == 0 it is a whole number of
// 16-byte vectors. A "unit" is the smallest run of U 32-element chunks that
// fills whole vectors: U = 4 / gcd(FB, 4) chunks, V = U * FB / 4 vectors
// (FB = 2: 2 chunks in 1 vector; 3: 4 in 3; 4: 1 in 1; 5: 4 in 5; 6: 2 in 3;
// 7: 4 in 7; 8: 1 in 2). Lane l of a warp takes units l, l + 32, ... of its
// rows, loads each unit with V 16-byte loads per row (ld.global.nc, L1 no
// allocate for V = 1, L2 evict-first policy: the weights are streamed once),
// the next unit's loads issued before the current unit is decoded (double
// buffer in registers). Fields never straddle a unit, so a unit decodes
// from its own registers with constant shifts (FB and U are template
// parameters).
//
// Rows. Each warp computes R rows at once against each x vector it reads
// from shared memory (R = 4 for V = 1, 2 for V = 2, 3, 1 for V = 5, 7: the
// register budget of the double-buffered units), and all M activation rows:
// acc[R][M] float32 per lane, a warp shuffle reduction at the end of a row
// group. A block is 16 warps (16 * R rows per group); the grid is at most
// the resident blocks (persistent: a block loops over row groups, so x is
// quantized once per block, not once per row group).
//
// Split-K. When one slice of x does not fit the 64 KB shared-memory budget
// (M * K * 4 bytes), or when the row groups alone would leave more than half
// of the SMs idle, the K range is split over gridDim.y slices: each writes
// float32 partial sums and a second kernel adds them in slice order
// (deterministic; no atomics).
//
// Shared memory. x is stored chunk by chunk (32 floats) with the eight
// 16-byte groups of chunk c permuted by XOR with (c / U) & 7: the 8 lanes of
// each quarter warp read 16-byte vectors of 8 consecutive units, which then
// fall in 8 distinct bank groups (no conflict). The field -> level table has
// 2^FB entries: for FB <= 5 each entry has its own bank and equal indices
// broadcast, so a table lookup never conflicts; this is why the n = 3 level
// table was not moved into registers (a byte-permute decode of a float32
// level costs about 5 integer operations per weight against 1 shared load).
//
// Numerics: float32 levels and float32 FMAs (as the CPU), bias added in
// float32, one rounding to x.dtype at the end.
#include <cstring>

#include "lut/gemv.cuh"
#include "checks.h"

namespace dnateq {
namespace cuda {
namespace detail {
namespace {

constexpr int kG2Warps = 16;
constexpr int kG2Threads = kG2Warps * 32;
constexpr int kG2SmemBytes = 64 * 1024;  // x slice budget per block
constexpr int64_t kG2KAlign = 128;       // K multiple: whole 16-byte vectors

constexpr int ce_gcd(int a, int b) { return b == 0 ? a : ce_gcd(b, a % b); }

template <int FB>
struct Geo {
  static constexpr int U = 4 / ce_gcd(FB, 4);  // 32-element chunks per unit
  static constexpr int V = U * FB / 4;         // 16-byte vectors per unit
  static constexpr int E = 32 * U;             // elements per unit
  static constexpr int R = V == 1 ? 4 : (V <= 3 ? 2 : 1);  // rows per warp
  static constexpr uint32_t kMask = (1u << FB) - 1u;
};

struct Gemv2Params {
  const void* x;         // [M, K], dtype x_dtype
  const uint4* w;        // [N, K * FB / 128] 16-byte vectors
  const float* bias;     // [N] float32 or null
  void* out;             // [M, N] in out_dtype (S == 1)
  float* partial;        // [S, M, N] float32 (S > 1)
  int* bad;              // non-finite flag or null
  int64_t N, K, KS;      // rows, row length, slice length (multiple of 128)
  int64_t vec_per_row;   // K * FB / 128
  int M, S;
  int x_dtype;           // 0 float32, 1 float16, 2 bfloat16
  int out_dtype;         // same coding
  ThresholdArgs thr;     // activations
  LevelArgs lv;          // activations
  Lut256 wl;             // weight field -> signed level
};

int dtype_code(at::ScalarType t) {
  return t == at::kFloat ? 0 : (t == at::kHalf ? 1 : 2);
}

__device__ __forceinline__ float load_x(const void* p, int dt, int64_t i) {
  if (dt == 0) return __ldg(static_cast<const float*>(p) + i);
  if (dt == 1) return static_cast<float>(static_cast<const at::Half*>(p)[i]);
  return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
}

__device__ __forceinline__ void store_out(void* p, int dt, int64_t i, float v) {
  if (dt == 0) static_cast<float*>(p)[i] = v;
  else if (dt == 1) static_cast<at::Half*>(p)[i] = static_cast<at::Half>(v);
  else static_cast<at::BFloat16*>(p)[i] = static_cast<at::BFloat16>(v);
}

// Streaming 16-byte load of read-once weights.
template <bool NO_L1>
__device__ __forceinline__ uint4 ld_weights(const uint4* p, uint64_t policy) {
  uint4 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (NO_L1) {
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "l"(policy));
  } else {
    asm("ld.global.nc.L1::evict_first.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "l"(policy));
  }
#else
  (void)policy;
  v = __ldg(p);
#endif
  return v;
}

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
#endif
  return pol;
}

// Shared-memory position of element k of a slice (see the file comment).
template <int U>
__device__ __forceinline__ int x_phys(int k) {
  const int c = k >> 5, t = k & 31;
  return (c << 5) | ((((t >> 2) ^ ((c / U) & 7)) << 2) | (t & 3));
}

__device__ __forceinline__ float fake_quant(float v, const float* thr, int n_thr,
                                            const float* lv) {
  if (v == 0.f || !finite_f32(v)) return v == 0.f ? 0.f : v;
  const float l = lv[biased_exponent(fabsf(v), thr, n_thr)];
  return v < 0.f ? -l : l;
}

template <int FB>
__device__ __forceinline__ void load_unit(uint4 (&dst)[Geo<FB>::R][Geo<FB>::V],
                                          const uint4* (&rows)[Geo<FB>::R],
                                          int u, uint64_t pol) {
  constexpr int V = Geo<FB>::V;
#pragma unroll
  for (int r = 0; r < Geo<FB>::R; ++r) {
#pragma unroll
    for (int v = 0; v < V; ++v) dst[r][v] = ld_weights<V == 1>(rows[r] + u * V + v, pol);
  }
}

template <int FB, int MMAX>
__global__ void __launch_bounds__(kG2Threads, 1)
    gemv2_kernel(const __grid_constant__ Gemv2Params p) {
  using G = Geo<FB>;
  constexpr int U = G::U, V = G::V, R = G::R, E = G::E;
  extern __shared__ __align__(16) float xs[];  // [M][KS], permuted
  __shared__ float s_thr[kMaxThresholds];
  __shared__ float s_lv[kMaxLevels + 1];
  __shared__ float s_lut[1 << FB];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int M = p.M;
  const int s = blockIdx.y;
  const int64_t k0 = static_cast<int64_t>(s) * p.KS;
  const int ks = static_cast<int>(min(p.KS, p.K - k0));  // multiple of 128
  const int nu = ks / E;                                  // units in the slice
  const int64_t rows_per_group = static_cast<int64_t>(kG2Warps) * R;
  const int64_t ngroups = (p.N + rows_per_group - 1) / rows_per_group;
  const uint64_t pol = evict_first_policy();
  const int64_t vec0 = k0 / kG2KAlign * FB;  // first vector of the slice in a row

  // First row group's pointers and first unit: issued before the prologue.
  int64_t gi = blockIdx.x;
  const uint4* rows[R];
  auto set_rows = [&](int64_t g) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      int64_t n = g * rows_per_group + warp * R + r;
      n = n < p.N ? n : p.N - 1;  // clamp: the result is discarded
      rows[r] = p.w + n * p.vec_per_row + vec0;
    }
  };
  uint4 cur[R][V];
  if (gi < ngroups) {
    set_rows(gi);
    if (lane < nu) load_unit<FB>(cur, rows, lane, pol);
  }

  // Prologue: tables, then x_hat of the slice.
  for (int i = threadIdx.x; i < p.thr.n_thr; i += blockDim.x) s_thr[i] = p.thr.thr[i];
  for (int i = threadIdx.x; i <= kMaxLevels; i += blockDim.x) s_lv[i] = p.lv.lv[i];
  for (int i = threadIdx.x; i < (1 << FB); i += blockDim.x) s_lut[i] = p.wl.v[i];
  __syncthreads();
  {
    bool bad = false;
    const int n_thr = p.thr.n_thr;
    for (int m = 0; m < M; ++m) {
      const int64_t base = static_cast<int64_t>(m) * p.K + k0;
      float* xm = xs + static_cast<int64_t>(m) * ks;
      for (int k = threadIdx.x; k < ks; k += blockDim.x) {
        const float v = load_x(p.x, p.x_dtype, base + k);
        bad |= !finite_f32(v);
        xm[x_phys<U>(k)] = fake_quant(v, s_thr, n_thr, s_lv);
      }
    }
    if (bad && p.bad != nullptr && blockIdx.x == 0) atomicOr(p.bad, 1);
  }
  __syncthreads();

  for (; gi < ngroups; gi += gridDim.x) {
    float acc[R][MMAX];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int m = 0; m < MMAX; ++m) acc[r][m] = 0.f;
    }
    for (int u = lane; u < nu; u += 32) {
      uint4 nxt[R][V];
      const bool more = u + 32 < nu;
      if (more) load_unit<FB>(nxt, rows, u + 32, pol);
      const int key = u & 7;
#pragma unroll
      for (int cc = 0; cc < U; ++cc) {
        const int c = u * U + cc;
#pragma unroll
        for (int g = 0; g < 8; ++g) {
          float4 xv[MMAX];
#pragma unroll
          for (int m = 0; m < MMAX; ++m) {
            if (m < M) {
              xv[m] = *reinterpret_cast<const float4*>(
                  xs + static_cast<int64_t>(m) * ks + (c << 5) + ((g ^ key) << 2));
            }
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint32_t* wd = reinterpret_cast<const uint32_t*>(&cur[r][0]);
            float wv[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              constexpr int kBitsPerChunk = 32 * FB;
              const int bit = cc * kBitsPerChunk + (4 * g + j) * FB;  // constant
              const int wi = bit >> 5, sh = bit & 31;
              uint32_t f = wd[wi] >> sh;
              if (sh + FB > 32) f |= wd[wi + 1] << (32 - sh);
              wv[j] = s_lut[f & G::kMask];
            }
#pragma unroll
            for (int m = 0; m < MMAX; ++m) {
              if (m < M) {
                float a = acc[r][m];
                a = fmaf(wv[0], xv[m].x, a);
                a = fmaf(wv[1], xv[m].y, a);
                a = fmaf(wv[2], xv[m].z, a);
                a = fmaf(wv[3], xv[m].w, a);
                acc[r][m] = a;
              }
            }
          }
        }
      }
      if (more) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int v = 0; v < V; ++v) cur[r][v] = nxt[r][v];
        }
      }
    }
    // Reduce over the warp and write this group's rows.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = gi * rows_per_group + warp * R + r;
#pragma unroll
      for (int m = 0; m < MMAX; ++m) {
        if (m < M) {
          float v = acc[r][m];
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
          if (lane == 0 && n < p.N) {
            if (p.S == 1) {
              if (p.bias != nullptr) v += p.bias[n];
              store_out(p.out, p.out_dtype, static_cast<int64_t>(m) * p.N + n, v);
            } else {
              p.partial[(static_cast<int64_t>(s) * M + m) * p.N + n] = v;
            }
          }
        }
      }
    }
    const int64_t gn = gi + gridDim.x;
    if (gn < ngroups) {
      set_rows(gn);
      if (lane < nu) load_unit<FB>(cur, rows, lane, pol);
    }
  }
}

// out[m, n] = sum over slices s = 0, 1, ... of partial[s, m, n] (+ bias[n]).
__global__ void __launch_bounds__(kThreads)
    splitk_sum_kernel(const float* __restrict__ partial, int S, int64_t MN, int64_t N,
                      const float* __restrict__ bias, void* out, int out_dtype) {
  for (int64_t i = global_thread(); i < MN; i += grid_threads()) {
    float v = 0.f;
    for (int s = 0; s < S; ++s) v += partial[s * MN + i];
    if (bias != nullptr) v += bias[i % N];
    store_out(out, out_dtype, i, v);
  }
}

// Kernel parameter blocks of recent tables, per thread (a call with the
// same layer parameters as one of the last kCacheSize calls copies a
// prepared block instead of converting the tables).
struct TableKey {
  ExpTables ta, tw;
  bool w_signed;
};
struct TableEntry {
  bool used = false;
  TableKey key;
  ThresholdArgs thr;
  LevelArgs lv;
  Lut256 wl;
};
constexpr int kCacheSize = 8;

bool same_tables(const TableKey& k, const ExpTables& ta, const ExpTables& tw, bool ws) {
  auto same = [](const ExpTables& a, const ExpTables& b) {
    return a.bits == b.bits && a.n_thr == b.n_thr &&
           std::memcmp(a.thresholds, b.thresholds, sizeof(float) * a.n_thr) == 0 &&
           std::memcmp(a.levels, b.levels, sizeof(a.levels)) == 0;
  };
  return k.w_signed == ws && same(k.ta, ta) && same(k.tw, tw);
}

const TableEntry& cached_tables(const ExpTables& ta, const ExpTables& tw, bool w_signed) {
  thread_local TableEntry cache[kCacheSize];
  thread_local int next = 0;
  for (const TableEntry& e : cache) {
    if (e.used && same_tables(e.key, ta, tw, w_signed)) return e;
  }
  TableEntry& e = cache[next];
  next = (next + 1) % kCacheSize;
  e.used = true;
  e.key.ta = ta;
  e.key.tw = tw;
  e.key.w_signed = w_signed;
  e.thr = threshold_args(ta);
  e.lv = level_args(ta);
  e.wl = field_lut(tw, w_signed);
  return e;
}

// Resident blocks per SM of one kernel instantiation at a dynamic smem size
// (cached: one occupancy query per instantiation and size).
int blocks_per_sm(const void* fn, int smem) {
  struct Slot { const void* fn; int smem, dev, blocks; };
  thread_local Slot slots[32] = {};
  thread_local int next = 0;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  for (const Slot& sl : slots) {
    if (sl.fn == fn && sl.smem == smem && sl.dev == dev) return sl.blocks;
  }
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kG2SmemBytes));
  }
  int b = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, fn, kG2Threads, smem));
  Slot& sl = slots[next];
  next = (next + 1) % 32;
  sl = Slot{fn, smem, dev, std::max(1, b)};
  return sl.blocks;
}

template <int FB, int MMAX>
void launch_fb_m(Gemv2Params& p, const at::TensorOptions& opts, at::Tensor& partial) {
  using G = Geo<FB>;
  const void* fn = reinterpret_cast<const void*>(&gemv2_kernel<FB, MMAX>);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t rows_per_group = static_cast<int64_t>(kG2Warps) * G::R;
  const int64_t ngroups = (p.N + rows_per_group - 1) / rows_per_group;
  // Slice: at most the smem budget; split further when the row groups would
  // keep fewer than half of the SMs busy, never below 512 elements.
  const int64_t ks_max = std::max<int64_t>(
      kG2KAlign, kG2SmemBytes / (4 * p.M) / kG2KAlign * kG2KAlign);
  int64_t S = (p.K + ks_max - 1) / ks_max;
  if (2 * ngroups * S <= sms) {
    const int64_t want = (sms + ngroups - 1) / ngroups;
    S = std::max<int64_t>(S, std::min<int64_t>(want, std::max<int64_t>(1, p.K / 512)));
  }
  int64_t KS = (p.K + S - 1) / S;
  KS = (KS + kG2KAlign - 1) / kG2KAlign * kG2KAlign;
  S = (p.K + KS - 1) / KS;
  p.KS = KS;
  p.S = static_cast<int>(S);
  const int smem = static_cast<int>(p.M * KS * 4);
  const int64_t resident = static_cast<int64_t>(blocks_per_sm(fn, smem)) * sms;
  const int64_t gx = std::max<int64_t>(
      1, std::min<int64_t>(ngroups, (resident + S - 1) / S));
  if (S > 1) {
    partial = at::empty({S, p.M, p.N}, opts.dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  gemv2_kernel<FB, MMAX><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(S)),
                           kG2Threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int FB>
void launch_fb(Gemv2Params& p, const at::TensorOptions& opts, at::Tensor& partial) {
  if (p.M == 1) return launch_fb_m<FB, 1>(p, opts, partial);
  if (p.M == 2) return launch_fb_m<FB, 2>(p, opts, partial);
  if (p.M <= 4) return launch_fb_m<FB, 4>(p, opts, partial);
  return launch_fb_m<FB, 8>(p, opts, partial);
}

}  // namespace

bool gemv2_eligible(const at::Tensor& x, const at::Tensor& w_packed, int64_t M,
                    int64_t N, int64_t K, int64_t bits, bool w_signed) {
  if (M < 1 || M > kGemv2MaxRows || N < 1 || K < kG2KAlign || K % kG2KAlign != 0) {
    return false;
  }
  if (bits < kMinBits || bits > kMaxBits) return false;
  if (!is_supported_float(x.scalar_type()) || !x.is_cuda()) return false;
  if (!w_packed.is_cuda() || w_packed.scalar_type() != at::kByte || w_packed.dim() != 2 ||
      !w_packed.is_contiguous() || w_packed.size(0) != N ||
      w_packed.size(1) != packed_row_bytes(K, static_cast<int>(bits), w_signed)) {
    return false;
  }
  return aligned_to(w_packed.const_data_ptr(), 16);
}

at::Tensor gemv2(const at::Tensor& x_in, const at::Tensor& w_packed, int64_t M,
                 int64_t N, int64_t K, const LutArgs& A, bool w_signed) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  const TableEntry& t = cached_tables(A.ta, A.tw, w_signed);
  FiniteCheck finite(x);
  Gemv2Params p;
  p.x = x.const_data_ptr();
  p.w = reinterpret_cast<const uint4*>(w_packed.const_data_ptr<uint8_t>());
  p.bias = A.bias.defined() ? A.bias.const_data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.partial = nullptr;
  p.bad = finite.ptr();
  p.N = N;
  p.K = K;
  p.KS = K;
  const int fb = packed_field_bits(A.tw.bits, w_signed);
  p.vec_per_row = K / kG2KAlign * fb;
  p.M = static_cast<int>(M);
  p.S = 1;
  p.x_dtype = dtype_code(x.scalar_type());
  p.out_dtype = p.x_dtype;
  p.thr = t.thr;
  p.lv = t.lv;
  p.wl = t.wl;
  at::Tensor partial;
  switch (fb) {
    case 2: launch_fb<2>(p, x.options(), partial); break;
    case 3: launch_fb<3>(p, x.options(), partial); break;
    case 4: launch_fb<4>(p, x.options(), partial); break;
    case 5: launch_fb<5>(p, x.options(), partial); break;
    case 6: launch_fb<6>(p, x.options(), partial); break;
    case 7: launch_fb<7>(p, x.options(), partial); break;
    case 8: launch_fb<8>(p, x.options(), partial); break;
    default: TORCH_CHECK(false, "dnateq: internal error: packed field bits ", fb);
  }
  if (p.S > 1) {
    const int64_t MN = M * N;
    splitk_sum_kernel<<<grid_for(MN, kThreads), kThreads, 0,
                        at::cuda::getCurrentCUDAStream()>>>(
        p.partial, p.S, MN, N, p.bias, p.out, p.out_dtype);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finite.check("x");
  return out;
}

at::Tensor bf16x3_linear(const at::Tensor& xq, const at::Tensor& wq,
                         const at::Tensor& bias) {
  auto split = [](const at::Tensor& v, bool hi_twice) {
    const at::Tensor hi = v.to(at::kBFloat16);
    const at::Tensor lo = (v - hi.to(at::kFloat)).to(at::kBFloat16);  // v - hi is exact
    return hi_twice ? at::cat({hi, hi, lo}, 1) : at::cat({hi, lo, hi}, 1);
  };
  // [M, 3K] = [xh | xh | xl], [N, 3K] = [wh | wl | wh]: one GEMM over 3K
  // gives xh*wh + xh*wl + xl*wh, accumulated and returned in float32.
  at::Tensor y = at::mm(split(xq, true), split(wq, false).t(), at::kFloat);
  if (bias.defined()) y.add_(bias);
  return y;
}

}  // namespace detail
}  // namespace cuda
}  // namespace dnateq
