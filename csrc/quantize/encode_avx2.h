// The AVX2 steps every table encoder shares once it has the biased exponents
// of 8 magnitudes: attach the sign and zero to make int8 codes (packed 32 at
// a time), or to make signed levels (fake quantization). One copy, so that
// the compare encoder and the bucket table cannot drift apart on -0, the
// sign of a negative level, or the lane order of the packs.
#pragma once

#include <cstdint>

#include "common/cpu_kernels.h"

#ifdef DNATEQ_X86
#include <immintrin.h>

namespace dnateq {
namespace cpu {
namespace detail {

// x's bit patterns `u` -> magnitudes (sign cleared).
__attribute__((target("avx2"))) inline __m256i abs8(__m256i u) {
  return _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
}

// Accumulates, in `bad`, the lanes whose magnitude is Inf or NaN.
__attribute__((target("avx2"))) inline __m256i flag_non_finite(__m256i bad, __m256i m) {
  return _mm256_or_si256(bad, _mm256_cmpgt_epi32(m, _mm256_set1_epi32(0x7f7fffff)));
}

// int8 code of 8 lanes as a signed int32: b, or b - 128 (sign bit set) for a
// negative x; 0 for x = +-0.
__attribute__((target("avx2"))) inline __m256i code8(__m256i u, __m256i m, __m256i b) {
  const __m256i neg = _mm256_srai_epi32(u, 31);
  const __m256i v = _mm256_sub_epi32(b, _mm256_and_si256(neg, _mm256_set1_epi32(128)));
  return _mm256_andnot_si256(_mm256_cmpeq_epi32(m, _mm256_setzero_si256()), v);
}

// Packs 4 x 8 codes from code8 to 32 int8 in element order.
__attribute__((target("avx2"))) inline void store_codes32(const __m256i* c, int8_t* out) {
  const __m256i p01 = _mm256_packs_epi32(c[0], c[1]);
  const __m256i p23 = _mm256_packs_epi32(c[2], c[3]);
  // packs interleave 128-bit halves; this restores element order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), order);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), p);
}

// Stores sign(x) * level for 8 lanes: the level negated (xor: levels may be
// negative for beta < 0) for negative x; exact zero stays zero.
__attribute__((target("avx2"))) inline void store_levels8(__m256i u, __m256i m, __m256 lv,
                                                         float* out) {
  const __m256i sign = _mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  __m256i v = _mm256_xor_si256(_mm256_castps_si256(lv), sign);
  v = _mm256_andnot_si256(_mm256_cmpeq_epi32(m, _mm256_setzero_si256()), v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
}

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
#endif
