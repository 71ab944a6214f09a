// Building blocks shared by the CPU operators: float conversion, the
// vectorizable quantizer, and the packed-row decoder.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#include "format.h"

namespace dnateq {
namespace cpu {
namespace detail {

#if defined(__x86_64__) || defined(_M_X64)
#define DNATEQ_X86 1
// Whether the AVX2 kernels run (compiled with target attributes, so the
// library still loads on CPUs without AVX2): the CPU has AVX2 and FMA and
// DNATEQ_CPU_ISA / dnateq::_cpu_isa did not force the portable kernels
// (fast_lut.h).
bool cpu_has_avx2();
#endif

// Elements processed per inner block (fits the code-count buffer on the stack).
constexpr int64_t kBlock = 256;

// Copies `n` elements of x (float, half or bfloat16) starting at `begin` into
// a float32 buffer. x must be contiguous.
void load_as_float(const at::Tensor& x, int64_t begin, int64_t n, float* out);

// Biased exponents (1 .. 2^n-1) of n magnitudes against the sorted
// thresholds; also reports whether any input was non-finite.
// Vectorized counting for small tables, binary search for large ones.
bool biased_exponents(const float* x, int64_t n, const ExpTables& t,
                      uint8_t* biased);

// x -> int8 codes. Returns false if any element is non-finite.
bool encode_block(const float* x, int64_t n, const ExpTables& t, int8_t* out);

// x -> dequantized levels (quantize then dequantize, fused). Returns false if
// any element is non-finite.
bool fake_quantize_block(const float* x, int64_t n, const ExpTables& t,
                         float* out);

// Whole-tensor fake quantization to a contiguous float32 tensor of x's shape;
// throws (naming `arg`) on non-finite input.
at::Tensor fake_quantize_to_float(const at::Tensor& x, const ExpTables& t,
                                  const char* arg);

// 32 fields of B bits fill exactly B words: decodes one such group with
// compile-time shifts (fully unrolled). `words` holds B words plus one zero.
template <int B, typename T>
inline void decode_group(const uint32_t* words, const T* lut, T* out) {
  constexpr uint64_t mask = (uint64_t{1} << B) - 1;
#pragma GCC unroll 32
  for (int i = 0; i < 32; ++i) {
    const int bit = i * B, wi = bit >> 5, off = bit & 31;
    const uint64_t v = words[wi] | (static_cast<uint64_t>(words[wi + 1]) << 32);
    out[i] = lut[(v >> off) & mask];
  }
}

template <int B, typename T>
inline void decode_row_fixed(const uint8_t* row, int64_t K, const T* lut, T* out) {
  uint32_t w[B + 1];
  w[B] = 0;
  const int64_t full = K / 32;
  for (int64_t g = 0; g < full; ++g) {
    std::memcpy(w, row + g * 4 * B, 4 * B);
    decode_group<B>(w, lut, out + g * 32);
  }
  const int64_t rest = K - full * 32;
  if (rest) {  // the row's last words hold fewer than 32 fields
    T tail[32];
    const int64_t bytes = 4 * ((rest * B + 31) / 32);
    std::memset(w, 0, sizeof(w));
    std::memcpy(w, row + full * 4 * B, bytes);
    decode_group<B>(w, lut, tail);
    std::memcpy(out + full * 32, tail, rest * sizeof(T));
  }
}

// Reads packed row fields (b bits each, LSB-first little-endian) for
// elements [0, K) and writes lut[field] for each.
template <typename T>
inline void decode_row(const uint8_t* row, int64_t K, int b, const T* lut,
                       T* out) {
  switch (b) {
    case 2: return decode_row_fixed<2>(row, K, lut, out);
    case 3: return decode_row_fixed<3>(row, K, lut, out);
    case 4: return decode_row_fixed<4>(row, K, lut, out);
    case 5: return decode_row_fixed<5>(row, K, lut, out);
    case 6: return decode_row_fixed<6>(row, K, lut, out);
    case 7: return decode_row_fixed<7>(row, K, lut, out);
    case 8: return decode_row_fixed<8>(row, K, lut, out);
    default: TORCH_CHECK(false, "dnateq: packed field width ", b, " out of range");
  }
}

// decode_row for float levels, vectorized where the CPU has AVX2.
// `row_bytes` bounds the reads (the row's allocated bytes from `row`).
void decode_row_float(const uint8_t* row, int64_t K, int64_t row_bytes, int b,
                      const float* lut, float* out);

// Dot products of one packed weight row (K fields, levels `lut`) with M <= 4
// float rows x[m * ldx + k]: out[m] = sum_k x[m, k] * lut[field k]. The AVX2
// path decodes 8 fields at a time into a register and never stores them.
void dot_packed_row(const uint8_t* row, int64_t K, int64_t row_bytes, int b,
                    const float* lut, const float* x, int64_t ldx, int M, float* out);

// Unpacks + dequantizes a packed weight [rows, row_bytes] to float32
// [rows, K] through the level table.
at::Tensor decode_packed_to_float(const at::Tensor& packed, int64_t rows,
                                  int64_t K, const ExpTables& t, bool is_signed);

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
