// The direct AVX-512 convolution of exp_conv2d_lut (direct_conv.h): the
// activation quantizer writing the shifted planes, and the register-tiled
// micro-kernel (4 output channels x R <= 6 vectors of 16 consecutive output
// positions, FMA over (c, kh, kw)).
//
// Compiled for AVX-512 through the pragma below (setup.py has no per-file
// flags; CMakeLists.txt also gives this file the flags), like fast_avx512.cpp:
// it includes only <immintrin.h>, C headers and headers of plain
// declarations, so no inline code compiled here is shared with another
// translation unit. Called only after the run-time CPU check.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,bmi2")
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "lut/direct_conv.h"
#include "lut/encode_avx512.h"

namespace dnateq {
namespace cpu {
namespace fast {

bool direct_conv_setup(DirectConvArgs& a) {
  const int64_t taps = a.KH * a.KW;
  if (taps < 1 || taps > kDirectMaxTaps || a.sh < 1 || a.sh > 64 || a.sw < 1) return false;
  a.Hp = a.H + 2 * a.ph;
  a.Wp = a.W + 2 * a.pw;
  if (a.Wp > kDirectMaxWp || a.Ho < 1 || a.Wo < 1) return false;
  a.Hq = (a.Hp + a.sh - 1) / a.sh;
  a.plane = a.Hq * a.Wo;
  a.chan = a.sh * a.KW * a.plane;
  a.image = a.C * a.chan;
  a.workspace = a.B * a.image;
  a.ob = (a.O + kDirectOcBlock - 1) / kDirectOcBlock;
  a.py_used = 0;
  for (int64_t kh = 0; kh < a.KH; ++kh) {
    const int64_t t = kh * a.dh;
    a.py_used |= uint64_t{1} << (t % a.sh);
    for (int64_t kw = 0; kw < a.KW; ++kw) {
      a.off[kh * a.KW + kw] = ((t % a.sh) * a.KW + kw) * a.plane + (t / a.sh) * a.Wo;
    }
  }
  return true;
}

namespace {

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// ------------------------------------------------------------ quantize --
template <int STEPS>
bool quantize_t(const DirectConvArgs& a, int64_t i0, int64_t i1) {
  const Search<STEPS> search(a.thr, a.n_thr);
  const LevelLut<STEPS> lut(a.levels, a.n_thr);
  // One padded input row: zeros left and right of the quantized values (and
  // a margin for the stride-2 gather's whole-register reads); only the
  // interior [pw, pw + W) is rewritten, so the zeros stay.
  alignas(64) float prow[kDirectMaxWp + 64];
  memset(prow, 0, sizeof(float) * static_cast<size_t>(a.Wp + 64));
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  __mmask16 bad = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / a.C, c = i % a.C;
    const float* xc = a.x + i * a.H * a.W;
    float* pc = a.planes + b * a.image + c * a.chan;
    for (int64_t ihp = 0; ihp < a.Hp; ++ihp) {
      const int64_t py = ihp % a.sh, iq = ihp / a.sh, ih = ihp - a.ph;
      if (!((a.py_used >> py) & 1u)) continue;   // a row phase no tap reads
      float* dst0 = pc + py * a.KW * a.plane + iq * a.Wo;
      if (ih < 0 || ih >= a.H) {                  // a padding row
        for (int64_t kw = 0; kw < a.KW; ++kw) {
          memset(dst0 + kw * a.plane, 0, sizeof(float) * static_cast<size_t>(a.Wo));
        }
        continue;
      }
      const float* xr = xc + ih * a.W;
      for (int64_t j = 0; j < a.W; j += 16) {
        const __mmask16 k = tail_mask(a.W - j);
        const __m512i u = _mm512_maskz_loadu_epi32(k, xr + j);
        _mm512_mask_storeu_ps(prow + a.pw + j, k, quantize16(search, lut, u, k, &bad));
      }
      for (int64_t kw = 0; kw < a.KW; ++kw) {
        const float* src = prow + kw * a.dw;
        float* dst = dst0 + kw * a.plane;
        if (a.sw == 1) {
          for (int64_t j = 0; j < a.Wo; j += 16) {
            const __mmask16 k = tail_mask(a.Wo - j);
            _mm512_mask_storeu_ps(dst + j, k, _mm512_maskz_loadu_ps(k, src + j));
          }
        } else if (a.sw == 2) {
          // dst[j] = src[2j]: the even lanes of 32 consecutive floats
          for (int64_t j = 0; j < a.Wo; j += 16) {
            const __m512 lo = _mm512_loadu_ps(src + 2 * j);
            const __m512 hi = _mm512_loadu_ps(src + 2 * j + 16);
            _mm512_mask_storeu_ps(dst + j, tail_mask(a.Wo - j),
                                  _mm512_permutex2var_ps(lo, even, hi));
          }
        } else {
          for (int64_t j = 0; j < a.Wo; ++j) dst[j] = src[j * a.sw];
        }
      }
    }
  }
  return bad == 0;
}

// -------------------------------------------------------------- kernel --
// One register tile: output channels o0 .. o0 + 3 (rows wr[o] of the
// decoded weights; yr[o] their output planes, null past O) at the R vectors
// of output positions p0, p0 + 16, ...; the last vector masked by `tail`
// when TAIL.
template <int R, bool TAIL>
void tile(const DirectConvArgs& a, const float* xb, int64_t p0, const float* const* wr,
          float* const* yr, const float* bias, __mmask16 tail) {
  __m512 acc0[R], acc1[R], acc2[R], acc3[R];
  for (int r = 0; r < R; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
    acc2[r] = _mm512_setzero_ps();
    acc3[r] = _mm512_setzero_ps();
  }
  const int64_t taps = a.KH * a.KW;
  const float* xp0 = xb + p0;
  const int64_t* off = a.off;
  for (int64_t c = 0; c < a.C; ++c) {
    const float* xc = xp0 + c * a.chan;
    const float* w0 = wr[0] + c * taps;
    const float* w1 = wr[1] + c * taps;
    const float* w2 = wr[2] + c * taps;
    const float* w3 = wr[3] + c * taps;
    for (int64_t t = 0; t < taps; ++t) {
      const float* xp = xc + off[t];
      const __m512 b0 = _mm512_set1_ps(w0[t]);
      const __m512 b1 = _mm512_set1_ps(w1[t]);
      const __m512 b2 = _mm512_set1_ps(w2[t]);
      const __m512 b3 = _mm512_set1_ps(w3[t]);
      for (int r = 0; r < R; ++r) {
        const __m512 v = (TAIL && r == R - 1) ? _mm512_maskz_loadu_ps(tail, xp + 16 * r)
                                              : _mm512_loadu_ps(xp + 16 * r);
        acc0[r] = _mm512_fmadd_ps(v, b0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(v, b1, acc1[r]);
        acc2[r] = _mm512_fmadd_ps(v, b2, acc2[r]);
        acc3[r] = _mm512_fmadd_ps(v, b3, acc3[r]);
      }
    }
  }
  __m512* accs[4] = {acc0, acc1, acc2, acc3};
  for (int o = 0; o < 4; ++o) {
    if (!yr[o]) continue;
    const __m512 bv = _mm512_set1_ps(bias ? bias[o] : 0.f);
    float* yo = yr[o] + p0;
    for (int r = 0; r < R; ++r) {
      const __m512 v = bias ? _mm512_add_ps(accs[o][r], bv) : accs[o][r];
      if (TAIL && r == R - 1) {
        _mm512_mask_storeu_ps(yo + 16 * r, tail, v);
      } else {
        _mm512_storeu_ps(yo + 16 * r, v);
      }
    }
  }
}

template <bool TAIL>
void tile_r(int R, const DirectConvArgs& a, const float* xb, int64_t p0, const float* const* wr,
            float* const* yr, const float* bias, __mmask16 tail) {
  switch (R) {
    case 1: return tile<1, TAIL>(a, xb, p0, wr, yr, bias, tail);
    case 2: return tile<2, TAIL>(a, xb, p0, wr, yr, bias, tail);
    case 3: return tile<3, TAIL>(a, xb, p0, wr, yr, bias, tail);
    case 4: return tile<4, TAIL>(a, xb, p0, wr, yr, bias, tail);
    case 5: return tile<5, TAIL>(a, xb, p0, wr, yr, bias, tail);
    default: return tile<6, TAIL>(a, xb, p0, wr, yr, bias, tail);
  }
}

inline int search_steps(int n_thr) {
  int st = 1;
  while ((1 << st) < n_thr + 1) ++st;
  return st;
}

}  // namespace

bool direct_conv_quantize_avx512(const DirectConvArgs& a, int64_t i0, int64_t i1) {
  switch (search_steps(a.n_thr)) {
    case 1: return quantize_t<1>(a, i0, i1);
    case 2: return quantize_t<2>(a, i0, i1);
    case 3: return quantize_t<3>(a, i0, i1);
    case 4: return quantize_t<4>(a, i0, i1);
    case 5: return quantize_t<5>(a, i0, i1);
    case 6: return quantize_t<6>(a, i0, i1);
    default: return quantize_t<7>(a, i0, i1);
  }
}

void direct_conv_run_avx512(const DirectConvArgs& a, int64_t t0, int64_t t1) {
  const int64_t P = a.Ho * a.Wo;            // output positions per plane
  const int64_t NV = (P + 15) / 16;         // vectors of 16 positions
  const bool has_tail = P % 16 != 0;
  const __mmask16 tail = tail_mask(P - (NV - 1) * 16);
  // Tiles of at most 6 vectors, balanced (7 vectors: 4 + 3, not 6 + 1).
  const int64_t nt = (NV + 5) / 6;
  const int64_t base = NV / nt, extra = NV % nt;
  for (int64_t b = t0 / a.ob; b * a.ob < t1; ++b) {
    // This task's output channel blocks of image b; the tile loop is outside
    // the block loop so each tile's input stays in L1 for all the blocks.
    const int64_t k0 = (t0 > b * a.ob ? t0 : b * a.ob) - b * a.ob;
    const int64_t k1 = (t1 < (b + 1) * a.ob ? t1 : (b + 1) * a.ob) - b * a.ob;
    const float* xb = a.planes + b * a.image;
    int64_t v0 = 0;
    for (int64_t ti = 0; ti < nt; ++ti) {
      const int R = static_cast<int>(base + (ti < extra ? 1 : 0));
      const bool last = ti == nt - 1 && has_tail;
      for (int64_t k = k0; k < k1; ++k) {
        const float* wr[4];
        float* yr[4];
        for (int o = 0; o < 4; ++o) {
          const int64_t oc = k * kDirectOcBlock + o;
          wr[o] = a.w + oc * a.ldw;
          yr[o] = oc < a.O ? a.y + (b * a.O + oc) * P : nullptr;
        }
        const float* bias = a.bias ? a.bias + k * kDirectOcBlock : nullptr;
        if (last) {
          tile_r<true>(R, a, xb, v0 * 16, wr, yr, bias, tail);
        } else {
          tile_r<false>(R, a, xb, v0 * 16, wr, yr, bias, tail);
        }
      }
      v0 += R;
    }
  }
}

}  // namespace fast
}  // namespace cpu
}  // namespace dnateq

#else  // not x86-64: never called (the dispatcher checks the CPU first)
#include "lut/direct_conv.h"
namespace dnateq { namespace cpu { namespace fast {
bool direct_conv_setup(DirectConvArgs&) { return false; }
bool direct_conv_quantize_avx512(const DirectConvArgs&, int64_t, int64_t) { return false; }
void direct_conv_run_avx512(const DirectConvArgs&, int64_t, int64_t) {}
}}}
#endif
