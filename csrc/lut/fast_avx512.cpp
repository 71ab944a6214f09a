// AVX-512 GEMV of the LUT fast path (M <= 8 activation rows) on the offline
// weight layout of fast_layout.h: the weight levels live in registers and are
// read with vpermps / vpermi2b, fused into the FMA loop; fp32 accumulation in
// registers, flushed to double every kFlush inputs.
//
// The whole file is compiled for AVX-512 (F, BW, VL, DQ, VBMI) through the
// pragma below, so that it needs no build flag of its own and the same source
// builds with setup.py and CMake. It includes only <immintrin.h> and C
// headers with no inline code shared with other translation units (the
// functions here are called only after a run-time CPU check).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,bmi2")
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "lut/encode_avx512.h"
#include "lut/fast_layout.h"

namespace dnateq {
namespace cpu {
namespace fast {
namespace {

constexpr int64_t kFlush = 4096;  // inputs per fp32 partial sum

// Local min/max: std::min/max from <algorithm> would be inline code compiled
// for AVX-512 here that the linker may share with other translation units.
inline int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
inline int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }

// Per-lane counts of Kind1's plane decode (see Kind1::Planes), constants so
// that a kernel call only loads them: lane i of half h rotates plane bit
// 16h + i to bit 4, or shifts it to bit 31.
struct PlaneCounts {
  alignas(64) int32_t v[2][16];
};
constexpr PlaneCounts plane_counts(bool rotate) {
  PlaneCounts c{};
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 16; ++i) c.v[h][i] = rotate ? (36 - 16 * h - i) & 31 : 31 - 16 * h - i;
  return c;
}
alignas(64) constexpr PlaneCounts kRot4Counts = plane_counts(true);
alignas(64) constexpr PlaneCounts kShiftCounts = plane_counts(false);
constexpr const int32_t (&kPlaneRot4)[2][16] = kRot4Counts.v;
constexpr const int32_t (&kPlaneShift)[2][16] = kShiftCounts.v;

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

// Magnitude levels of one row (biased exponent -> float), 2^bits entries
// (entry 0 = 0), padded with zeros to `pad` (a multiple of 16).
inline void row_levels(const GemvArgs& a, int64_t n, float* lv, int pad) {
  const int L = 1 << a.bits;
  if (!a.scale) {
    for (int i = 0; i < pad; i += 16) {
      const __mmask16 k = i < L ? static_cast<__mmask16>(L - i >= 16 ? 0xFFFF : (1u << (L - i)) - 1) : 0;
      _mm512_storeu_ps(lv + i, _mm512_maskz_loadu_ps(k, a.levels + i));
    }
    lv[0] = 0.f;
    return;
  }
  const __m512d s = _mm512_set1_pd(static_cast<double>(a.scale[n]));
  const __m512d o = _mm512_set1_pd(static_cast<double>(a.offset[n]));
  for (int i = 0; i < pad; i += 8) {
    const __mmask8 k = i < L ? static_cast<__mmask8>(L - i >= 8 ? 0xFF : (1u << (L - i)) - 1) : 0;
    // scale * pw + offset in double (not fused), rounded once to float
    const __m512d v = _mm512_add_pd(_mm512_mul_pd(s, _mm512_maskz_loadu_pd(k, a.pw + i)), o);
    _mm256_storeu_ps(lv + i, _mm256_maskz_mov_ps(k, _mm512_cvtpd_ps(v)));
  }
  lv[0] = 0.f;
}

// ---------------------------------------------------------------- kind 1 --
// NT: register tables of 16 levels (1, or 2 picked by field bit 4);
// SG: plane index of the sign bit (-1: the field table holds the sign).
template <int NT, int SG>
struct Kind1 {
  using Table = __m512;
  static constexpr int kTables = NT;       // register tables per weight row
  static constexpr int64_t kGroup = 32;    // fields per layout group
  static constexpr int kPlanes = (NT == 2 ? 1 : 0) + (SG >= 0 ? 1 : 0);
  static constexpr int64_t kGroupBytes = 16 + 4 * kPlanes;

  // The register tables of one row.
  static inline void tables(const GemvArgs& a, int64_t n, __m512* t) {
    alignas(64) float lv[32];
    row_levels(a, n, lv, 32);
    if (SG < 0 && a.is_signed) {
      // b <= 4: the table is indexed by the whole field (sign at bit `bits`).
      const int h = 1 << a.bits;
      alignas(64) float f[16];
      for (int i = 0; i < 16; ++i) {
        f[i] = i < h ? lv[i] : (i < 2 * h ? -lv[i - h] : 0.f);
      }
      t[0] = _mm512_load_ps(f);
    } else {
      t[0] = _mm512_load_ps(lv);
      if constexpr (NT == 2) t[1] = _mm512_load_ps(lv + 16);
    }
  }

  // The field bits above the nibble come as 32-bit plane words (bit j = field
  // j of the group). They are moved into each lane with vector shifts rather
  // than k-masks: a mask from a general register (kmov) and the masked permute
  // both issue on port 5 with the permutes themselves, which made n = 5 as
  // slow as the byte layout of n = 7. Per half h (fields 16h .. 16h + 15):
  // rot4 rotates plane bit 16h + i to bit 4 of lane i (the table-select bit
  // of vpermt2ps); shs shifts it to bit 31 (the float's sign).
  struct Planes {
    __m512i rot4[2], shs[2];
    Planes() {
      for (int h = 0; h < 2; ++h) {
        rot4[h] = _mm512_load_si512(kPlaneRot4[h]);
        shs[h] = _mm512_load_si512(kPlaneShift[h]);
      }
    }
  };

  // Levels of the 16 fields of half h whose low nibbles are the low 4 bits of
  // `idx`; b4 and bs hold the broadcast plane words of field bit 4 and of the
  // sign.
  static inline __m512 lookup(__m512i idx, const __m512* t, const Planes& pl, int h, __m512i b4,
                              __m512i bs) {
    __m512 v;
    if constexpr (NT == 2) {
      // bit 4 of the index from the plane, bits 0-3 from the nibble (bits
      // above 4 are ignored by vpermt2ps): (C ? B : A) with C = 0x10.
      const __m512i i5 = _mm512_ternarylogic_epi32(idx, _mm512_rolv_epi32(b4, pl.rot4[h]),
                                                   _mm512_set1_epi32(16), 0xD8);
      v = _mm512_permutex2var_ps(t[0], i5, t[1]);
    } else {
      v = _mm512_permutexvar_ps(idx, t[0]);
    }
    if constexpr (SG >= 0) {
      // A ^ (B & C) with C = the sign bit: flips the level's sign.
      v = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
          _mm512_castps_si512(v), _mm512_sllv_epi32(bs, pl.shs[h]),
          _mm512_set1_epi32(static_cast<int>(0x80000000u)), 0x78));
    }
    return v;
  }

  // The two halves of one group at p.
  static inline void group(const uint8_t* p, const __m512* t, const Planes& pl, __m512* v) {
    const __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i d1 = _mm512_srli_epi32(d0, 4);
    __m512i b4 = _mm512_setzero_si512(), bs = _mm512_setzero_si512();
    if constexpr (NT == 2) b4 = _mm512_set1_epi32(static_cast<int>(load_u32(p + 16)));
    if constexpr (SG >= 0) bs = _mm512_set1_epi32(static_cast<int>(load_u32(p + 16 + 4 * SG)));
    v[0] = lookup(d0, t, pl, 0, b4, bs);
    v[1] = lookup(d1, t, pl, 1, b4, bs);
  }

  // R rows starting at row n (their tables at tb, kTables each), M
  // activation rows, groups [g_lo, g_hi): out[r * M + m] += the partial sums.
  template <int M, int R>
  static void rows(const GemvArgs& a, int64_t n, const Table* tb, int64_t g_lo, int64_t g_hi,
                   double* out) {
    const Planes pl;
    __m512 t[R][NT];
    const uint8_t* base[R];
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < NT; ++j) t[r][j] = tb[r * NT + j];
      base[r] = a.data + (n + r) * a.row_bytes;
    }
    double total[R][M] = {};
    const int64_t gflush = kFlush / 32;
    for (int64_t g0 = g_lo; g0 < g_hi; g0 += gflush) {
      const int64_t g1 = g_hi - g0 < gflush ? g_hi : g0 + gflush;
      __m512 acc[R][M];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
      for (int64_t g = g0; g < g1; ++g) {
        const float* xg = a.x + 32 * g;
        for (int r = 0; r < R; ++r) {
          __m512 v[2];
          group(base[r] + g * kGroupBytes, t[r], pl, v);
          const __m512 v0 = v[0], v1 = v[1];
          for (int m = 0; m < M; ++m) {
            const float* xm = xg + m * a.Kp;
            acc[r][m] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(xm), acc[r][m]);
            acc[r][m] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xm + 16), acc[r][m]);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) total[r][m] += _mm512_reduce_add_ps(acc[r][m]);
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) out[r * M + m] += total[r][m];
  }
};

// ---------------------------------------------------------------- kind 2 --
// One byte per field: 4 byte-plane tables of 128 entries (2 registers each)
// read with vpermi2b, the sign bit XOR-ed into the top byte.
struct Kind2 {
  using Table = __m512i;
  static constexpr int kTables = 8;
  static constexpr int64_t kGroup = 64;
  static inline void tables(const GemvArgs& a, int64_t n, __m512i* t) {
    alignas(64) float lv[128];
    row_levels(a, n, lv, 128);
    // Byte plane p of the 128 levels: 2 registers (entries 0..63, 64..127).
    // Each 64-byte register of floats is rearranged so that its bytes are
    // grouped by plane, then the four 16-byte pieces are collected.
    alignas(64) uint8_t planes[4][128];
    const __m512i split = _mm512_set_epi8(
        63, 59, 55, 51, 47, 43, 39, 35, 31, 27, 23, 19, 15, 11, 7, 3,
        62, 58, 54, 50, 46, 42, 38, 34, 30, 26, 22, 18, 14, 10, 6, 2,
        61, 57, 53, 49, 45, 41, 37, 33, 29, 25, 21, 17, 13, 9, 5, 1,
        60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0);
    for (int c = 0; c < 8; ++c) {  // 16 floats each
      const __m512i v = _mm512_permutexvar_epi8(split, _mm512_load_si512(lv + 16 * c));
      alignas(64) uint8_t tmp[64];
      _mm512_store_si512(tmp, v);
      for (int p = 0; p < 4; ++p) memcpy(planes[p] + 16 * c, tmp + 16 * p, 16);
    }
    for (int p = 0; p < 4; ++p) {
      t[2 * p] = _mm512_load_si512(planes[p]);
      t[2 * p + 1] = _mm512_load_si512(planes[p] + 64);
    }
  }

  // The 64 float levels of one 64-byte index group, in input order: one byte
  // plane per permute, the top byte's bit 7 flipped by the index's (the sign;
  // levels may be negative for beta < 0), then the bytes interleaved into
  // floats. Shared by the GEMV below and decode_kind2.
  static inline void group(const __m512i* t, const uint8_t* p, __m512i sign, __m512* w) {
    const __m512i idx = _mm512_loadu_si512(p);
    const __m512i b0 = _mm512_permutex2var_epi8(t[0], idx, t[1]);
    const __m512i b1 = _mm512_permutex2var_epi8(t[2], idx, t[3]);
    const __m512i b2 = _mm512_permutex2var_epi8(t[4], idx, t[5]);
    const __m512i b3 = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t[6], idx, t[7]),
                                                 idx, sign, 0x78);
    const __m512i lo01 = _mm512_unpacklo_epi8(b0, b1), hi01 = _mm512_unpackhi_epi8(b0, b1);
    const __m512i lo23 = _mm512_unpacklo_epi8(b2, b3), hi23 = _mm512_unpackhi_epi8(b2, b3);
    w[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23));
    w[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23));
    w[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23));
    w[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23));
  }

  template <int M, int R>
  static void rows(const GemvArgs& a, int64_t n, const Table* tb, int64_t g_lo, int64_t g_hi,
                   double* out) {
    static_assert(R == 1, "kind 2 decodes one row at a time");
    __m512i t[8];
    for (int j = 0; j < 8; ++j) t[j] = tb[j];
    const uint8_t* base = a.data + n * a.row_bytes;
    constexpr int NA = M <= 4 ? 2 : 1;
    double total[M] = {};
    const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
    const int64_t gflush = kFlush / 64;
    for (int64_t g0 = g_lo; g0 < g_hi; g0 += gflush) {
      const int64_t g1 = g_hi - g0 < gflush ? g_hi : g0 + gflush;
      __m512 acc[M][NA];
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < NA; ++j) acc[m][j] = _mm512_setzero_ps();
      for (int64_t g = g0; g < g1; ++g) {
        __m512 w[4];
        group(t, base + 64 * g, sign, w);
        const __m512 w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
        const float* xg = a.x + 64 * g;
        for (int m = 0; m < M; ++m) {
          const float* xm = xg + m * a.Kp;
          acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
          acc[m][NA - 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][NA - 1]);
          acc[m][0] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), acc[m][0]);
          acc[m][NA - 1] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), acc[m][NA - 1]);
        }
      }
      for (int m = 0; m < M; ++m) {
        __m512 s = acc[m][0];
        if (NA == 2) s = _mm512_add_ps(s, acc[m][1]);
        total[m] += _mm512_reduce_add_ps(s);
      }
    }
    for (int m = 0; m < M; ++m) out[m] += total[m];
  }
};

// Weight rows per block: their register tables are built once and kept while
// the block runs every K slice (a multiple of every kernel's R).
constexpr int64_t kBlockRows = 16;
// Bytes of activations one K slice may hold: M rows of a slice stay in L1
// while every weight row of the block reads them. Without slicing, M = 8
// rows of K = 4096 (128 KiB) were re-read from L2 for each weight row, which
// bound the kernel at M = 8 to the L2 bandwidth (1.2x fp32 time, not 5x).
constexpr int64_t kSliceBytes = 32 << 10;

// The slices depend only on M and K, so every output gets the same
// arithmetic at any thread count and in any row range.
template <typename KindT, int M, int R>
void run_rows(const GemvArgs& a, int64_t n0, int64_t n1) {
  using Table = typename KindT::Table;
  constexpr int T = KindT::kTables;
  const int64_t G = a.Kp / KindT::kGroup;
  const int64_t slice = imax(1, kSliceBytes / (4 * M * KindT::kGroup));
  alignas(64) Table tb[kBlockRows * T];
  double part[kBlockRows * M];
  for (int64_t nb = n0; nb < n1; nb += kBlockRows) {
    const int64_t ne = imin(n1, nb + kBlockRows);
    for (int64_t n = nb; n < ne; ++n) KindT::tables(a, n, tb + (n - nb) * T);
    for (int64_t i = 0; i < (ne - nb) * M; ++i) part[i] = 0.0;
    for (int64_t g0 = 0; g0 < G; g0 += slice) {
      const int64_t g1 = imin(G, g0 + slice);
      int64_t n = nb;
      for (; n + R <= ne; n += R)
        KindT::template rows<M, R>(a, n, tb + (n - nb) * T, g0, g1, part + (n - nb) * M);
      for (; n < ne; ++n)
        KindT::template rows<M, 1>(a, n, tb + (n - nb) * T, g0, g1, part + (n - nb) * M);
    }
    for (int64_t n = nb; n < ne; ++n) {
      const double b = a.bias ? static_cast<double>(a.bias[n]) : 0.0;
      for (int m = 0; m < M; ++m)
        a.y[m * a.ldy + n] = static_cast<float>(part[(n - nb) * M + m] + b);
    }
  }
}

template <typename KindT, int M>
void dispatch_r(const GemvArgs& a, int64_t n0, int64_t n1) {
  if constexpr (std::is_same_v<KindT, Kind2>) {
    run_rows<KindT, M, 1>(a, n0, n1);
  } else {
    // Weight rows decoded together: each activation load then feeds R
    // FMAs. On AMD Zen 4 (one 512-bit load and FMA per cycle) R = 1 at
    // M = 5..8 was bound by the activation loads, R = 2 at M = 3..4 likewise.
    constexpr int R = M <= 4 ? 4 : 2;
    run_rows<KindT, M, R>(a, n0, n1);
  }
}

template <typename KindT>
void dispatch_m(const GemvArgs& a, int64_t n0, int64_t n1) {
  switch (a.M) {
    case 1: return dispatch_r<KindT, 1>(a, n0, n1);
    case 2: return dispatch_r<KindT, 2>(a, n0, n1);
    case 3: return dispatch_r<KindT, 3>(a, n0, n1);
    case 4: return dispatch_r<KindT, 4>(a, n0, n1);
    case 5: return dispatch_r<KindT, 5>(a, n0, n1);
    case 6: return dispatch_r<KindT, 6>(a, n0, n1);
    case 7: return dispatch_r<KindT, 7>(a, n0, n1);
    default: return dispatch_r<KindT, 8>(a, n0, n1);
  }
}

template <int STEPS>
bool encode_codes_t(const float* thr, int n_thr, const float* x, int64_t n, int8_t* out) {
  const Search<STEPS> search(thr, n_thr);
  const CodeLut<STEPS> code;
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i inf = _mm512_set1_epi32(0x7F800000);
  const __m512i sgn = _mm512_set1_epi32(0x80);
  __mmask16 bad = 0;
  // int32 codes of the lanes k of the raw bits u (0 in the other lanes)
  auto codes16 = [&](__m512i u, __mmask16 k) {
    const __m512i mi = _mm512_and_si512(u, absmask);
    bad |= _mm512_mask_cmpge_epu32_mask(k, mi, inf);   // Inf or NaN
    const __mmask16 nz = _mm512_mask_test_epi32_mask(k, mi, mi);
    __m512i c = code(search(_mm512_castsi512_ps(mi)));
    c = _mm512_mask_or_epi32(c, _mm512_movepi32_mask(u), c, sgn);
    return _mm512_maskz_mov_epi32(nz, c);
  };
  int64_t i = 0;
  // 64 inputs per step, their codes packed into one 64-byte store: the
  // narrowing store (vpmovdb to memory) costs several cycles on AMD Zen 4.
  for (; i + 64 <= n; i += 64) {
    __m128i c8[4];
    for (int j = 0; j < 4; ++j) {
      c8[j] = _mm512_cvtepi32_epi8(codes16(_mm512_loadu_si512(x + i + 16 * j), 0xFFFF));
    }
    __m512i p = _mm512_castsi128_si512(c8[0]);
    p = _mm512_inserti32x4(p, c8[1], 1);
    p = _mm512_inserti32x4(p, c8[2], 2);
    p = _mm512_inserti32x4(p, c8[3], 3);
    _mm512_storeu_si512(out + i, p);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_cvtepi32_storeu_epi8(out + i, k, codes16(_mm512_maskz_loadu_epi32(k, x + i), k));
  }
  return bad == 0;
}

template <int STEPS>
bool encode_levels_t(const float* thr, int n_thr, const float* levels, const float* x,
                     int64_t n, float* out) {
  const Search<STEPS> search(thr, n_thr);
  const LevelLut<STEPS> lut(levels, n_thr);
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512i u = _mm512_maskz_loadu_epi32(k, x + i);
    _mm512_mask_storeu_ps(out + i, k, quantize16(search, lut, u, k, &bad));
  }
  return bad == 0;
}

// ------------------------------------------------------ word encoder --
// The codes of 64 inputs per step, searched on the top 16 bits of |x| (the
// positive floats' bit patterns order like the values): twice the lanes of
// the float search per instruction. Exact when the positive thresholds'
// top 16 bits are distinct (word_keys checks): then the key search counts
// pos' = #{k : key_k <= key(|x|)}, which overcounts only the threshold
// k = pos' - 1 whose key equals |x|'s and whose low 16 bits exceed |x|'s,
// and one lookup of that threshold's two halves takes it back. Thresholds
// <= 0 are below every magnitude: a constant `below` in the code table.
// Step st's probe keys by bit-reversed rank (probe_entries; pad: the key of
// +inf, above every finite magnitude's).
constexpr uint16_t kKeyPad = 0x7F80;
template <int STEPS>
struct WordProbes {
  alignas(64) uint16_t t[STEPS][64];
  WordProbes(const uint16_t* key, int n_pos) {
    for (int st = 0; st < STEPS; ++st) probe_entries(key, n_pos, kKeyPad, STEPS, st, t[st]);
  }
  // The decisions of the first cs steps for key mh (the low cs bits of q), as
  // the vector search makes them.
  int prefix(int cs, uint32_t mh) const {
    int q = 0;
    for (int st = 0; st < cs; ++st)
      if (mh >= t[st][q]) q |= 1 << st;
    return q;
  }
};

// The first CS steps of the word search in one table lookup. The keys are
// cut into 64 cells, cell(mh) = min(((mh -sat base) * f) >> 16, 63), with f
// such that at most one probe of those steps lies inside a cell (a probe at
// a cell's first key does not split it). A cell then holds the CS decisions
// of its keys below that probe (lo) and at or above it (hi): two vpermi2w
// (the probe; lo and hi in one word), a compare and a masked shift, after
// the cell's three instructions, replace CS steps of three. Not `ok` where
// the probes are too uneven for 64 cells (e.g. thresholds crowded above
// beta > 0): the caller tries a smaller CS.
template <int STEPS, int CS>
struct CellStart {
  // lohi: the two prefixes of a cell in one word, lo | hi << 8
  __m512i base, f, probe[2], lohi[2];
  bool ok = false;
  static uint32_t cell(uint32_t mh, uint32_t b, uint32_t ff) {
    const uint32_t d = mh > b ? mh - b : 0;
    const uint32_t c = (d * ff) >> 16;
    return c < 63 ? c : 63;
  }
  explicit CellStart(const WordProbes<STEPS>& pr) {
    uint16_t p[64];   // the probes of the first CS steps, sorted
    int np = 0;
    for (int st = 0; st < CS; ++st)
      for (int j = 0; j < (1 << st); ++j) {
        const uint16_t v = pr.t[st][j];
        if (v == kKeyPad) continue;
        int k = np++;
        for (; k > 0 && p[k - 1] > v; --k) p[k] = p[k - 1];
        p[k] = v;
      }
    if (np == 0) return;
    // Cells from the smallest probe on; else cell 0 keeps the smallest probe
    // alone and cells 1..63 start at the second. The second layout helps
    // where beta < 0 puts the smallest positive threshold far below the rest.
    const uint32_t span = p[np - 1] - p[0];
    const uint32_t f0 = span == 0 ? 65535u : imin(65535, (64 * 65536 - 1) / span);
    if (build(pr, p, np, p[0], f0)) return;
    if (np < 3) return;
    const uint32_t f1 = imin(65535, (63 * 65536 - 1) / (p[np - 1] - p[1]));
    const uint32_t w1 = (65536 + f1 - 1) / f1;   // keys of cell 0's share
    if (p[1] > w1) build(pr, p, np, p[1] - w1, f1);
  }
  // The tables for cell(mh) = min(((mh -sat b) * ff) >> 16, 63); false (and
  // nothing set) where two probes lie inside one cell.
  bool build(const WordProbes<STEPS>& pr, const uint16_t* p, int np, uint32_t b, uint32_t ff) {
    alignas(64) uint16_t K[64], L[64], H[64];
    for (int c = 0; c < 64; ++c) K[c] = 0xFFFF;   // no split: never >= (mh <= 0x7FFF)
    for (int i = 0; i < np; ++i) {
      if (p[i] == 0) continue;
      const uint32_t c = cell(p[i], b, ff);
      if (cell(p[i] - 1u, b, ff) != c) continue;   // at the cell's first key
      if (K[c] != 0xFFFF && K[c] != p[i]) return false;   // two probes inside one cell
      K[c] = p[i];
    }
    for (uint32_t c = 0; c < 64; ++c) {
      // first key of cell c: the least d with (d * ff) >> 16 >= c
      const uint32_t first = c == 0 ? 0 : b + (c * 65536u + ff - 1) / ff;
      const uint32_t next = c == 63 ? 0x10000u : b + ((c + 1) * 65536u + ff - 1) / ff;
      // keys from kKeyPad on are Inf / NaN, which the encoder rejects
      const uint32_t last = (next > kKeyPad ? kKeyPad : next) - 1;
      if (first > last) {   // no finite key reaches this cell
        L[c] = H[c] = 0;
        continue;
      }
      L[c] = static_cast<uint16_t>(pr.prefix(CS, first));
      H[c] = static_cast<uint16_t>(pr.prefix(CS, last));
      if (K[c] == 0xFFFF && L[c] != H[c]) return false;   // (cannot happen: a split is a probe)
    }
    base = _mm512_set1_epi16(static_cast<short>(b));
    f = _mm512_set1_epi16(static_cast<short>(ff));
    for (int c = 0; c < 64; ++c) L[c] = static_cast<uint16_t>(L[c] | H[c] << 8);
    for (int r = 0; r < 2; ++r) {
      probe[r] = _mm512_load_si512(K + 32 * r);
      lohi[r] = _mm512_load_si512(L + 32 * r);
    }
    ok = true;
    return true;
  }
  inline __m512i operator()(__m512i mh) const {
    const __m512i c = _mm512_min_epu16(_mm512_mulhi_epu16(_mm512_subs_epu16(mh, base), f),
                                       _mm512_set1_epi16(63));
    const __m512i k = _mm512_permutex2var_epi16(probe[0], c, probe[1]);
    const __m512i v = _mm512_permutex2var_epi16(lohi[0], c, lohi[1]);
    // hi where mh >= the cell's probe, else lo with hi left in bits 8..15:
    // every later reader of q (the steps' and lookups' permutes, which read
    // its low 5-7 bits, and the narrowing to bytes) ignores those bits, and
    // the steps set bits CS.. (< 8), still 0, without a carry into them.
    return _mm512_mask_srli_epi16(v, _mm512_cmpge_epu16_mask(mh, k), v, 8);
  }
};
template <int STEPS>
struct CellStart<STEPS, 0> {
  bool ok = true;
  explicit CellStart(const WordProbes<STEPS>&) {}
  inline __m512i operator()(__m512i) const { return _mm512_setzero_si512(); }
};

template <int STEPS, int CS>
struct WordSearch {
  // step st's probe keys by bit-reversed rank (64 words in 2 registers)
  __m512i tab[STEPS][2];
  // By rank q: the key (fk, q < 64) and low half (fl[0]: q < 64, fl[1]: q =
  // 64..127) of threshold pos' - 1 (key 0xFFFF: none, never equal), and (128
  // bytes in 2 registers) the biased exponent pos' + 1. Only 7 steps have
  // ranks from 64 on, and there the last step's probe stands in for fk (see
  // rank), so a 64-entry key table serves every depth.
  __m512i fk[2], fl[2][2], code[2];
  const CellStart<STEPS, CS>& start;
  WordSearch(const WordProbes<STEPS>& pr, const CellStart<STEPS, CS>& cs, const uint16_t* key,
             const uint16_t* low, int n_pos, int below)
      : start(cs) {
    constexpr int S = 1 << STEPS;
    for (int st = 0; st < STEPS; ++st) {
      tab[st][0] = _mm512_load_si512(pr.t[st]);
      tab[st][1] = _mm512_load_si512(pr.t[st] + 32);
    }
    alignas(64) uint16_t a[128], b[128];
    alignas(64) uint8_t c[128];
    for (int q = 0; q < 128; ++q) {
      const int pos = q < S ? bitrev(q, STEPS) : 0;
      a[q] = pos >= 1 && pos <= n_pos ? key[pos - 1] : static_cast<uint16_t>(0xFFFF);
      b[q] = pos >= 1 && pos <= n_pos ? low[pos - 1] : 0;
      c[q] = static_cast<uint8_t>(1 + below + pos);
    }
    for (int h = 0; h < 2; ++h) {
      code[h] = _mm512_load_si512(c + 64 * h);
      fk[h] = _mm512_load_si512(a + 32 * h);
      for (int r = 0; r < 2; ++r) fl[h][r] = _mm512_load_si512(b + 64 * h + 32 * r);
    }
  }
  // Bit-reversed ranks pos' of the magnitudes whose top / low halves are mh /
  // ml; *over: the lanes whose pos' counts one threshold too many.
  inline __m512i rank(__m512i mh, __m512i ml, __mmask32* over) const {
    __m512i q = start(mh);
    constexpr int kLoop = STEPS == 7 ? 6 : STEPS;   // the 7th step is below
    for (int st = CS; st < kLoop; ++st) {
      __m512i probe;
      if (st == 0) probe = tab[0][0];
      else if (st <= 5) probe = _mm512_permutexvar_epi16(q, tab[st][0]);
      else probe = _mm512_permutex2var_epi16(tab[st][0], q, tab[st][1]);
      const __mmask32 ge = _mm512_cmpge_epu16_mask(mh, probe);
      q = _mm512_mask_add_epi16(q, ge, q, _mm512_set1_epi16(static_cast<short>(1 << st)));  // bit st is still 0: add = or
    }
    // The key and low half of threshold pos' - 1, by the 6-bit prefix q.
    __m512i kv = _mm512_permutex2var_epi16(fk[0], q, fk[1]);
    __m512i lv = _mm512_permutex2var_epi16(fl[0][0], q, fl[0][1]);
    if constexpr (STEPS == 7) {
      // Where the 7th step says "at or above", pos' is odd and threshold
      // pos' - 1 is that step's probe: its key is in a register, its low half
      // in fl[1] by the prefix. So 64-entry lookups (one vpermi2w each) do
      // for 128 ranks (else two and a blend each).
      const __m512i probe = _mm512_permutex2var_epi16(tab[6][0], q, tab[6][1]);
      const __mmask32 ge = _mm512_cmpge_epu16_mask(mh, probe);
      kv = _mm512_mask_blend_epi16(ge, kv, probe);
      lv = _mm512_mask_blend_epi16(ge, lv, _mm512_permutex2var_epi16(fl[1][0], q, fl[1][1]));
      q = _mm512_mask_add_epi16(q, ge, q, _mm512_set1_epi16(64));
    }
    *over = _mm512_mask_cmplt_epu16_mask(_mm512_cmpeq_epu16_mask(mh, kv), ml, lv);
    return q;
  }
  // Biased exponents (bytes) of the ranks q8 (bytes), less one in lanes `over`.
  inline __m512i codes(__m512i q8, __mmask64 over) const {
    const __m512i c = _mm512_permutex2var_epi8(code[0], q8, code[1]);
    return _mm512_mask_sub_epi8(c, over, c, _mm512_set1_epi8(1));
  }
};

template <int STEPS, int CS>
bool word_codes_t(const WordProbes<STEPS>& pr, const CellStart<STEPS, CS>& cs,
                  const uint16_t* key, const uint16_t* low, int n_pos, int below,
                  const float* x, int64_t n, int8_t* out, int64_t* done) {
  const WordSearch<STEPS, CS> search(pr, cs, key, low, n_pos, below);
  // word 2i+1 / 2i of the 32 dwords of two registers: their top / low halves;
  // byte 2k of two word registers: the low bytes of their 64 words
  alignas(64) uint16_t ih[32], il[32];
  alignas(64) uint8_t ib[64];
  for (int i = 0; i < 32; ++i) {
    ih[i] = static_cast<uint16_t>(2 * i + 1);
    il[i] = static_cast<uint16_t>(2 * i);
  }
  for (int k = 0; k < 64; ++k) ib[k] = static_cast<uint8_t>(2 * k);
  const __m512i idx_h = _mm512_load_si512(ih), idx_l = _mm512_load_si512(il);
  const __m512i idx_b = _mm512_load_si512(ib);
  const __m512i absmask = _mm512_set1_epi16(0x7FFF);
  __m512i top = _mm512_setzero_si512();   // largest magnitude key seen (NaN/Inf check)
  int64_t i = 0;
  // 64 inputs per step: two word searches of 32, whose ranks are narrowed
  // to bytes in one permute, so that the biased exponents come from one
  // byte lookup and the sign, the correction and zero are one masked
  // instruction each for 64 codes.
  for (; i + 64 <= n; i += 64) {
    __m512i q[2];
    __mmask32 over[2], nz[2], neg[2];
    for (int j = 0; j < 2; ++j) {
      const __m512i u0 = _mm512_loadu_si512(x + i + 32 * j);
      const __m512i u1 = _mm512_loadu_si512(x + i + 32 * j + 16);
      const __m512i h = _mm512_permutex2var_epi16(u0, idx_h, u1);
      const __m512i l = _mm512_permutex2var_epi16(u0, idx_l, u1);
      const __m512i mh = _mm512_and_si512(h, absmask);
      top = _mm512_max_epu16(top, mh);
      const __m512i any = _mm512_or_si512(mh, l);
      nz[j] = _mm512_test_epi16_mask(any, any);
      neg[j] = _mm512_movepi16_mask(h);
      q[j] = search.rank(mh, l, &over[j]);
    }
    __m512i c = search.codes(_mm512_permutex2var_epi8(q[0], idx_b, q[1]),
                             _mm512_kunpackd(over[1], over[0]));
    // the sign bit (c < 0x80: add = or)
    c = _mm512_mask_add_epi8(c, _mm512_kunpackd(neg[1], neg[0]), c,
                             _mm512_set1_epi8(static_cast<char>(0x80)));
    _mm512_storeu_si512(out + i, _mm512_maskz_mov_epi8(_mm512_kunpackd(nz[1], nz[0]), c));
  }
  *done = i;
  return !_mm512_cmpge_epu16_mask(top, _mm512_set1_epi16(static_cast<short>(kKeyPad)));
}

inline int search_steps(int n_thr) {
  int st = 1;
  while ((1 << st) < n_thr + 1) ++st;
  return st;
}

// f(std::integral_constant<int, STEPS>) for the search depth of n_thr
// thresholds: the one switch from a run-time count to the encoders' template.
template <typename F>
inline bool with_steps(int n_thr, F&& f) {
  switch (search_steps(n_thr)) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    default: return f(std::integral_constant<int, 7>{});
  }
}

}  // namespace

namespace {

// The word encoder's tables from the thresholds, or false when two positive
// thresholds share their top 16 bits (alpha near 1, or a huge range).
bool word_keys(const float* thr, int n_thr, uint16_t* key, uint16_t* low, int* n_pos,
               int* below) {
  int b = 0, p = 0;
  for (int k = 0; k < n_thr; ++k) {
    if (!(thr[k] > 0.f)) {
      if (p > 0) return false;   // not sorted as expected: keep the float search
      ++b;
      continue;
    }
    uint32_t u;
    memcpy(&u, thr + k, 4);
    key[p] = static_cast<uint16_t>(u >> 16);
    low[p] = static_cast<uint16_t>(u & 0xFFFF);
    if (p > 0 && key[p] <= key[p - 1]) return false;
    ++p;
  }
  *n_pos = p;
  *below = b;
  return true;
}

// Inputs from which a cell start pays for building its tables.
constexpr int64_t kCellMinInputs = 1024;

// word_codes_t with the largest cell start of CS, CS - 1, ..., 4 steps that
// the probes allow, else none: a cell start saves work only from 4 steps on
// (its 7 instructions against 3 a step, 2 for the first).
template <int STEPS, int CS>
bool word_codes_cs(const WordProbes<STEPS>& pr, const uint16_t* key, const uint16_t* low,
                   int n_pos, int below, const float* x, int64_t n, int8_t* out, int64_t* done,
                   EncodePlan* plan) {
  if constexpr (CS >= 4) {
    if (n >= kCellMinInputs) {
      const CellStart<STEPS, CS> cs(pr);
      if (cs.ok) {
        *plan = static_cast<EncodePlan>(CS);
        return word_codes_t(pr, cs, key, low, n_pos, below, x, n, out, done);
      }
    }
    return word_codes_cs<STEPS, CS - 1>(pr, key, low, n_pos, below, x, n, out, done, plan);
  } else {
    const CellStart<STEPS, 0> none(pr);
    *plan = EncodePlan::kWord;
    return word_codes_t(pr, none, key, low, n_pos, below, x, n, out, done);
  }
}

bool word_codes(const float* thr, int n_thr, const float* x, int64_t n, int8_t* out,
                int64_t* done, EncodePlan* plan) {
  uint16_t key[128], low[128];
  int n_pos = 0, below = 0;
  *done = 0;
  if (n < 64 || !word_keys(thr, n_thr, key, low, &n_pos, &below)) return true;
  return with_steps(n_pos, [&](auto st) {
    constexpr int S = decltype(st)::value;
    const WordProbes<S> pr(key, n_pos);
    return word_codes_cs<S, (S < 5 ? S : 5)>(pr, key, low, n_pos, below, x, n, out, done, plan);
  });
}

}  // namespace

bool encode_codes_avx512(const float* thr, int n_thr, const float* x, int64_t n, int8_t* out,
                         EncodePlan* plan) {
  // The word encoder where it is exact, the float search for the rest (a
  // tail of < 64 inputs, or thresholds too dense for 16-bit keys).
  int64_t done = 0;
  EncodePlan used = EncodePlan::kFloat;
  const bool ok = word_codes(thr, n_thr, x, n, out, &done, &used);
  if (plan) *plan = used;
  x += done;
  out += done;
  n -= done;
  if (n == 0) return ok;
  return with_steps(n_thr, [&](auto st) {
    return encode_codes_t<decltype(st)::value>(thr, n_thr, x, n, out) && ok;
  });
}

bool encode_levels_avx512(const float* thr, int n_thr, const float* levels, const float* x,
                          int64_t n, float* out) {
  return with_steps(n_thr, [&](auto st) {
    return encode_levels_t<decltype(st)::value>(thr, n_thr, levels, x, n, out);
  });
}

namespace {

// Rows [n0, n1) of the layout decoded to float levels, Kp values per row
// (padding fields decode to 0) at out + (n - n0) * ld: the same register
// tables and lookups as the GEMV above, stored instead of multiplied.
template <int NT, int SG>
void decode_kind1(const GemvArgs& a, int64_t n0, int64_t n1, float* out, int64_t ld) {
  using KT = Kind1<NT, SG>;
  const typename KT::Planes pl;
  const int64_t G = a.Kp / 32;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 t[NT];
    KT::tables(a, n, t);
    const uint8_t* base = a.data + n * a.row_bytes;
    float* o = out + (n - n0) * ld;
    for (int64_t g = 0; g < G; ++g) {
      __m512 v[2];
      KT::group(base + g * KT::kGroupBytes, t, pl, v);
      _mm512_storeu_ps(o + 32 * g, v[0]);
      _mm512_storeu_ps(o + 32 * g + 16, v[1]);
    }
  }
}

void decode_kind2(const GemvArgs& a, int64_t n0, int64_t n1, float* out, int64_t ld) {
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t G = a.Kp / 64;
  for (int64_t n = n0; n < n1; ++n) {
    __m512i t[8];
    Kind2::tables(a, n, t);
    const uint8_t* base = a.data + n * a.row_bytes;
    float* o = out + (n - n0) * ld;
    for (int64_t g = 0; g < G; ++g) {
      __m512 w[4];
      Kind2::group(t, base + 64 * g, sign, w);
      for (int q = 0; q < 4; ++q) _mm512_storeu_ps(o + 64 * g + 16 * q, w[q]);
    }
  }
}

}  // namespace

void decode_rows_avx512(const GemvArgs& a, int64_t n0, int64_t n1, float* out, int64_t ld) {
  if (a.kind == 2) return decode_kind2(a, n0, n1, out, ld);
  const int b = a.is_signed ? a.bits + 1 : a.bits;
  if (b <= 4) return decode_kind1<1, -1>(a, n0, n1, out, ld);
  if (a.is_signed && b == 5) return decode_kind1<1, 0>(a, n0, n1, out, ld);
  if (!a.is_signed) return decode_kind1<2, -1>(a, n0, n1, out, ld);
  return decode_kind1<2, 1>(a, n0, n1, out, ld);
}

void gemv_avx512(const GemvArgs& a, int64_t n0, int64_t n1) {
  if (a.kind == 2) return dispatch_m<Kind2>(a, n0, n1);
  const int b = a.is_signed ? a.bits + 1 : a.bits;
  if (b <= 4) return dispatch_m<Kind1<1, -1>>(a, n0, n1);
  if (a.is_signed && b == 5) return dispatch_m<Kind1<1, 0>>(a, n0, n1);   // n = 4
  if (!a.is_signed) return dispatch_m<Kind1<2, -1>>(a, n0, n1);          // n = 5
  return dispatch_m<Kind1<2, 1>>(a, n0, n1);                              // n = 5 signed
}

}  // namespace fast
}  // namespace cpu
}  // namespace dnateq

#else  // not x86-64: never called (the dispatcher checks the CPU first)
#include "lut/fast_layout.h"
namespace dnateq { namespace cpu { namespace fast {
void gemv_avx512(const GemvArgs&, int64_t, int64_t) {}
void decode_rows_avx512(const GemvArgs&, int64_t, int64_t, float*, int64_t) {}
bool encode_codes_avx512(const float*, int, const float*, int64_t, int8_t*, EncodePlan*) {
  return false;
}
bool encode_levels_avx512(const float*, int, const float*, const float*, int64_t, float*) {
  return false;
}
}}}
#endif
