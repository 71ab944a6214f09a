// exp_error and exp_fit on CUDA.
//
// exp_error: the magnitudes |x| (as float32 bit patterns, which sort like the
// values since they are non-negative) are computed and checked for NaN/Inf on
// the device, sorted with cub::DeviceRadixSort, copied to the host, and the
// nonzero ones handed to dnateq::cpu::SortedMagnitudes, whose exact
// prefix-sum error (SPEC section 2) is the CPU's own: the two backends return
// the same double bit for bit (the sorted sequence is unique, and the
// prefix sums and per-bin sums are then computed by the same code).
//
// exp_fit: copies x to the CPU and calls dnateq::cpu::exp_fit. The fit is a
// sequence of O(2^n log N) error evaluations over the sorted magnitudes,
// host-side work either way; this gives the CPU's parameters exactly, with
// the same argument checks in the same order.
#include <cub/device/device_radix_sort.cuh>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fit/magnitudes.h"
#include "common/cuda_common.cuh"
#include "fit/front.h"

namespace dnateq {
namespace cuda {
namespace detail {
namespace {

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    magnitude_bits_kernel(const T* __restrict__ x, uint32_t* __restrict__ out,
                          int64_t n, int* __restrict__ bad_flag) {
  bool bad = false;
  elementwise<VEC>(x, out, n, [&](float v) -> uint32_t {
    bad |= !finite_f32(v);
    return __float_as_uint(fabsf(v));
  });
  if (bad) atomicOr(bad_flag, 1);
}

template <typename T>
void launch_magnitude_bits(const at::Tensor& x, at::Tensor& out, int* flag) {
  const int64_t n = x.numel();
  const T* xp = x.const_data_ptr<T>();
  uint32_t* op = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int VEC = 4;
  if (aligned_to(xp, VEC * sizeof(T)) && aligned_to(op, VEC * sizeof(uint32_t))) {
    const int64_t grid = grid_for((n + VEC - 1) / VEC, kThreads);
    magnitude_bits_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(xp, op, n, flag);
  } else {
    const int64_t grid = grid_for(n, kThreads);
    magnitude_bits_kernel<T, 1><<<grid, kThreads, 0, stream>>>(xp, op, n, flag);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sorted nonzero magnitudes of x (on the host); throws on NaN/Inf with the
// CPU's message.
std::vector<float> sorted_magnitudes(const at::Tensor& x_in, const char* arg) {
  check_float_input(x_in, arg);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  if (n == 0) return {};
  DeviceFlag bad(x);
  at::Tensor keys = at::empty({n}, x.options().dtype(at::kInt));
  DNATEQ_DISPATCH_FLOAT(x.scalar_type(), T, [&] {
    launch_magnitude_bits<T>(x, keys, bad.ptr());
  });
  TORCH_CHECK(bad.value() == 0, "dnateq: ", arg,
              " contains non-finite values (NaN or Inf)");
  at::Tensor sorted = at::empty_like(keys);
  const uint32_t* kin = reinterpret_cast<const uint32_t*>(keys.const_data_ptr<int32_t>());
  uint32_t* kout = reinterpret_cast<uint32_t*>(sorted.data_ptr<int32_t>());
  auto stream = at::cuda::getCurrentCUDAStream();
  // Bit 31 (the sign) is 0 for every key: sort bits [0, 31).
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, temp_bytes, kin, kout, n,
                                                0, 31, stream.stream()));
  at::Tensor temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))},
                              x.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(temp.data_ptr(), temp_bytes, kin,
                                                kout, n, 0, 31, stream.stream()));
  const at::Tensor host = sorted.to(at::kCPU);  // synchronizes
  const uint32_t* h = reinterpret_cast<const uint32_t*>(host.const_data_ptr<int32_t>());
  // Zeros (bit pattern 0: fabs maps -0.0 to +0.0) come first.
  const int64_t z = std::upper_bound(h, h + n, 0u) - h;
  std::vector<float> m(static_cast<size_t>(n - z));
  if (!m.empty()) std::memcpy(m.data(), h + z, m.size() * sizeof(float));
  return m;
}

}  // namespace
}  // namespace detail

}  // namespace cuda

double run_cuda(const ErrorPlan& p) {
  const c10::cuda::CUDAGuard guard(p.device);
  return cpu::SortedMagnitudes(cuda::detail::sorted_magnitudes(p.x, "x")).rmae(p.t);
}

std::tuple<double, double, double, double> run_cuda(const FitPlan& p) {
  FitPlan host = p;
  host.device = at::kCPU;
  host.x = p.x.to(at::kCPU);
  return run_cpu(host);
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CUDA, m) {
  m.impl("exp_fit", &dnateq::exp_fit);
  m.impl("exp_error", &dnateq::exp_error);
}
