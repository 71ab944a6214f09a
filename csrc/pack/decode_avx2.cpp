// Packed row -> float levels with AVX2 (the LUT operators' weight decode),
// and the same decode fused into dot products (the LUT GEMV).
//
// Why: the portable decoder (cpu_kernels.h) spends a few scalar shift, mask
// and table-load instructions per weight, which made the weight decode a
// visible share of exp_linear_lut next to the native GEMM. Eight b-bit fields
// fill exactly b bytes, so each group of 8 starts on a byte: one 64-bit load,
// two variable 64-bit shifts give the 8 fields, and register permutes (b <= 5)
// or one gather (b >= 6) read their levels. Same values as the portable
// decoder (tested against exp_unpack + exp_dequantize).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_kernels.h"

#ifdef DNATEQ_X86
#include <immintrin.h>
#endif

namespace dnateq {
namespace cpu {
namespace detail {

namespace {

// Field i of a row of `row_bytes` bytes, reading only inside the row.
inline uint32_t field_at(const uint8_t* row, int64_t row_bytes, int64_t i, int b) {
  const int64_t bit = i * b, byte = bit >> 3;
  uint64_t v = 0;
  std::memcpy(&v, row + byte, static_cast<size_t>(std::min<int64_t>(8, row_bytes - byte)));
  return static_cast<uint32_t>((v >> (bit & 7)) & ((1u << b) - 1u));
}

#ifdef DNATEQ_X86
// Levels of 8 fields. Tables of up to 32 entries (b <= 5, the common widths)
// stay in registers: 8-entry slices looked up with vpermps and merged on
// bits 3 and 4 of the field; wider tables use a gather.
template <int B>
__attribute__((target("avx2"))) inline __m256 lookup8(const float* lut, __m256i idx,
                                                    const __m256* t) {
  if constexpr (B <= 3) {
    return _mm256_permutevar8x32_ps(t[0], idx);
  } else if constexpr (B == 4) {
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[0], idx),
                            _mm256_permutevar8x32_ps(t[1], idx), bit3);
  } else if constexpr (B == 5) {
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    const __m256 bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));
    const __m256 q0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[0], idx),
                                       _mm256_permutevar8x32_ps(t[1], idx), bit3);
    const __m256 q1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[2], idx),
                                       _mm256_permutevar8x32_ps(t[3], idx), bit3);
    return _mm256_blendv_ps(q0, q1, bit4);
  } else {
    return _mm256_i32gather_ps(lut, idx, 4);
  }
}

// The 8 fields of group g (g < safe groups): one 64-bit load, two variable
// shifts, a permute and a mask.
template <int B>
struct GroupFields {
  __m256i sh_lo, sh_hi, pick_lo, mask;
  __attribute__((target("avx2"))) GroupFields() {
    sh_lo = _mm256_setr_epi64x(0, B, 2 * B, 3 * B);
    sh_hi = _mm256_setr_epi64x(4 * B, 5 * B, 6 * B, 7 * B);
    pick_lo = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);  // low dword of each 64-bit lane
    mask = _mm256_set1_epi32((1 << B) - 1);
  }
  __attribute__((target("avx2"))) __m256i operator()(const uint8_t* row, int64_t g) const {
    uint64_t v;
    std::memcpy(&v, row + g * B, 8);
    const __m256i vv = _mm256_set1_epi64x(static_cast<long long>(v));
    const __m256i lo = _mm256_permutevar8x32_epi32(_mm256_srlv_epi64(vv, sh_lo), pick_lo);
    const __m256i hi = _mm256_permutevar8x32_epi32(_mm256_srlv_epi64(vv, sh_hi), pick_lo);
    return _mm256_and_si256(_mm256_blend_epi32(lo, hi, 0xF0), mask);
  }
};

// Groups of 8 whose 8-byte load stays inside the row.
inline int64_t safe_groups(int64_t K, int64_t row_bytes, int b) {
  return std::min<int64_t>(K / 8, row_bytes >= 8 ? (row_bytes - 8) / b + 1 : 0);
}

template <int B>
__attribute__((target("avx2"))) void avx2_decode_b(const uint8_t* row, int64_t K,
                                                   int64_t row_bytes, const float* lut,
                                                   float* out) {
  constexpr int b = B;
  __m256 t[4];
  for (int s = 0; s < 4; ++s) {
    t[s] = (8 * s < (1 << B)) ? _mm256_loadu_ps(lut + 8 * s) : _mm256_setzero_ps();
  }
  const GroupFields<B> fields;
  const int64_t safe = safe_groups(K, row_bytes, b);
  int64_t g = 0;
  for (; g < safe; ++g) {
    const __m256i idx = fields(row, g);
    _mm256_storeu_ps(out + 8 * g, lookup8<B>(lut, idx, t));
  }
  for (int64_t i = 8 * g; i < K; ++i) out[i] = lut[field_at(row, row_bytes, i, b)];
}

template <int B, int M>
__attribute__((target("avx2,fma"))) void avx2_dot_bm(const uint8_t* row, int64_t K,
                                                     int64_t row_bytes, const float* lut,
                                                     const float* x, int64_t ldx, float* out) {
  __m256 t[4];
  for (int s = 0; s < 4; ++s) {
    t[s] = (8 * s < (1 << B)) ? _mm256_loadu_ps(lut + 8 * s) : _mm256_setzero_ps();
  }
  const GroupFields<B> fields;
  const int64_t safe = safe_groups(K, row_bytes, B);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g < safe; ++g) {
    const __m256 w = lookup8<B>(lut, fields(row, g), t);
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + 8 * g), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[m]);
    float s = 0.f;
    for (int j = 0; j < 8; ++j) s += lanes[j];
    for (int64_t i = 8 * g; i < K; ++i) s += x[m * ldx + i] * lut[field_at(row, row_bytes, i, B)];
    out[m] = s;
  }
}

template <int B>
void avx2_dot_b(const uint8_t* row, int64_t K, int64_t row_bytes, const float* lut,
                const float* x, int64_t ldx, int M, float* out) {
  switch (M) {
    case 1: return avx2_dot_bm<B, 1>(row, K, row_bytes, lut, x, ldx, out);
    case 2: return avx2_dot_bm<B, 2>(row, K, row_bytes, lut, x, ldx, out);
    case 3: return avx2_dot_bm<B, 3>(row, K, row_bytes, lut, x, ldx, out);
    default: return avx2_dot_bm<B, 4>(row, K, row_bytes, lut, x, ldx, out);
  }
}

void avx2_dot(const uint8_t* row, int64_t K, int64_t row_bytes, int b, const float* lut,
              const float* x, int64_t ldx, int M, float* out) {
  switch (b) {
    case 2: return avx2_dot_b<2>(row, K, row_bytes, lut, x, ldx, M, out);
    case 3: return avx2_dot_b<3>(row, K, row_bytes, lut, x, ldx, M, out);
    case 4: return avx2_dot_b<4>(row, K, row_bytes, lut, x, ldx, M, out);
    case 5: return avx2_dot_b<5>(row, K, row_bytes, lut, x, ldx, M, out);
    case 6: return avx2_dot_b<6>(row, K, row_bytes, lut, x, ldx, M, out);
    case 7: return avx2_dot_b<7>(row, K, row_bytes, lut, x, ldx, M, out);
    default: return avx2_dot_b<8>(row, K, row_bytes, lut, x, ldx, M, out);
  }
}

void avx2_decode(const uint8_t* row, int64_t K, int64_t row_bytes, int b, const float* lut,
                 float* out) {
  switch (b) {
    case 2: return avx2_decode_b<2>(row, K, row_bytes, lut, out);
    case 3: return avx2_decode_b<3>(row, K, row_bytes, lut, out);
    case 4: return avx2_decode_b<4>(row, K, row_bytes, lut, out);
    case 5: return avx2_decode_b<5>(row, K, row_bytes, lut, out);
    case 6: return avx2_decode_b<6>(row, K, row_bytes, lut, out);
    case 7: return avx2_decode_b<7>(row, K, row_bytes, lut, out);
    default: return avx2_decode_b<8>(row, K, row_bytes, lut, out);
  }
}

#endif

}  // namespace

void decode_row_float(const uint8_t* row, int64_t K, int64_t row_bytes, int b,
                      const float* lut, float* out) {
#ifdef DNATEQ_X86
  if (cpu_has_avx2()) return avx2_decode(row, K, row_bytes, b, lut, out);
#endif
  decode_row(row, K, b, lut, out);
}

void dot_packed_row(const uint8_t* row, int64_t K, int64_t row_bytes, int b,
                    const float* lut, const float* x, int64_t ldx, int M, float* out) {
  if (M <= 0) return;
#ifdef DNATEQ_X86
  if (cpu_has_avx2()) return avx2_dot(row, K, row_bytes, b, lut, x, ldx, M, out);
#endif
  // Portable path: decode the row with the portable decoder, then dot.
  static thread_local std::vector<float> w;
  w.resize(static_cast<size_t>(K));
  decode_row(row, K, b, lut, w.data());
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
    for (int64_t i = 0; i < K; ++i) s += x[m * ldx + i] * w[i];
    out[m] = s;
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
