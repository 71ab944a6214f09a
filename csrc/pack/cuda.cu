// exp_pack / exp_unpack on CUDA, and the packed-weight decoder used by the
// LUT operators. Layout (SPEC section 1): d0 rows of K fields of b bits
// (b = n + 1 signed, n unsigned), LSB-first into little-endian 32-bit words,
// each row starting on a 4-byte boundary. CUDA devices are little-endian, so
// a uint32 store writes the word's bytes in the packed order.
#include <torch/library.h>

#include "common/cuda_common.cuh"
#include "pack/front.h"

namespace dnateq {
namespace cuda {
namespace detail {
namespace {

// One thread per output 32-bit word. Word j of a row holds bits
// [32j, 32j + 32): elements floor(32j / b) .. floor((32j + 31) / b), the first
// of which may start in the previous word and the last may continue into the
// next. Also validates each element it reads (flag 1: bits n..6 set; flag 2:
// sign bit in an unsigned tensor), as the CPU does.
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const uint8_t* __restrict__ codes, uint32_t* __restrict__ out,
                int64_t rows, int64_t K, int64_t words_per_row, int bits,
                bool is_signed, int* __restrict__ bad_flag) {
  const int b = packed_field_bits(bits, is_signed);
  const int max_mag = num_levels(bits);
  const int64_t total = rows * words_per_row;
  int bad = 0;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t r = idx / words_per_row;
    const int64_t j = idx - r * words_per_row;
    const int64_t bit0 = 32 * j;
    const int64_t e0 = bit0 / b;
    const int64_t e1 = std::min<int64_t>(K, (bit0 + 31) / b + 1);
    const uint8_t* c = codes + r * K;
    uint32_t word = 0;
    for (int64_t e = e0; e < e1; ++e) {
      const uint8_t code = c[e];
      if ((code & kMagMask) > max_mag) bad |= 1;
      if (!is_signed && (code & kSignBit)) bad |= 2;
      const uint32_t f = code_to_field(code, bits, is_signed);
      const int pos = static_cast<int>(e * b - bit0);  // in (-b, 32)
      word |= pos >= 0 ? (f << pos) : (f >> (-pos));
    }
    out[idx] = word;
  }
  if (bad) atomicOr(bad_flag, bad);
}

// One thread per element: the field of element e starts at bit e*b of its
// row and spans at most two bytes (b <= 8). Reading bytes keeps the kernel
// independent of the row base alignment.
template <typename T, typename F>
__device__ __forceinline__ void unpack_loop(const uint8_t* __restrict__ packed,
                                            T* __restrict__ out, int64_t rows,
                                            int64_t K, int64_t row_bytes, int b,
                                            F f) {
  const int64_t total = rows * K;
  const uint32_t mask = (1u << b) - 1u;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t r = i / K;
    const int64_t e = i - r * K;
    const uint8_t* row = packed + r * row_bytes;
    const int64_t bit = e * b;
    const int64_t byte = bit >> 3;
    const int sh = static_cast<int>(bit & 7);
    uint32_t v = static_cast<uint32_t>(row[byte]) >> sh;
    if (sh + b > 8) v |= static_cast<uint32_t>(row[byte + 1]) << (8 - sh);
    out[i] = f(v & mask);
  }
}

__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const uint8_t* __restrict__ packed, int8_t* __restrict__ out,
                  int64_t rows, int64_t K, int64_t row_bytes, int bits,
                  bool is_signed) {
  const int b = packed_field_bits(bits, is_signed);
  unpack_loop(packed, out, rows, K, row_bytes, b, [&](uint32_t field) {
    return static_cast<int8_t>(field_to_code(field, bits, is_signed));
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const uint8_t* __restrict__ packed, T* __restrict__ out,
                  int64_t rows, int64_t K, int64_t row_bytes, int b,
                  Lut256 lut) {
  __shared__ float s_lut[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s_lut[i] = lut.v[i];
  __syncthreads();
  unpack_loop(packed, out, rows, K, row_bytes, b,
              [&](uint32_t field) { return from_f32<T>(s_lut[field]); });
}

}  // namespace

at::Tensor aligned_packed(const at::Tensor& packed) {
  at::Tensor p = packed.contiguous();
  if (!aligned_to(p.const_data_ptr(), 4)) p = p.clone();  // fresh, aligned
  return p;
}

at::Tensor decode_packed(const at::Tensor& packed_in, int64_t rows, int64_t K,
                         const ExpTables& t, bool is_signed,
                         at::ScalarType dtype) {
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor out = at::empty({rows, K}, packed.options().dtype(dtype));
  if (rows * K == 0) return out;
  const Lut256 lut = field_lut(t, is_signed);
  const int b = packed_field_bits(t.bits, is_signed);
  const int64_t rb = packed.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = grid_for(rows * K, kThreads);
  DNATEQ_DISPATCH_FLOAT(dtype, T, [&] {
    decode_kernel<T><<<grid, kThreads, 0, stream>>>(
        packed.const_data_ptr<uint8_t>(), out.data_ptr<T>(), rows, K, rb, b, lut);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace detail

}  // namespace cuda

int run_cuda(const PackPlan& p) {
  namespace d = cuda::detail;
  const c10::cuda::CUDAGuard guard(p.device);
  const int64_t words_per_row = p.out.size(1) / 4;
  d::DeviceFlag bad(p.codes);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = d::grid_for(p.rows * words_per_row, d::kThreads);
  d::pack_kernel<<<grid, d::kThreads, 0, stream>>>(
      reinterpret_cast<const uint8_t*>(p.codes.const_data_ptr<int8_t>()),
      reinterpret_cast<uint32_t*>(p.out.data_ptr<uint8_t>()), p.rows, p.K, words_per_row,
      static_cast<int>(p.bits), p.is_signed, bad.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bad.value();
}

void run_cuda(const UnpackPlan& p) {
  namespace d = cuda::detail;
  const c10::cuda::CUDAGuard guard(p.device);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = d::grid_for(p.rows * p.K, d::kThreads);
  d::unpack_kernel<<<grid, d::kThreads, 0, stream>>>(
      p.packed.const_data_ptr<uint8_t>(), p.out.data_ptr<int8_t>(), p.rows, p.K,
      p.packed.size(1), static_cast<int>(p.bits), p.is_signed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CUDA, m) {
  m.impl("exp_pack", &dnateq::exp_pack);
  m.impl("exp_unpack", &dnateq::exp_unpack);
}
