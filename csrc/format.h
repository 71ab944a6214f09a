// The DNA-TEQ number format (SPEC section 1), shared by CPU kernels, CUDA
// kernels and C++ tests. Everything that decides a code or a level lives here
// so that all backends agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DNATEQ_HD __host__ __device__ __forceinline__
#else
#define DNATEQ_HD inline
#endif

namespace dnateq {

constexpr int kMinBits = 2;
constexpr int kMaxBits = 7;
// Largest table sizes, for fixed-size arrays (n = 7).
constexpr int kMaxLevels = (1 << kMaxBits) - 1;          // 127 magnitudes
constexpr int kMaxThresholds = (1 << kMaxBits) - 2;      // 126 thresholds

enum class Rounding : int { kLog = 0, kNearest = 1 };

// E = 2^(n-1) - 1: exponents run over [-E, E].
DNATEQ_HD int exp_range(int bits) { return (1 << (bits - 1)) - 1; }
// Biased exponent = e + 2^(n-1); 0 is reserved for exact zero.
DNATEQ_HD int exp_bias(int bits) { return 1 << (bits - 1); }
// Number of nonzero magnitudes, 2^n - 1 (biased exponents 1 .. 2^n - 1).
DNATEQ_HD int num_levels(int bits) { return (1 << bits) - 1; }
// Number of decision thresholds, 2E = 2^n - 2.
DNATEQ_HD int num_thresholds(int bits) { return (1 << bits) - 2; }

// Code layout (unpacked int8): bit 7 = sign, bits 0..n-1 = biased exponent,
// bits n..6 always 0.
constexpr uint8_t kSignBit = 0x80;
constexpr uint8_t kMagMask = 0x7f;

// Level of exponent e, in float64: S * alpha^e + beta.
inline double level_f64(double alpha, double scale, double offset, int e) {
  return scale * std::pow(alpha, static_cast<double>(e)) + offset;
}

// Decision threshold j in [-E, E-1] separating levels j and j+1, in float64.
// "log": beta + S*alpha^(j+1/2) (the paper's log-domain rounding);
// "nearest": the linear midpoint of the two levels.
inline double threshold_f64(double alpha, double scale, double offset, int j,
                            Rounding rounding) {
  if (rounding == Rounding::kLog) {
    return offset + scale * std::pow(alpha, static_cast<double>(j) + 0.5);
  }
  return offset + scale * 0.5 *
                      (std::pow(alpha, static_cast<double>(j)) +
                       std::pow(alpha, static_cast<double>(j + 1)));
}

// The normative tables of one (alpha, S, beta, n, rounding): thresholds
// computed in float64 and rounded once to float32; levels likewise.
struct ExpTables {
  int bits = 0;
  int E = 0;
  int n_thr = 0;
  // thresholds[k], k = 0 .. 2E-1, is t_j with j = k - E (non-decreasing).
  float thresholds[kMaxThresholds];
  // levels[b], b = biased exponent 0 .. 2^n - 1; levels[0] = 0 (zero code).
  float levels[kMaxLevels + 1];
  // The same levels in float64 (post-processing and error accounting).
  double levels_f64[kMaxLevels + 1];
};

inline void make_tables(ExpTables& t, double alpha, double scale,
                        double offset, int bits, Rounding rounding) {
  t.bits = bits;
  t.E = exp_range(bits);
  t.n_thr = num_thresholds(bits);
  for (int k = 0; k < t.n_thr; ++k) {
    t.thresholds[k] = static_cast<float>(
        threshold_f64(alpha, scale, offset, k - t.E, rounding));
  }
  t.levels[0] = 0.f;
  t.levels_f64[0] = 0.0;
  for (int b = 1; b <= num_levels(bits); ++b) {
    const double v = level_f64(alpha, scale, offset, b - exp_bias(bits));
    t.levels_f64[b] = v;
    t.levels[b] = static_cast<float>(v);
  }
}

// Biased exponent of a finite nonzero magnitude: 1 + #{k : |x| >= t_k}
// (ties go up). Thresholds are sorted, so this is an upper_bound.
DNATEQ_HD int biased_exponent(float mag, const float* thr, int n_thr) {
  int lo = 0, hi = n_thr;  // count of thresholds <= mag lies in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (mag >= thr[mid]) lo = mid + 1; else hi = mid;
  }
  return 1 + lo;
}

// Full quantizer for one finite float: returns the int8 code bits.
DNATEQ_HD uint8_t encode(float x, const float* thr, int n_thr) {
  if (x == 0.f) return 0;  // also -0.0
  const float mag = std::fabs(x);
  const uint8_t b = static_cast<uint8_t>(biased_exponent(mag, thr, n_thr));
  return x < 0.f ? static_cast<uint8_t>(b | kSignBit) : b;
}

// Value of every int8 code byte (256 entries): sign * level of the biased
// exponent; zero codes and codes with bits n..6 set (invalid, rejected by
// the operators) read 0.
inline void code_values(const ExpTables& t, float* lut) {
  const int max_mag = num_levels(t.bits);
  for (int c = 0; c < 256; ++c) {
    const int mag = c & kMagMask;
    const float lv = mag <= max_mag ? t.levels[mag] : 0.f;
    lut[c] = (c & kSignBit) ? -lv : lv;
  }
}

// Packed bits per element: sign + exponent for signed tensors, exponent only
// for unsigned ones.
DNATEQ_HD int packed_field_bits(int bits, bool is_signed) {
  return is_signed ? bits + 1 : bits;
}
// Bytes of one packed row of K elements: rows start on 4-byte boundaries.
DNATEQ_HD int64_t packed_row_bytes(int64_t K, int bits, bool is_signed) {
  const int64_t b = packed_field_bits(bits, is_signed);
  return 4 * ((K * b + 31) / 32);
}
// Packed field of one code: signed -> (sign << n) | biased; unsigned -> biased.
DNATEQ_HD uint32_t code_to_field(uint8_t code, int bits, bool is_signed) {
  const uint32_t mag = code & kMagMask;
  if (!is_signed) return mag;
  return ((code & kSignBit) ? (1u << bits) : 0u) | mag;
}
DNATEQ_HD uint8_t field_to_code(uint32_t field, int bits, bool is_signed) {
  const uint8_t mag = static_cast<uint8_t>(field & ((1u << bits) - 1u));
  if (!is_signed) return mag;
  return static_cast<uint8_t>(((field >> bits) & 1u) ? (mag | kSignBit) : mag);
}

// Value of every field of a packed tensor (2^b of 256 entries filled, b =
// n+1 signed or n unsigned; the rest 0): sign * level.
inline void field_values(const ExpTables& t, bool is_signed, float* lut) {
  const int b = packed_field_bits(t.bits, is_signed);
  for (uint32_t f = 0; f < 256; ++f) {
    if (f >= (1u << b)) { lut[f] = 0.f; continue; }
    const uint8_t code = field_to_code(f, t.bits, is_signed);
    const float lv = t.levels[code & kMagMask];
    lut[f] = (code & kSignBit) ? -lv : lv;
  }
}

}  // namespace dnateq
