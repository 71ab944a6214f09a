// exp_quantize / exp_dequantize on CUDA (run_cuda of the plans of
// quantize/front.h), and the fake-quant kernels used by the LUT operators. Codes are decided by dnateq::encode (csrc/format.h) on
// float32 thresholds computed on the host by make_tables, so CPU and CUDA
// agree bit for bit.
#include <torch/library.h>

#include "common/cuda_common.cuh"
#include "quantize/front.h"

namespace dnateq {
namespace cuda {
namespace detail {
namespace {

// --- exp_quantize ----------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const T* __restrict__ x, int8_t* __restrict__ out,
                    int64_t n, ThresholdArgs thr, int* __restrict__ bad_flag) {
  __shared__ float s_thr[kMaxThresholds];
  for (int i = threadIdx.x; i < thr.n_thr; i += blockDim.x) s_thr[i] = thr.thr[i];
  __syncthreads();
  const int n_thr = thr.n_thr;
  bool bad = false;
  elementwise<VEC>(x, out, n, [&](float v) -> int8_t {
    bad |= !finite_f32(v);
    return static_cast<int8_t>(encode(v, s_thr, n_thr));
  });
  if (bad_flag != nullptr && bad) atomicOr(bad_flag, 1);
}

template <typename T>
void launch_quantize(const at::Tensor& x, at::Tensor& out,
                     const ThresholdArgs& thr, int* bad_flag) {
  const int64_t n = x.numel();
  const T* xp = x.const_data_ptr<T>();
  int8_t* op = out.data_ptr<int8_t>();
  constexpr int VEC = 16 / sizeof(T);  // 16-byte loads: 4 floats, 8 halves
  auto stream = at::cuda::getCurrentCUDAStream();
  if (aligned_to(xp, 16) && aligned_to(op, VEC)) {
    const int64_t grid = grid_for((n + VEC - 1) / VEC, kThreads);
    quantize_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(xp, op, n, thr, bad_flag);
  } else {
    const int64_t grid = grid_for(n, kThreads);
    quantize_kernel<T, 1><<<grid, kThreads, 0, stream>>>(xp, op, n, thr, bad_flag);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --- exp_dequantize --------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ codes, T* __restrict__ out,
                      int64_t n, Lut256 lut, int max_mag,
                      int* __restrict__ bad_flag) {
  __shared__ float s_lut[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s_lut[i] = lut.v[i];
  __syncthreads();
  bool bad = false;
  const int64_t nvec = n / VEC;
  const int64_t stride = grid_threads();
  for (int64_t v = global_thread(); v < nvec; v += stride) {
    const Vec<uint8_t, VEC> c = reinterpret_cast<const Vec<uint8_t, VEC>*>(codes)[v];
    Vec<T, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      bad |= (c.v[j] & kMagMask) > max_mag;
      y.v[j] = from_f32<T>(s_lut[c.v[j]]);
    }
    reinterpret_cast<Vec<T, VEC>*>(out)[v] = y;
  }
  for (int64_t i = nvec * VEC + global_thread(); i < n; i += stride) {
    const uint8_t c = codes[i];
    bad |= (c & kMagMask) > max_mag;
    out[i] = from_f32<T>(s_lut[c]);
  }
  if (bad) atomicOr(bad_flag, 1);
}

template <typename T>
void launch_dequantize(const at::Tensor& codes, at::Tensor& out,
                       const Lut256& lut, int max_mag, int* bad_flag) {
  const int64_t n = codes.numel();
  const uint8_t* cp = reinterpret_cast<const uint8_t*>(codes.const_data_ptr<int8_t>());
  T* op = out.data_ptr<T>();
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int VEC = 4;
  if (aligned_to(cp, VEC) && aligned_to(op, VEC * sizeof(T))) {
    const int64_t grid = grid_for((n + VEC - 1) / VEC, kThreads);
    dequantize_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(cp, op, n, lut, max_mag, bad_flag);
  } else {
    const int64_t grid = grid_for(n, kThreads);
    dequantize_kernel<T, 1><<<grid, kThreads, 0, stream>>>(cp, op, n, lut, max_mag, bad_flag);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --- fake quant (LUT operators) --------------------------------------------

// Same arithmetic as dnateq::cpu::detail::fake_quantize_block: 0 -> 0,
// otherwise sign(x) * levels[biased(|x|)], float32 level then cast to Tout.
// Non-finite values pass through.
__device__ __forceinline__ float fake_quant_one(float v, const float* thr,
                                                int n_thr, const float* lv) {
  if (!finite_f32(v)) return v;
  if (v == 0.f) return 0.f;
  const float l = lv[biased_exponent(fabsf(v), thr, n_thr)];
  return v < 0.f ? -l : l;
}

template <typename Tin, typename Tout, int VEC>
__global__ void __launch_bounds__(kThreads)
    fake_quant_kernel(const Tin* __restrict__ x, Tout* __restrict__ out,
                      int64_t n, ThresholdArgs thr, LevelArgs levels,
                      int* __restrict__ bad_flag) {
  __shared__ float s_thr[kMaxThresholds];
  __shared__ float s_lv[kMaxLevels + 1];
  for (int i = threadIdx.x; i < thr.n_thr; i += blockDim.x) s_thr[i] = thr.thr[i];
  for (int i = threadIdx.x; i <= kMaxLevels; i += blockDim.x) s_lv[i] = levels.lv[i];
  __syncthreads();
  const int n_thr = thr.n_thr;
  bool bad = false;
  elementwise<VEC>(x, out, n, [&](float v) -> Tout {
    bad |= !finite_f32(v);
    return from_f32<Tout>(fake_quant_one(v, s_thr, n_thr, s_lv));
  });
  if (bad_flag != nullptr && bad) atomicOr(bad_flag, 1);
}

// x viewed as [M, K] -> float32 [M, Kp], columns K..Kp-1 zero.
template <typename Tin>
__global__ void __launch_bounds__(kThreads)
    fake_quant_padded_kernel(const Tin* __restrict__ x, float* __restrict__ out,
                             int64_t M, int64_t K, int64_t Kp,
                             ThresholdArgs thr, LevelArgs levels,
                             int* __restrict__ bad_flag) {
  __shared__ float s_thr[kMaxThresholds];
  __shared__ float s_lv[kMaxLevels + 1];
  for (int i = threadIdx.x; i < thr.n_thr; i += blockDim.x) s_thr[i] = thr.thr[i];
  for (int i = threadIdx.x; i <= kMaxLevels; i += blockDim.x) s_lv[i] = levels.lv[i];
  __syncthreads();
  const int64_t total = M * Kp;
  bool bad = false;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t m = i / Kp, k = i - m * Kp;
    float v = 0.f;
    if (k < K) {
      const float xv = to_f32(x[m * K + k]);
      bad |= !finite_f32(xv);
      v = fake_quant_one(xv, s_thr, thr.n_thr, s_lv);
    }
    out[i] = v;
  }
  if (bad_flag != nullptr && bad) atomicOr(bad_flag, 1);
}

template <typename Tin, typename Tout>
void launch_fake_quant(const at::Tensor& x, at::Tensor& out,
                       const ThresholdArgs& thr, const LevelArgs& lv, int* bad_flag) {
  const int64_t n = x.numel();
  const Tin* xp = x.const_data_ptr<Tin>();
  Tout* op = out.data_ptr<Tout>();
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int VEC = 4;
  if (aligned_to(xp, VEC * sizeof(Tin)) && aligned_to(op, VEC * sizeof(Tout))) {
    const int64_t grid = grid_for((n + VEC - 1) / VEC, kThreads);
    fake_quant_kernel<Tin, Tout, VEC><<<grid, kThreads, 0, stream>>>(xp, op, n, thr, lv,
                                                                     bad_flag);
  } else {
    const int64_t grid = grid_for(n, kThreads);
    fake_quant_kernel<Tin, Tout, 1><<<grid, kThreads, 0, stream>>>(xp, op, n, thr, lv,
                                                                   bad_flag);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


}  // namespace

at::Tensor fake_quantize(const at::Tensor& x_in, const ExpTables& t,
                         at::ScalarType out_dtype, int* bad_flag) {
  // Keep a dense channels-last input in its layout (cuDNN prefers it).
  const at::Tensor x = x_in.contiguous(x_in.suggest_memory_format());
  at::Tensor out = at::empty_like(x, x.options().dtype(out_dtype));
  if (x.numel() == 0) return out;
  const ThresholdArgs thr = threshold_args(t);
  const LevelArgs lv = level_args(t);
  DNATEQ_DISPATCH_FLOAT(x.scalar_type(), Tin, [&] {
    DNATEQ_DISPATCH_FLOAT(out_dtype, Tout, [&] {
      launch_fake_quant<Tin, Tout>(x, out, thr, lv, bad_flag);
    });
  });
  return out;
}

at::Tensor fake_quantize_padded_f32(const at::Tensor& x_in, const ExpTables& t,
                                    int64_t M, int64_t K, int64_t Kp, int* bad_flag) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({M, Kp}, x.options().dtype(at::kFloat));
  if (M * Kp == 0) return out;
  const ThresholdArgs thr = threshold_args(t);
  const LevelArgs lv = level_args(t);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = grid_for(M * Kp, kThreads);
  DNATEQ_DISPATCH_FLOAT(x.scalar_type(), Tin, [&] {
    fake_quant_padded_kernel<Tin><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<Tin>(), out.data_ptr<float>(), M, K, Kp, thr, lv, bad_flag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace detail

}  // namespace cuda

bool run_cuda(const QuantizePlan& p) {
  namespace d = cuda::detail;
  const c10::cuda::CUDAGuard guard(p.device);
  const d::ThresholdArgs thr = d::threshold_args(p.t);
  if (!p.check_finite) {
    DNATEQ_DISPATCH_FLOAT(p.x.scalar_type(), T, [&] {
      at::Tensor out = p.out;
      d::launch_quantize<T>(p.x, out, thr, nullptr);
    });
    return true;
  }
  d::DeviceFlag bad(p.x);
  DNATEQ_DISPATCH_FLOAT(p.x.scalar_type(), T, [&] {
    at::Tensor out = p.out;
    d::launch_quantize<T>(p.x, out, thr, bad.ptr());
  });
  return bad.value() == 0;
}

bool run_cuda(const DequantizePlan& p) {
  namespace d = cuda::detail;
  // 256-entry table indexed by the code byte, as on the CPU; codes with bits
  // n..6 set read 0 here and are reported.
  d::Lut256 lut;
  code_values(p.t, lut.v);
  const c10::cuda::CUDAGuard guard(p.device);
  d::DeviceFlag bad(p.codes);
  DNATEQ_DISPATCH_FLOAT(p.out.scalar_type(), T, [&] {
    at::Tensor out = p.out;
    d::launch_dequantize<T>(p.codes, out, lut, num_levels(p.t.bits), bad.ptr());
  });
  return bad.value() == 0;
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CUDA, m) {
  m.impl("exp_quantize", &dnateq::exp_quantize);
  m.impl("exp_dequantize", &dnateq::exp_dequantize);
}
