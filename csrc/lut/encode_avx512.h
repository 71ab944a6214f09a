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
// Biased exponents of 16 magnitudes by a branch-free binary search over the
// sorted thresholds (padded with +inf to S - 1 = 2^steps - 1): step s reads
// the probe thr[pos + s - 1] from a register table indexed by pos / 2s
// (1 to 64 entries: a broadcast, vpermps, vpermi2ps, or two vpermi2ps
// merged on one bit). The result, 1 + #{k : m >= thr[k]}, is the count of
// SPEC section 1 (ties go up); non-finite magnitudes are flagged apart.
template <int STEPS>
struct Search {
  static constexpr int S = 1 << STEPS;
  __m512 tab[STEPS][4];
  explicit Search(const float* thr, int n_thr) {
    for (int st = 0; st < STEPS; ++st) {
      const int s = S >> (st + 1);   // step size
      const int E = S / (2 * s);     // table entries
      alignas(64) float t[64];
      for (int j = 0; j < 64; ++j) {
        const int jj = E == 1 ? 0 : j;   // one entry: a broadcast
        const int k = jj * 2 * s + s - 1;
        t[j] = (jj < E && k < n_thr) ? thr[k] : __builtin_inff();
      }
      for (int r = 0; r < 4; ++r) tab[st][r] = _mm512_load_ps(t + 16 * r);
    }
  }
  inline __m512i operator()(__m512 m) const {
    __m512i pos = _mm512_setzero_si512();
    for (int st = 0; st < STEPS; ++st) {
      const int s = S >> (st + 1);
      const int E = S / (2 * s);
      __m512 probe;
      if (E == 1) {
        probe = tab[st][0];
      } else {
        const __m512i j = _mm512_srli_epi32(pos, STEPS - st);  // pos / (2s)
        if (E <= 16) {
          probe = _mm512_permutexvar_ps(j, tab[st][0]);
        } else if (E == 32) {
          probe = _mm512_permutex2var_ps(tab[st][0], j, tab[st][1]);
        } else {
          const __m512 lo = _mm512_permutex2var_ps(tab[st][0], j, tab[st][1]);
          const __m512 hi = _mm512_permutex2var_ps(tab[st][2], j, tab[st][3]);
          const __mmask16 b5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
          probe = _mm512_mask_blend_ps(b5, lo, hi);
        }
      }
      const __mmask16 ge = _mm512_cmp_ps_mask(m, probe, _CMP_GE_OQ);
      pos = _mm512_mask_add_epi32(pos, ge, pos, _mm512_set1_epi32(s));
    }
    return _mm512_add_epi32(pos, _mm512_set1_epi32(1));
  }
};

// Signed float levels by biased exponent (levels[b], b = 1 .. n_thr + 1;
// entry 0 = 0), up to 128 entries in 8 registers, read with vpermps /
// vpermi2ps.
template <int STEPS>
struct LevelLut {
  static constexpr int L = 1 << (STEPS < 7 ? STEPS : 7);
  __m512 t[8];
  LevelLut(const float* levels, int n_thr) {
    alignas(64) float lv[128] = {};
    for (int b = 1; b < L && b <= n_thr + 1; ++b) lv[b] = levels[b];
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
