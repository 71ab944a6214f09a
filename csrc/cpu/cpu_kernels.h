// Building blocks shared by the CPU operators: float conversion, the
// vectorizable quantizer, and the packed-row decoder.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#include "../format.h"

namespace dnateq {
namespace cpu {
namespace detail {

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

// Reads packed row fields (b bits each, LSB-first little-endian) for
// elements [0, K) and writes lut[field] for each.
template <typename T>
inline void decode_row(const uint8_t* row, int64_t K, int b, const T* lut,
                       T* out) {
  const uint64_t mask = (uint64_t{1} << b) - 1;
  uint64_t acc = 0;
  int nbits = 0;
  int64_t word = 0;
  for (int64_t i = 0; i < K; ++i) {
    if (nbits < b) {
      uint32_t w;
      std::memcpy(&w, row + 4 * word, 4);
      ++word;
      acc |= static_cast<uint64_t>(w) << nbits;
      nbits += 32;
    }
    out[i] = lut[acc & mask];
    acc >>= b;
    nbits -= b;
  }
}

// Field -> float value table of a packed tensor (2^b entries).
void field_levels(const ExpTables& t, bool is_signed, float* lut);

// Unpacks + dequantizes a packed weight [rows, row_bytes] to float32
// [rows, K] through the level table.
at::Tensor decode_packed_to_float(const at::Tensor& packed, int64_t rows,
                                  int64_t K, const ExpTables& t, bool is_signed);

// Validates a packed tensor against (rows, K, bits, signed).
void check_packed(const at::Tensor& packed, int64_t rows, int64_t K,
                  int64_t bits, bool is_signed, const char* name);

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
