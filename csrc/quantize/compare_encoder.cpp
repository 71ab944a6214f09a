// The register compare quantizer for bits <= 5 (see compare_encoder.h).
#include "quantize/compare_encoder.h"

#include <cmath>

#include "common/cpu_kernels.h"

#ifdef DNATEQ_X86
#include "quantize/encode_avx2.h"
#endif

namespace dnateq {
namespace cpu {
namespace detail {

namespace {

#ifdef DNATEQ_X86
// Biased exponent finders: 1 + the number of thresholds <= m for 8 finite
// magnitudes, as 1 - the sum of all-ones compare masks. Unused threshold
// slots hold +inf, which no finite magnitude reaches (non-finite inputs are
// reported and rejected by the caller).

// bits <= 3: every threshold (at most 6) against every magnitude.
struct Flat {
  static constexpr int kSlots = 6;
  __m256 thr[kSlots];
  __attribute__((target("avx2"))) explicit Flat(const ExpTables& t) {
    for (int k = 0; k < kSlots; ++k) {
      thr[k] = _mm256_set1_ps(k < t.n_thr ? t.thresholds[k] : INFINITY);
    }
  }
  __attribute__((target("avx2"))) __m256i operator()(__m256 m) const {
    __m256i b = _mm256_set1_epi32(1);
    for (int k = 0; k < kSlots; ++k) {
      b = _mm256_sub_epi32(b, _mm256_castps_si256(_mm256_cmp_ps(m, thr[k], _CMP_GE_OQ)));
    }
    return b;
  }
};

// bits 4 and 5: the thresholds in kGroups runs of 4 (14 or 30 of 16 or 32
// slots). The last threshold of each run but the last picks the run g (3 or
// 7 compares); the run's first three thresholds, read with one register
// permute each by g, finish the count: 4g + #{run thresholds <= m}. Sorted
// thresholds make this equal to counting all of them.
template <int kGroups>
struct Grouped {
  __m256 coarse[kGroups - 1];
  __m256 fine[3];  // fine[j][g] = threshold 4g + j
  __attribute__((target("avx2"))) explicit Grouped(const ExpTables& t) {
    auto slot = [&](int k) { return k < t.n_thr ? t.thresholds[k] : INFINITY; };
    for (int g = 0; g + 1 < kGroups; ++g) coarse[g] = _mm256_set1_ps(slot(4 * g + 3));
    for (int j = 0; j < 3; ++j) {
      float f[8];
      for (int g = 0; g < 8; ++g) f[g] = g < kGroups ? slot(4 * g + j) : INFINITY;
      fine[j] = _mm256_loadu_ps(f);
    }
  }
  __attribute__((target("avx2"))) __m256i operator()(__m256 m) const {
    __m256i g = _mm256_setzero_si256();
    for (int k = 0; k + 1 < kGroups; ++k) {
      g = _mm256_sub_epi32(g, _mm256_castps_si256(_mm256_cmp_ps(m, coarse[k], _CMP_GE_OQ)));
    }
    __m256i b = _mm256_add_epi32(_mm256_slli_epi32(g, 2), _mm256_set1_epi32(1));
    for (int j = 0; j < 3; ++j) {
      const __m256 th = _mm256_permutevar8x32_ps(fine[j], g);
      b = _mm256_sub_epi32(b, _mm256_castps_si256(_mm256_cmp_ps(m, th, _CMP_GE_OQ)));
    }
    return b;
  }
};

// levels[b] for b < 2^bits (bits <= 5: 32 entries in 4 registers), read with
// register permutes merged on bits 3 and 4 of b.
struct Levels {
  __m256 t[4];
  int bits;
  __attribute__((target("avx2"))) explicit Levels(const ExpTables& tab) : bits(tab.bits) {
    alignas(32) float lv[32] = {0};
    for (int b = 0; b <= num_levels(tab.bits); ++b) lv[b] = tab.levels[b];
    for (int s = 0; s < 4; ++s) t[s] = _mm256_load_ps(lv + 8 * s);
  }
  __attribute__((target("avx2"))) __m256 operator()(__m256i b) const {
    const __m256 q0 = _mm256_permutevar8x32_ps(t[0], b);
    if (bits <= 3) return q0;
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(b, 28));
    const __m256 lo = _mm256_blendv_ps(q0, _mm256_permutevar8x32_ps(t[1], b), bit3);
    if (bits == 4) return lo;
    const __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[2], b),
                                       _mm256_permutevar8x32_ps(t[3], b), bit3);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(b, 27)));
  }
};

template <typename Finder>
__attribute__((target("avx2"))) bool avx2_codes(const ExpTables& t, const float* x, int64_t n,
                                                int8_t* out) {
  const Finder biased(t);
  __m256i bad = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i c[4];
    for (int j = 0; j < 4; ++j) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8 * j));
      const __m256i m = abs8(u);
      bad = flag_non_finite(bad, m);
      c[j] = code8(u, m, biased(_mm256_castsi256_ps(m)));
    }
    store_codes32(c, out + i);
  }
  bool good = _mm256_testz_si256(bad, bad) != 0;
  for (; i < n; ++i) {
    if (!std::isfinite(x[i])) { good = false; continue; }
    out[i] = static_cast<int8_t>(encode(x[i], t.thresholds, t.n_thr));
  }
  return good;
}

template <typename Finder>
__attribute__((target("avx2"))) bool avx2_levels(const ExpTables& t, const float* x, int64_t n,
                                                 float* out) {
  const Finder biased(t);
  const Levels levels(t);
  __m256i bad = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    const __m256i m = abs8(u);
    bad = flag_non_finite(bad, m);
    store_levels8(u, m, levels(biased(_mm256_castsi256_ps(m))), out + i);
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
  return t.bits <= 5 && cpu_has_avx2();
#else
  (void)t;
  return false;
#endif
}

bool compare_encode_codes(const ExpTables& t, const float* x, int64_t n, int8_t* out) {
#ifdef DNATEQ_X86
  if (t.bits <= 3) return avx2_codes<Flat>(t, x, n, out);
  if (t.bits == 4) return avx2_codes<Grouped<4>>(t, x, n, out);
  return avx2_codes<Grouped<8>>(t, x, n, out);
#else
  (void)t; (void)x; (void)n; (void)out;
  return false;
#endif
}

bool compare_encode_levels(const ExpTables& t, const float* x, int64_t n, float* out) {
#ifdef DNATEQ_X86
  if (t.bits <= 3) return avx2_levels<Flat>(t, x, n, out);
  if (t.bits == 4) return avx2_levels<Grouped<4>>(t, x, n, out);
  return avx2_levels<Grouped<8>>(t, x, n, out);
#else
  (void)t; (void)x; (void)n; (void)out;
  return false;
#endif
}

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
