// The register compare quantizer for bits <= 3 (see compare_encoder.h).
#include "compare_encoder.h"

#include <cmath>

#include "cpu_kernels.h"

#ifdef DNATEQ_X86
#include <immintrin.h>
#endif

namespace dnateq {
namespace cpu {
namespace detail {

namespace {

// bits = 3. (bits = 4, 14 compares, measured no faster than the bucket table.)
constexpr int kMaxCompareThresholds = 6;

#ifdef DNATEQ_X86
// Biased exponents of 8 magnitudes: 1 + the number of thresholds <= m, as
// 1 - sum of the all-ones compare masks. Unused threshold slots hold +inf,
// which no finite magnitude reaches (non-finite inputs are rejected).
template <int kSlots>
__attribute__((target("avx2"))) inline __m256i biased8(const __m256* thr, __m256 m) {
  __m256i b = _mm256_set1_epi32(1);
  for (int k = 0; k < kSlots; ++k) {
    b = _mm256_sub_epi32(b, _mm256_castps_si256(_mm256_cmp_ps(m, thr[k], _CMP_GE_OQ)));
  }
  return b;
}

__attribute__((target("avx2"))) void load_thresholds(const ExpTables& t, __m256* thr) {
  for (int k = 0; k < kMaxCompareThresholds; ++k) {
    thr[k] = _mm256_set1_ps(k < t.n_thr ? t.thresholds[k] : INFINITY);
  }
}

template <int kSlots>
__attribute__((target("avx2"))) bool avx2_codes(const ExpTables& t, const float* x, int64_t n,
                                                int8_t* out) {
  __m256 thr[kMaxCompareThresholds];
  load_thresholds(t, thr);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf_bits = _mm256_set1_epi32(0x7f7fffff);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i k128 = _mm256_set1_epi32(128);
  // packs interleave 128-bit halves; this restores element order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i bad = zero;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i c[4];
    for (int j = 0; j < 4; ++j) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8 * j));
      const __m256i m = _mm256_and_si256(u, abs_mask);
      bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(m, inf_bits));
      const __m256i b = biased8<kSlots>(thr, _mm256_castsi256_ps(m));
      // int8 code as a signed value: b, or b - 128 (sign bit set); 0 for zero.
      const __m256i v = _mm256_sub_epi32(b, _mm256_and_si256(_mm256_srai_epi32(u, 31), k128));
      c[j] = _mm256_andnot_si256(_mm256_cmpeq_epi32(m, zero), v);
    }
    const __m256i p01 = _mm256_packs_epi32(c[0], c[1]);
    const __m256i p23 = _mm256_packs_epi32(c[2], c[3]);
    const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), p);
  }
  bool good = _mm256_testz_si256(bad, bad) != 0;
  for (; i < n; ++i) {
    if (!std::isfinite(x[i])) { good = false; continue; }
    out[i] = static_cast<int8_t>(encode(x[i], t.thresholds, t.n_thr));
  }
  return good;
}

__attribute__((target("avx2"))) bool avx2_levels(const ExpTables& t, const float* x, int64_t n,
                                                 float* out) {
  __m256 thr[kMaxCompareThresholds];
  load_thresholds(t, thr);
  // levels[0 .. 2^n - 1] fit one register for n <= 3.
  alignas(32) float lv8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int b = 0; b <= num_levels(t.bits); ++b) lv8[b] = t.levels[b];
  const __m256 levels = _mm256_load_ps(lv8);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf_bits = _mm256_set1_epi32(0x7f7fffff);
  const __m256i sign_mask = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i zero = _mm256_setzero_si256();
  __m256i bad = zero;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    const __m256i m = _mm256_and_si256(u, abs_mask);
    bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(m, inf_bits));
    const __m256i b = biased8<kMaxCompareThresholds>(thr, _mm256_castsi256_ps(m));
    const __m256 lv = _mm256_permutevar8x32_ps(levels, b);
    // negate the level for negative x (xor: levels may be negative for
    // beta < 0); exact zero stays zero
    __m256i v = _mm256_xor_si256(_mm256_castps_si256(lv), _mm256_and_si256(u, sign_mask));
    v = _mm256_andnot_si256(_mm256_cmpeq_epi32(m, zero), v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), v);
  }
  bool good = _mm256_testz_si256(bad, bad) != 0;
  for (; i < n; ++i) {
    if (!std::isfinite(x[i])) { good = false; continue; }
    const uint8_t code = encode(x[i], t.thresholds, t.n_thr);
    const float lv = t.levels[code & kMagMask];
    out[i] = code == 0 ? 0.f : ((code & kSignBit) ? -lv : lv);
  }
  return good;
}
#endif

}  // namespace

bool compare_encoder_ok(const ExpTables& t) {
#ifdef DNATEQ_X86
  return t.n_thr <= kMaxCompareThresholds && cpu_has_avx2();
#else
  (void)t;
  return false;
#endif
}

bool compare_encode_codes(const ExpTables& t, const float* x, int64_t n, int8_t* out) {
#ifdef DNATEQ_X86
  return avx2_codes<kMaxCompareThresholds>(t, x, n, out);
#else
  (void)t; (void)x; (void)n; (void)out;
  return false;
#endif
}

bool compare_encode_levels(const ExpTables& t, const float* x, int64_t n, float* out) {
#ifdef DNATEQ_X86
  return avx2_levels(t, x, n, out);
#else
  (void)t; (void)x; (void)n; (void)out;
  return false;
#endif
}

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
