// The AVX-512 activation quantizer's building blocks, shared by the AVX-512
// translation units of the LUT fast path (fast_avx512.cpp, direct_conv_avx512.cpp).
//
// Include this header ONLY from a file compiled for AVX-512 (the
// `#pragma GCC target` of those files, before any include): everything here
// is in an anonymous namespace, so each such file gets its own copy and no
// AVX-512 code can be merged by the linker into a function that another
// (non-AVX-512) translation unit calls.
#pragma once

#include <immintrin.h>
#include <stdint.h>

namespace dnateq {
namespace cpu {
namespace fast {
namespace {

// ------------------------------------------------------------- encoder --
// Bit-reversed rank: bit st of q is the outcome of step st of the search
// below (most significant decision first), so q = bitrev_steps(pos) where pos
// = #{k : m >= thr[k]}. Why reversed: at step st the decisions made so far
// are the low st bits of q, which is exactly the index a permute reads (it
// ignores the higher bits, still zero), so no shift is needed to form it.
inline int bitrev(int v, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r |= ((v >> b) & 1) << (bits - 1 - b);
  return r;
}

// Entries of step st's probe table of a binary search over the n sorted
// values v (padded with `pad` to 2^steps - 1), as Search and the word search
// of fast_avx512.cpp read them: 64 entries, entry q < 2^st the probe of the
// prefix whose decisions are q's bits, the rest (and, for st = 0, all) the
// one probe of the prefix 0, so that step 0 is a broadcast.
template <typename T>
inline void probe_entries(const T* v, int n, T pad, int steps, int st, T* t) {
  const int s = (1 << steps) >> (st + 1);   // step size
  const int E = 1 << st;                   // entries
  for (int j = 0; j < 64; ++j) {
    const int jj = E == 1 ? 0 : j;
    const int k = (jj < E ? bitrev(jj, st) : 0) * 2 * s + s - 1;
    t[j] = (jj < E && k < n) ? v[k] : pad;
  }
}

// Bit-reversed ranks of 16 magnitudes by a branch-free binary search over the
// sorted thresholds (padded with +inf to S - 1 = 2^steps - 1): step st reads
// its probe from a register table of 2^st entries indexed by q (1 to 64
// entries: a broadcast, vpermps, vpermi2ps, or two vpermi2ps merged on bit
// 5), compares, and sets bit st of q. pos + 1 is the biased exponent, the
// count of SPEC section 1 (ties go up); non-finite magnitudes are flagged
// apart. Three vector instructions a step.
template <int STEPS>
struct Search {
  static constexpr int S = 1 << STEPS;
  __m512 tab[STEPS][4];
  explicit Search(const float* thr, int n_thr) {
    for (int st = 0; st < STEPS; ++st) {
      alignas(64) float t[64];
      probe_entries(thr, n_thr, __builtin_inff(), STEPS, st, t);
      for (int r = 0; r < 4; ++r) tab[st][r] = _mm512_load_ps(t + 16 * r);
    }
  }
  inline __m512i operator()(__m512 m) const {
    __m512i q = _mm512_setzero_si512();
    for (int st = 0; st < STEPS; ++st) {
      const int E = 1 << st;
      __m512 probe;
      if (E == 1) {
        probe = tab[st][0];
      } else if (E <= 16) {
        probe = _mm512_permutexvar_ps(q, tab[st][0]);
      } else if (E == 32) {
        probe = _mm512_permutex2var_ps(tab[st][0], q, tab[st][1]);
      } else {
        const __m512 lo = _mm512_permutex2var_ps(tab[st][0], q, tab[st][1]);
        const __m512 hi = _mm512_permutex2var_ps(tab[st][2], q, tab[st][3]);
        const __mmask16 b5 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(32));
        probe = _mm512_mask_blend_ps(b5, lo, hi);
      }
      const __mmask16 ge = _mm512_cmp_ps_mask(m, probe, _CMP_GE_OQ);
      q = _mm512_mask_or_epi32(q, ge, q, _mm512_set1_epi32(1 << st));
    }
    return q;
  }
};

// Biased exponents from bit-reversed ranks, as bytes: entry q of a 128-byte
// table (two registers, vpermi2b) is bitrev(q) + 1. A rank dword q < 128 has
// zero upper bytes, which read entry 0, so only the low byte of each lane is
// the biased exponent (callers narrow with truncation, vpmovdb).
template <int STEPS>
struct CodeLut {
  __m512i lo, hi;
  CodeLut() {
    alignas(64) uint8_t c[128] = {};
    for (int q = 0; q < (1 << STEPS); ++q) c[q] = static_cast<uint8_t>(bitrev(q, STEPS) + 1);
    lo = _mm512_load_si512(c);
    hi = _mm512_load_si512(c + 64);
  }
  inline __m512i operator()(__m512i q) const { return _mm512_permutex2var_epi8(lo, q, hi); }
};

// Signed float levels by bit-reversed rank (entry q = levels[bitrev(q) + 1],
// the level of biased exponent bitrev(q) + 1 <= n_thr + 1; entry 0 of
// `levels` = 0), up to 128 entries in 8 registers, read with vpermps /
// vpermi2ps.
template <int STEPS>
struct LevelLut {
  static constexpr int L = 1 << (STEPS < 7 ? STEPS : 7);
  __m512 t[8];
  LevelLut(const float* levels, int n_thr) {
    alignas(64) float lv[128] = {};
    for (int q = 0; q < L; ++q) {
      const int b = bitrev(q, STEPS) + 1;
      lv[q] = b <= n_thr + 1 ? levels[b] : 0.f;   // larger ranks do not occur
    }
    for (int r = 0; r < 8; ++r) t[r] = _mm512_load_ps(lv + 16 * r);
  }
  inline __m512 operator()(__m512i b) const {
    __m512 v;
    if (L <= 16) {
      v = _mm512_permutexvar_ps(b, t[0]);
    } else if (L == 32) {
      v = _mm512_permutex2var_ps(t[0], b, t[1]);
    } else {
      const __m512 q0 = _mm512_permutex2var_ps(t[0], b, t[1]);
      const __m512 q1 = _mm512_permutex2var_ps(t[2], b, t[3]);
      v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(b, _mm512_set1_epi32(32)), q0, q1);
      if (L == 128) {
        const __m512 q2 = _mm512_permutex2var_ps(t[4], b, t[5]);
        const __m512 q3 = _mm512_permutex2var_ps(t[6], b, t[7]);
        const __m512 w = _mm512_mask_blend_ps(_mm512_test_epi32_mask(b, _mm512_set1_epi32(32)),
                                              q2, q3);
        v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(b, _mm512_set1_epi32(64)), v, w);
      }
    }
    return v;
  }
};

// The quantizer of SPEC section 1 on 16 floats (lanes k of the raw bits u;
// the other lanes give 0): sign(x) * level(biased exponent of |x|), 0 for
// x == 0. Lanes of k holding NaN or +-Inf are OR-ed into *bad.
template <int STEPS>
inline __m512 quantize16(const Search<STEPS>& search, const LevelLut<STEPS>& lut, __m512i u,
                         __mmask16 k, __mmask16* bad) {
  const __m512i mi = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  *bad |= _mm512_mask_cmpge_epu32_mask(k, mi, _mm512_set1_epi32(0x7F800000));
  const __mmask16 nz = _mm512_mask_cmpneq_epi32_mask(k, mi, _mm512_setzero_si512());
  const __m512 v = lut(search(_mm512_castsi512_ps(mi)));
  // -level for negative x (levels may be negative for beta < 0)
  const __m512i r = _mm512_xor_si512(
      _mm512_castps_si512(v), _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  return _mm512_maskz_mov_ps(nz, _mm512_castsi512_ps(r));
}

}  // namespace
}  // namespace fast
}  // namespace cpu
}  // namespace dnateq
