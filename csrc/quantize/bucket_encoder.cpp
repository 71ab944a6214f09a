// The bucket-table quantizer (see bucket_encoder.h): table construction, a
// portable scalar loop, and an AVX2 loop chosen at run time.
#include "quantize/bucket_encoder.h"
#include "common/cpu_kernels.h"

#include <algorithm>
#include <cfloat>
#include <cstring>

#ifdef DNATEQ_X86
#include "quantize/encode_avx2.h"
#endif

namespace dnateq {
namespace cpu {
namespace detail {

namespace {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Every finite or infinite non-negative pattern, and NaN, below 2^31.
constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;

// Entry of a bucket with `below` thresholds under it and (if any) one inside
// whose low bits are `thr_low` (thr_low = 1 << shift: none inside, above
// every low-bit pattern). Adding the magnitude's low bits carries into bit 24
// exactly when low >= thr_low, so that
//     (entry + low) >> 24 = 1 + below + (low >= thr_low) = the biased exponent.
// (1 + below <= 127, so the sum stays below 2^32.)
inline uint32_t entry(int below, uint32_t thr_low) {
  return (static_cast<uint32_t>(1 + below) << 24) + ((1u << 24) - thr_low);
}

bool try_build(const ExpTables& t, int shift, BucketEncoder& enc) {
  const uint32_t n_buckets = (kAbsMask >> shift) + 1;
  const uint32_t none = 1u << shift;  // larger than any low-bit pattern
  // Thresholds <= 0 are below every magnitude: a constant part of the count.
  int below = 0;
  std::vector<uint32_t> pos;  // bit patterns of the positive thresholds
  pos.reserve(t.n_thr);
  for (int k = 0; k < t.n_thr; ++k) {
    const float th = t.thresholds[k];
    if (th <= 0.f) ++below; else pos.push_back(float_bits(th));
  }
  // Sorted already (thresholds are non-decreasing); two in one bucket fail.
  for (size_t i = 1; i < pos.size(); ++i) {
    if ((pos[i] >> shift) == (pos[i - 1] >> shift)) return false;
  }
  enc.table.assign(n_buckets, 0);
  uint32_t b = 0;
  int count = below;
  for (size_t i = 0; i <= pos.size(); ++i) {
    const uint32_t end = i < pos.size() ? (pos[i] >> shift) : n_buckets;
    // Buckets strictly between thresholds: `count` thresholds below, none inside.
    std::fill(enc.table.begin() + b, enc.table.begin() + end,
              entry(count, none));
    if (i == pos.size()) break;
    enc.table[end] = entry(count, pos[i] & (none - 1));
    ++count;
    b = end + 1;
  }
  enc.shift = shift;
  enc.low_mask = none - 1;
  enc.ok = true;
  return true;
}

inline int scalar_biased(const BucketEncoder& enc, uint32_t m) {
  return static_cast<int>((enc.table[m >> enc.shift] + (m & enc.low_mask)) >> 24);
}

template <bool kLevels, typename Out>
bool scalar_loop(const BucketEncoder& enc, const float* x, int64_t n, Out* out) {
  bool good = true;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = float_bits(x[i]);
    const uint32_t m = u & kAbsMask;
    good &= m < kInfBits;
    const int b = scalar_biased(enc, m);
    const bool neg = (u >> 31) != 0;
    if (kLevels) {
      const float lv = enc.t->levels[b];
      out[i] = m == 0 ? 0.f : (neg ? -lv : lv);
    } else {
      out[i] = static_cast<int8_t>(m == 0 ? 0 : (neg ? (b | kSignBit) : b));
    }
  }
  return good;
}

#ifdef DNATEQ_X86
// Table entries of 32 bucket indices. Why not _mm256_i32gather_epi32: on AMD
// Zen 3 the gather costs more than spilling the indices and loading the
// entries one by one (0.64 against 0.87 ns per element for the whole loop).
__attribute__((target("avx2"))) inline void lookup32(const uint32_t* table, const __m256i* idx,
                                                   __m256i* e) {
  alignas(32) uint32_t i32[32], e32[32];
  for (int j = 0; j < 4; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(i32 + 8 * j), idx[j]);
  for (int k = 0; k < 32; ++k) e32[k] = table[i32[k]];
  for (int j = 0; j < 4; ++j) e[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(e32 + 8 * j));
}

// 8 lanes: biased exponents (int32) of the magnitudes `m` from their table
// entries `e` (see entry()).
__attribute__((target("avx2"))) inline __m256i biased8(__m256i e, __m256i m, __m256i low_mask) {
  return _mm256_srli_epi32(_mm256_add_epi32(e, _mm256_and_si256(m, low_mask)), 24);
}

__attribute__((target("avx2"))) bool avx2_codes(const BucketEncoder& enc, const float* x,
                                                int64_t n, int8_t* out) {
  const __m128i shift = _mm_cvtsi32_si128(enc.shift);
  const __m256i low_mask = _mm256_set1_epi32(static_cast<int>(enc.low_mask));
  __m256i bad = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i u[4], m[4], idx[4], e[4], c[4];
    for (int j = 0; j < 4; ++j) {
      u[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8 * j));
      m[j] = abs8(u[j]);
      bad = flag_non_finite(bad, m[j]);
      idx[j] = _mm256_srl_epi32(m[j], shift);
    }
    lookup32(enc.table.data(), idx, e);
    for (int j = 0; j < 4; ++j) c[j] = code8(u[j], m[j], biased8(e[j], m[j], low_mask));
    store_codes32(c, out + i);
  }
  const bool good = _mm256_testz_si256(bad, bad) != 0;
  return scalar_loop<false>(enc, x + i, n - i, out + i) && good;
}

__attribute__((target("avx2"))) bool avx2_levels(const BucketEncoder& enc, const float* x,
                                                 int64_t n, float* out) {
  const __m128i shift = _mm_cvtsi32_si128(enc.shift);
  const __m256i low_mask = _mm256_set1_epi32(static_cast<int>(enc.low_mask));
  const float* levels = enc.t->levels;
  __m256i bad = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i u[4], m[4], idx[4], e[4];
    for (int j = 0; j < 4; ++j) {
      u[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8 * j));
      m[j] = abs8(u[j]);
      bad = flag_non_finite(bad, m[j]);
      idx[j] = _mm256_srl_epi32(m[j], shift);
    }
    lookup32(enc.table.data(), idx, e);
    alignas(32) int32_t b32[32];
    alignas(32) float lv32[32];
    for (int j = 0; j < 4; ++j) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(b32 + 8 * j), biased8(e[j], m[j], low_mask));
    }
    for (int k = 0; k < 32; ++k) lv32[k] = levels[b32[k]];
    for (int j = 0; j < 4; ++j) {
      store_levels8(u[j], m[j], _mm256_load_ps(lv32 + 8 * j), out + i + 8 * j);
    }
  }
  const bool good = _mm256_testz_si256(bad, bad) != 0;
  return scalar_loop<true>(enc, x + i, n - i, out + i) && good;
}

#endif

}  // namespace

void build_bucket_encoder(const ExpTables& t, BucketEncoder& enc) {
  enc.ok = false;
  enc.t = &t;
  // shift 19: 4 mantissa bits, 4096 entries (16 KB) ... shift 16: 32768 (128 KB)
  for (int shift = 19; shift >= 16; --shift) {
    if (try_build(t, shift, enc)) return;
  }
  enc.table.clear();
}

bool bucket_encode_codes(const BucketEncoder& enc, const float* x, int64_t n, int8_t* out) {
#ifdef DNATEQ_X86
  if (cpu_has_avx2()) return avx2_codes(enc, x, n, out);
#endif
  return scalar_loop<false>(enc, x, n, out);
}

bool bucket_encode_levels(const BucketEncoder& enc, const float* x, int64_t n, float* out) {
#ifdef DNATEQ_X86
  if (cpu_has_avx2()) return avx2_levels(enc, x, n, out);
#endif
  return scalar_loop<true>(enc, x, n, out);
}

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
