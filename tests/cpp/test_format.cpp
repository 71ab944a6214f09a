// Tests of the number format itself (csrc/format.h, SPEC section 1): the
// worked example's thresholds, codes and levels in both roundings, packed
// sizes and the packed field <-> code mapping.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "format.h"

namespace {

using dnateq::ExpTables;
using dnateq::Rounding;

// SPEC worked example: n = 3 (E = 3), alpha = 2, S = 0.5, beta = 0.1.
constexpr double kAlpha = 2.0, kScale = 0.5, kOffset = 0.1;
constexpr int kBits = 3;

ExpTables example_tables(Rounding r) {
  ExpTables t;
  dnateq::make_tables(t, kAlpha, kScale, kOffset, kBits, r);
  return t;
}

int8_t encode_i8(float x, const ExpTables& t) {
  return static_cast<int8_t>(dnateq::encode(x, t.thresholds, t.n_thr));
}

TEST(Format, RangeHelpers) {
  for (int n = dnateq::kMinBits; n <= dnateq::kMaxBits; ++n) {
    const int E = (1 << (n - 1)) - 1;
    EXPECT_EQ(dnateq::exp_range(n), E);
    EXPECT_EQ(dnateq::exp_bias(n), 1 << (n - 1));
    EXPECT_EQ(dnateq::num_levels(n), 2 * E + 1);         // 2^n - 1
    EXPECT_EQ(dnateq::num_thresholds(n), 2 * E);         // 2^n - 2
  }
  EXPECT_EQ(dnateq::exp_range(3), 3);
  EXPECT_EQ(dnateq::num_levels(dnateq::kMaxBits), dnateq::kMaxLevels);
  EXPECT_EQ(dnateq::num_thresholds(dnateq::kMaxBits), dnateq::kMaxThresholds);
}

TEST(Format, WorkedExampleLevels) {
  const ExpTables t = example_tables(Rounding::kNearest);
  EXPECT_EQ(t.bits, 3);
  EXPECT_EQ(t.E, 3);
  EXPECT_EQ(t.n_thr, 6);
  // levels[b], b = e + 4: 0 is the zero code.
  const double expect[8] = {0.0, 0.1625, 0.225, 0.35, 0.6, 1.1, 2.1, 4.1};
  for (int b = 0; b < 8; ++b) {
    EXPECT_NEAR(t.levels_f64[b], expect[b], 1e-15) << "b=" << b;
    EXPECT_EQ(t.levels[b], static_cast<float>(t.levels_f64[b])) << "b=" << b;
    EXPECT_FLOAT_EQ(t.levels[b], static_cast<float>(expect[b])) << "b=" << b;
  }
  // Levels do not depend on the rounding.
  const ExpTables tl = example_tables(Rounding::kLog);
  for (int b = 0; b < 8; ++b) EXPECT_EQ(tl.levels[b], t.levels[b]);
}

TEST(Format, WorkedExampleThresholdsLog) {
  const ExpTables t = example_tables(Rounding::kLog);
  // t_j = beta + S * alpha^(j + 1/2), j = -3 .. 2, rounded once to float32.
  for (int k = 0; k < 6; ++k) {
    const int j = k - 3;
    const double ref = 0.1 + 0.5 * std::pow(2.0, j + 0.5);
    EXPECT_EQ(t.thresholds[k], static_cast<float>(ref)) << "j=" << j;
  }
  // The table's value: 0.1 + 0.5 * 2^1.5 = 1.514...
  EXPECT_NEAR(t.thresholds[4], 1.5142136, 1e-6);
}

TEST(Format, WorkedExampleThresholdsNearest) {
  const ExpTables t = example_tables(Rounding::kNearest);
  const double mid[6] = {(0.1625 + 0.225) / 2, (0.225 + 0.35) / 2,
                         (0.35 + 0.6) / 2,     (0.6 + 1.1) / 2,
                         (1.1 + 2.1) / 2,      (2.1 + 4.1) / 2};
  for (int k = 0; k < 6; ++k) {
    EXPECT_FLOAT_EQ(t.thresholds[k], static_cast<float>(mid[k])) << "k=" << k;
    // Exactly the float64 formula rounded once.
    EXPECT_EQ(t.thresholds[k],
              static_cast<float>(dnateq::threshold_f64(
                  kAlpha, kScale, kOffset, k - 3, Rounding::kNearest)));
  }
  EXPECT_FLOAT_EQ(t.thresholds[4], 1.6f);
}

TEST(Format, ThresholdsSortedAllBits) {
  for (int n = dnateq::kMinBits; n <= dnateq::kMaxBits; ++n) {
    for (Rounding r : {Rounding::kLog, Rounding::kNearest}) {
      ExpTables t;
      dnateq::make_tables(t, 1.3, 0.01, 0.002, n, r);
      for (int k = 1; k < t.n_thr; ++k) {
        EXPECT_LE(t.thresholds[k - 1], t.thresholds[k]) << "n=" << n;
      }
      // Each threshold lies between the two levels it separates.
      for (int k = 0; k < t.n_thr; ++k) {
        EXPECT_GE(t.thresholds[k], t.levels[k + 1]);
        EXPECT_LE(t.thresholds[k], t.levels[k + 2]);
      }
    }
  }
}

struct ExampleRow {
  float x;
  int8_t code_log;
  int8_t code_nearest;
  float xhat_log;
};

// The SPEC's table: x, "log" code, "nearest" code, "log" x_hat.
const ExampleRow kRows[] = {
    {1.3f, 5, 5, 1.1f},
    {1.58f, 6, 5, 2.1f},
    {-0.05f, -127, -127, -0.1625f},
    {0.0f, 0, 0, 0.0f},
    {100.0f, 7, 7, 4.1f},
};

float dequant(int8_t code, const ExpTables& t) {
  const uint8_t u = static_cast<uint8_t>(code);
  const float v = t.levels[u & dnateq::kMagMask];
  return (u & dnateq::kSignBit) ? -v : v;
}

TEST(Format, WorkedExampleCodes) {
  const ExpTables tl = example_tables(Rounding::kLog);
  const ExpTables tn = example_tables(Rounding::kNearest);
  for (const auto& r : kRows) {
    EXPECT_EQ(encode_i8(r.x, tl), r.code_log) << "x=" << r.x;
    EXPECT_EQ(encode_i8(r.x, tn), r.code_nearest) << "x=" << r.x;
    EXPECT_FLOAT_EQ(dequant(encode_i8(r.x, tl), tl), r.xhat_log) << "x=" << r.x;
  }
  // -0.05 is 0x81: sign bit + biased exponent 1.
  EXPECT_EQ(dnateq::encode(-0.05f, tl.thresholds, tl.n_thr), 0x81);
  // "nearest" of 1.58 dequantizes to 1.1.
  EXPECT_FLOAT_EQ(dequant(encode_i8(1.58f, tn), tn), 1.1f);
  // -0.0 is the zero code too.
  EXPECT_EQ(dnateq::encode(-0.0f, tl.thresholds, tl.n_thr), 0);
}

TEST(Format, TiesGoUp) {
  for (Rounding r : {Rounding::kLog, Rounding::kNearest}) {
    const ExpTables t = example_tables(r);
    for (int k = 0; k < t.n_thr; ++k) {
      const float thr = t.thresholds[k];
      // |x| == t_k -> biased exponent k + 2 (the upper level).
      EXPECT_EQ(dnateq::biased_exponent(thr, t.thresholds, t.n_thr), k + 2);
      EXPECT_EQ(dnateq::biased_exponent(std::nextafter(thr, 0.f),
                                        t.thresholds, t.n_thr),
                k + 1);
      EXPECT_EQ(dnateq::encode(-thr, t.thresholds, t.n_thr),
                static_cast<uint8_t>((k + 2) | 0x80));
    }
  }
}

TEST(Format, BiasedExponentMatchesLinearCount) {
  // e = -E + #{j : |x| >= t_j}, i.e. biased = 1 + that count.
  for (int n = dnateq::kMinBits; n <= dnateq::kMaxBits; ++n) {
    ExpTables t;
    dnateq::make_tables(t, 1.7, 0.3, 0.05, n, Rounding::kLog);
    for (float m = 1e-4f; m < 1e6f; m *= 1.03f) {
      int count = 0;
      for (int k = 0; k < t.n_thr; ++k) count += (m >= t.thresholds[k]);
      ASSERT_EQ(dnateq::biased_exponent(m, t.thresholds, t.n_thr), 1 + count)
          << "n=" << n << " m=" << m;
    }
  }
}

TEST(Format, PackedRowBytes) {
  // Worked example: 5 signed elements of n=3 -> 4 bits each, 20 bits -> 1 word.
  EXPECT_EQ(dnateq::packed_field_bits(3, true), 4);
  EXPECT_EQ(dnateq::packed_field_bits(3, false), 3);
  EXPECT_EQ(dnateq::packed_row_bytes(5, 3, true), 4);
  EXPECT_EQ(dnateq::packed_row_bytes(0, 3, true), 0);
  EXPECT_EQ(dnateq::packed_row_bytes(1, 2, false), 4);
  EXPECT_EQ(dnateq::packed_row_bytes(8, 3, true), 4);    // 32 bits exactly
  EXPECT_EQ(dnateq::packed_row_bytes(9, 3, true), 8);    // 36 bits
  EXPECT_EQ(dnateq::packed_row_bytes(32, 7, false), 28); // 224 bits
  EXPECT_EQ(dnateq::packed_row_bytes(32, 7, true), 32);  // 256 bits
  EXPECT_EQ(dnateq::packed_row_bytes(33, 7, true), 36);  // 264 bits -> 9 words
  for (int n = dnateq::kMinBits; n <= dnateq::kMaxBits; ++n) {
    for (bool s : {false, true}) {
      const int b = n + (s ? 1 : 0);
      for (int64_t K = 0; K < 200; ++K) {
        const int64_t bytes = dnateq::packed_row_bytes(K, n, s);
        EXPECT_EQ(bytes % 4, 0);
        EXPECT_GE(bytes * 8, K * b);
        EXPECT_LT(bytes * 8 - K * b, 32);  // at most 31 padding bits a row
      }
    }
  }
}

TEST(Format, FieldCodeRoundTrip) {
  for (int n = dnateq::kMinBits; n <= dnateq::kMaxBits; ++n) {
    const int maxb = (1 << n) - 1;
    for (int b = 0; b <= maxb; ++b) {
      for (int sign = 0; sign < 2; ++sign) {
        const uint8_t code = static_cast<uint8_t>(b | (sign ? 0x80 : 0));
        // Signed: n+1 bits, sign in bit n.
        const uint32_t f = dnateq::code_to_field(code, n, true);
        EXPECT_LT(f, 1u << (n + 1));
        EXPECT_EQ(f, static_cast<uint32_t>(b | (sign << n)));
        EXPECT_EQ(dnateq::field_to_code(f, n, true), code);
      }
      // Unsigned: n bits, the sign is dropped.
      const uint8_t code = static_cast<uint8_t>(b);
      const uint32_t f = dnateq::code_to_field(code, n, false);
      EXPECT_EQ(f, static_cast<uint32_t>(b));
      EXPECT_EQ(dnateq::field_to_code(f, n, false), code);
    }
    // Every signed field maps to a code and back.
    for (uint32_t f = 0; f < (1u << (n + 1)); ++f) {
      EXPECT_EQ(dnateq::code_to_field(dnateq::field_to_code(f, n, true), n, true),
                f);
    }
  }
  // Worked example, "log" codes: 1.3 -> 5 -> field 0b0101; -0.05 -> 0x81 -> 0b1001.
  EXPECT_EQ(dnateq::code_to_field(5, 3, true), 5u);
  EXPECT_EQ(dnateq::code_to_field(0x81, 3, true), 9u);
}

}  // namespace
