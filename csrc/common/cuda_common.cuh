// Helpers shared by the CUDA kernels of dnateq (csrc/<family>/cuda.cu). Not a public
// API. The format math itself comes from csrc/format.h (host + device), the
// argument checks from csrc/checks.h, so that messages and codes are the same
// on every backend.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "format.h"

namespace dnateq {
namespace cuda {
namespace detail {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------
// Tables passed by value as kernel parameters (a few hundred bytes to ~1.5 KB,
// well under the 4 KB parameter limit) and copied to shared memory by each
// block. Passing by value keeps launches stream-ordered with no H2D copies.

// Sorted float32 thresholds of one quantizer (make_tables, SPEC section 1).
struct ThresholdArgs {
  float thr[kMaxThresholds];
  int n_thr;
};

// Float32 levels indexed by biased exponent (levels[0] = 0).
struct LevelArgs {
  float lv[kMaxLevels + 1];
};

// A 256-entry float table indexed by a code byte or by a packed field.
struct Lut256 {
  float v[256];
};

inline ThresholdArgs threshold_args(const ExpTables& t) {
  ThresholdArgs a;
  for (int k = 0; k < kMaxThresholds; ++k) {
    a.thr[k] = k < t.n_thr ? t.thresholds[k] : 0.f;
  }
  a.n_thr = t.n_thr;
  return a;
}

inline LevelArgs level_args(const ExpTables& t) {
  LevelArgs a;
  const int nl = num_levels(t.bits);
  for (int b = 0; b <= kMaxLevels; ++b) a.lv[b] = b <= nl ? t.levels[b] : 0.f;
  return a;
}

// Field -> signed float level of a packed tensor (format.h field_values).
inline Lut256 field_lut(const ExpTables& t, bool is_signed) {
  Lut256 l;
  field_values(t, is_signed, l.v);
  return l;
}

// ---------------------------------------------------------------------------
// Launch geometry: grid-stride loops with a grid capped at a few waves.

inline int64_t grid_for(int64_t items, int threads, int blocks_per_sm = 8) {
  const int64_t blocks = (items + threads - 1) / threads;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(
      1, std::min<int64_t>(blocks, static_cast<int64_t>(sms) * blocks_per_sm));
}

__host__ __device__ inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// A device int for error flags (atomicOr from the kernels); reading it is the
// one host synchronization of an operator that validates its data.
class DeviceFlag {
 public:
  explicit DeviceFlag(const at::Tensor& like)
      : t_(at::zeros({1}, like.options().dtype(at::kInt))) {}
  int* ptr() { return t_.data_ptr<int>(); }
  int value() const { return t_.item<int>(); }  // synchronizes the stream

 private:
  at::Tensor t_;
};

// Non-finite check of the LUT ops (SPEC section 1; the CPU always raises):
// the kernel that reads x sets the flag, and check() reads it once after the
// launches (one host synchronization) and raises with the CPU's message.
// While the current stream is being captured into a CUDA graph the flag
// cannot be read: ptr() is then null, the kernels skip the flag, and the
// captured op does not check (the eager calls before capture did).
class FiniteCheck {
 public:
  explicit FiniteCheck(const at::Tensor& like) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &st));
    if (st == cudaStreamCaptureStatusNone) {
      t_ = at::zeros({1}, like.options().dtype(at::kInt));
    }
  }
  int* ptr() { return t_.defined() ? t_.data_ptr<int>() : nullptr; }
  void check(const char* arg) const {
    if (!t_.defined()) return;
    TORCH_CHECK(t_.item<int>() == 0, "dnateq: ", arg,
                " contains non-finite values (NaN or Inf)");
  }

 private:
  at::Tensor t_;
};

// ---------------------------------------------------------------------------
// Device helpers.

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// NaN and +-Inf have an all-ones exponent field.
__device__ __forceinline__ bool finite_f32(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v) {
  return static_cast<T>(v);
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Elementwise loop over n elements, VEC per thread and iteration when the
// caller has checked alignment (in: VEC*sizeof(Tin) bytes, out:
// VEC*sizeof(Tout) bytes), then a scalar tail. f(float) -> Tout.
template <int VEC, typename Tin, typename Tout, typename F>
__device__ __forceinline__ void elementwise(const Tin* __restrict__ in,
                                            Tout* __restrict__ out, int64_t n,
                                            F f) {
  const int64_t nvec = n / VEC;
  const int64_t stride = grid_threads();
  for (int64_t v = global_thread(); v < nvec; v += stride) {
    const Vec<Tin, VEC> x = reinterpret_cast<const Vec<Tin, VEC>*>(in)[v];
    Vec<Tout, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = f(to_f32(x.v[j]));
    reinterpret_cast<Vec<Tout, VEC>*>(out)[v] = y;
  }
  for (int64_t i = nvec * VEC + global_thread(); i < n; i += stride) {
    out[i] = f(to_f32(in[i]));
  }
}

// Dispatch over the three supported float dtypes.
#define DNATEQ_DISPATCH_FLOAT(TYPE, NAME, ...)                              \
  [&] {                                                                     \
    switch (TYPE) {                                                         \
      case at::kFloat: { using NAME = float; return __VA_ARGS__(); }        \
      case at::kHalf: { using NAME = at::Half; return __VA_ARGS__(); }      \
      case at::kBFloat16: { using NAME = at::BFloat16; return __VA_ARGS__(); } \
      default:                                                              \
        TORCH_CHECK(false, "dnateq: unsupported dtype ", TYPE);             \
    }                                                                       \
  }()

// ---------------------------------------------------------------------------
// Host functions shared between the .cu files.

// Contiguous packed rows whose base is 4-byte aligned (the kernels read
// 32-bit words); copies only when the input is a misaligned view.
at::Tensor aligned_packed(const at::Tensor& packed);

// Quantize-dequantize ("fake quant") of a float tensor through the tables:
// out = sign(x) * levels[biased(|x|)] (0 for x == 0), in dtype out_dtype.
// Non-finite values pass through unchanged and, when bad_flag is given, set
// it (atomicOr 1): the caller reads the flag (FiniteCheck) and raises as the
// CPU does. The result keeps x's dense layout (contiguous or channels-last).
at::Tensor fake_quantize(const at::Tensor& x, const ExpTables& t,
                         at::ScalarType out_dtype, int* bad_flag = nullptr);

// Fake quant of x viewed as [M, K] into a zero-padded float32 [M, Kp]
// buffer (Kp = K rounded up to 32), for the fused GEMV; bad_flag as above.
at::Tensor fake_quantize_padded_f32(const at::Tensor& x, const ExpTables& t,
                                    int64_t M, int64_t K, int64_t Kp,
                                    int* bad_flag = nullptr);

// Unpack + dequantize packed rows [rows, row_bytes] to [rows, K] in dtype.
at::Tensor decode_packed(const at::Tensor& packed, int64_t rows, int64_t K,
                         const ExpTables& t, bool is_signed,
                         at::ScalarType dtype);

}  // namespace detail
}  // namespace cuda
}  // namespace dnateq
