// Tests of the CPU operators through their C++ entry points (csrc/ops.h,
// namespace dnateq::cpu), against independent brute-force references written
// from SPEC sections 1, 2, 4 and 5.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "format.h"
#include "ops.h"

namespace {

namespace cpu = dnateq::cpu;
using dnateq::ExpTables;
using dnateq::Rounding;

// ----------------------------------------------------------------- helpers --

ExpTables tables(double alpha, double scale, double offset, int bits,
                 Rounding r = Rounding::kNearest) {
  ExpTables t;
  dnateq::make_tables(t, alpha, scale, offset, bits, r);
  return t;
}

at::Tensor f32(const std::vector<float>& v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kFloat));
}

std::vector<int8_t> to_codes(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  EXPECT_EQ(c.scalar_type(), at::kChar);
  return std::vector<int8_t>(c.data_ptr<int8_t>(), c.data_ptr<int8_t>() + c.numel());
}

std::vector<float> to_floats(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

at::Tensor codes_tensor(const std::vector<int8_t>& v, at::IntArrayRef shape) {
  return at::from_blob(const_cast<int8_t*>(v.data()),
                       {static_cast<int64_t>(v.size())}, at::kChar)
      .clone()
      .reshape(shape);
}

// Random valid codes for `bits`: biased exponent uniform in [0, 2^n - 1]
// (0 = zero), zero_frac extra zeros, random sign (or none if !with_sign).
// Zero codes sometimes carry the sign bit (0x80): still zero.
std::vector<int8_t> random_codes(std::mt19937& rng, int64_t n, int bits,
                                 bool with_sign, double zero_frac = 0.2) {
  std::uniform_int_distribution<int> mag(1, (1 << bits) - 1);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int8_t> out(n);
  for (auto& c : out) {
    const bool neg = with_sign && u(rng) < 0.5;
    const int m = u(rng) < zero_frac ? 0 : mag(rng);
    c = static_cast<int8_t>(static_cast<uint8_t>(m | (neg ? 0x80 : 0)));
  }
  return out;
}

// Exact value of a code in float64 from the SPEC formula s*(S*alpha^e+beta).
double value_f64(int8_t code, const ExpTables& t) {
  const uint8_t u = static_cast<uint8_t>(code);
  const int b = u & 0x7f;
  if (b == 0) return 0.0;
  const double v = t.levels_f64[b];
  return (u & 0x80) ? -v : v;
}

int sgn(int8_t code) { return (static_cast<uint8_t>(code) & 0x80) ? -1 : 1; }
int bexp(int8_t code) { return static_cast<uint8_t>(code) & 0x7f; }

struct Params {
  double alpha, sa, ba, sw, bw;
};

// y = sum_i a_hat_i * w_hat_i in float64 (the definition Eq. 8 rewrites);
// also returns sum_i |a_hat_i * w_hat_i| for a relative tolerance.
std::pair<double, double> brute_dot(const int8_t* a, const int8_t* w, int64_t K,
                                    const ExpTables& ta, const ExpTables& tw) {
  double y = 0.0, mag = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    const double p = value_f64(a[i], ta) * value_f64(w[i], tw);
    y += p;
    mag += std::fabs(p);
  }
  return {y, mag};
}

// Eq. 8 with explicit counts C1..C4 over the pairs whose codes are both
// nonzero, each final count clamped to counter_bits when given.
double ref_count_dot(const int8_t* a, const int8_t* w, int64_t K, int bits,
                     const Params& p, int counter_bits /* 0 = exact */) {
  const int E = dnateq::exp_range(bits);
  const int bias = dnateq::exp_bias(bits);
  std::vector<int64_t> c1(4 * E + 1, 0), c2(2 * E + 1, 0), c3(2 * E + 1, 0);
  int64_t c4 = 0;
  for (int64_t i = 0; i < K; ++i) {
    if (bexp(a[i]) == 0 || bexp(w[i]) == 0) continue;
    const int s = sgn(a[i]) * sgn(w[i]);
    const int ea = bexp(a[i]) - bias, ew = bexp(w[i]) - bias;
    c1[ea + ew + 2 * E] += s;
    c2[ew + E] += s;
    c3[ea + E] += s;
    c4 += s;
  }
  auto clamp = [&](int64_t v) {
    if (counter_bits == 0) return v;
    const int64_t hi = (int64_t{1} << (counter_bits - 1)) - 1;
    const int64_t lo = -(int64_t{1} << (counter_bits - 1));
    return std::min(hi, std::max(lo, v));
  };
  double t1 = 0, t2 = 0, t3 = 0;
  for (int k = -2 * E; k <= 2 * E; ++k)
    t1 += static_cast<double>(clamp(c1[k + 2 * E])) * std::pow(p.alpha, k);
  for (int k = -E; k <= E; ++k) {
    t2 += static_cast<double>(clamp(c2[k + E])) * std::pow(p.alpha, k);
    t3 += static_cast<double>(clamp(c3[k + E])) * std::pow(p.alpha, k);
  }
  return p.sa * p.sw * t1 + p.ba * p.sw * t2 + p.sa * p.bw * t3 +
         p.ba * p.bw * static_cast<double>(clamp(c4));
}

// The precomputed weight terms of SPEC section 4 (python: dnateq.weight_terms):
// int32 [rows, 2^n], [r, b] = sum of sign(w) over the row where biased = b.
at::Tensor weight_terms(const std::vector<int8_t>& w, int64_t rows, int bits) {
  const int64_t K = static_cast<int64_t>(w.size()) / rows;
  at::Tensor t = at::zeros({rows, int64_t{1} << bits}, at::kInt);
  int32_t* p = t.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < K; ++i) {
      const int8_t c = w[r * K + i];
      if (bexp(c)) p[r * (1 << bits) + bexp(c)] += sgn(c);
    }
  }
  return t;
}

// Packing reference: element i of a row occupies stream bits [i*b, (i+1)*b);
// LSB-first little-endian 32-bit words make stream bit q = byte q/8, bit q%8.
std::vector<uint8_t> ref_pack_row(const int8_t* codes, int64_t K, int bits,
                                  bool is_signed) {
  const int b = is_signed ? bits + 1 : bits;
  std::vector<uint8_t> out(dnateq::packed_row_bytes(K, bits, is_signed), 0);
  for (int64_t i = 0; i < K; ++i) {
    const uint8_t u = static_cast<uint8_t>(codes[i]);
    uint32_t field = u & 0x7f;
    if (is_signed && (u & 0x80)) field |= 1u << bits;
    for (int j = 0; j < b; ++j) {
      if ((field >> j) & 1u) {
        const int64_t q = i * b + j;
        out[q / 8] |= static_cast<uint8_t>(1u << (q % 8));
      }
    }
  }
  return out;
}

bool contains_word(const std::string& msg, const std::string& word) {
  auto is_id = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
  };
  for (size_t pos = msg.find(word); pos != std::string::npos;
       pos = msg.find(word, pos + 1)) {
    const bool left = pos == 0 || !is_id(msg[pos - 1]);
    const size_t end = pos + word.size();
    const bool right = end >= msg.size() || !is_id(msg[end]);
    if (left && right) return true;
  }
  return false;
}

// Runs f, expects a c10::Error whose message names every word in `words`.
template <class F>
void expect_error_naming(F&& f, std::initializer_list<std::string> words) {
  try {
    f();
    ADD_FAILURE() << "expected a c10::Error naming " << *words.begin();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const auto& w : words) {
      EXPECT_TRUE(contains_word(msg, w))
          << "message does not name '" << w << "': " << msg;
    }
  }
}

const c10::optional<at::Tensor> kNoTensor = c10::nullopt;
const c10::optional<int64_t> kExact = c10::nullopt;

// Parameters with finite levels for every n (alpha^(2E) stays moderate).
Params params_for(int bits) {
  const int E = dnateq::exp_range(bits);
  const double alpha = std::min(2.0, std::exp(6.0 / E));
  return {alpha, 0.05, 0.01, 0.02, -0.003};  // negative bw on purpose
}

// --------------------------------------------------------------- quantize --

TEST(Quantize, WorkedExample) {
  const at::Tensor x = f32({1.3f, 1.58f, -0.05f, 0.0f, 100.0f, -0.0f});
  EXPECT_EQ(to_codes(cpu::exp_quantize(x, 2.0, 0.5, 0.1, 3, "log", true)),
            (std::vector<int8_t>{5, 6, -127, 0, 7, 0}));
  EXPECT_EQ(to_codes(cpu::exp_quantize(x, 2.0, 0.5, 0.1, 3, "nearest", true)),
            (std::vector<int8_t>{5, 5, -127, 0, 7, 0}));
  const at::Tensor q = cpu::exp_quantize(x, 2.0, 0.5, 0.1, 3, "log", true);
  EXPECT_EQ(q.scalar_type(), at::kChar);
  EXPECT_EQ(q.sizes(), x.sizes());
  // x_hat ("log"): 1.1, 2.1, -0.1625, 0, 4.1.
  const auto xh = to_floats(cpu::exp_dequantize(q, 2.0, 0.5, 0.1, 3, at::kFloat));
  const std::vector<float> expect = {1.1f, 2.1f, -0.1625f, 0.f, 4.1f, 0.f};
  for (size_t i = 0; i < expect.size(); ++i) EXPECT_FLOAT_EQ(xh[i], expect[i]);
}

TEST(Quantize, MatchesFormatEncoderAllBits) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int bits = dnateq::kMinBits; bits <= dnateq::kMaxBits; ++bits) {
    for (Rounding r : {Rounding::kLog, Rounding::kNearest}) {
      const Params p = params_for(bits);
      const ExpTables t = tables(p.alpha, 0.05, 0.01, bits, r);
      // Odd length: crosses block boundaries with a ragged tail.
      std::vector<float> xs(5003);
      for (size_t i = 0; i < xs.size(); ++i) {
        xs[i] = (i % 17 == 0) ? 0.f : nd(rng) * std::pow(2.f, nd(rng) * 3);
      }
      // Exact thresholds and their neighbours: ties go up.
      for (int k = 0; k < t.n_thr; ++k) {
        xs.push_back(t.thresholds[k]);
        xs.push_back(-std::nextafter(t.thresholds[k], 0.f));
      }
      const at::Tensor x = f32(xs);
      const auto got = to_codes(cpu::exp_quantize(
          x, p.alpha, 0.05, 0.01, bits,
          r == Rounding::kLog ? "log" : "nearest", true));
      ASSERT_EQ(got.size(), xs.size());
      for (size_t i = 0; i < xs.size(); ++i) {
        ASSERT_EQ(static_cast<uint8_t>(got[i]),
                  dnateq::encode(xs[i], t.thresholds, t.n_thr))
            << "bits=" << bits << " x=" << xs[i];
      }
    }
  }
}

TEST(Quantize, HalfBFloat16AndStridedInputs) {
  at::manual_seed(0);
  const at::Tensor x = at::randn({37, 53}) * 3;
  for (auto dt : {at::kHalf, at::kBFloat16}) {
    const at::Tensor xh = x.to(dt);
    // Half/bfloat16 are widened to float32 first.
    EXPECT_TRUE(at::equal(cpu::exp_quantize(xh, 1.5, 0.1, 0.02, 4, "nearest", true),
                          cpu::exp_quantize(xh.to(at::kFloat), 1.5, 0.1, 0.02, 4,
                                            "nearest", true)));
  }
  const at::Tensor xt = x.t();  // non-contiguous
  const at::Tensor q = cpu::exp_quantize(xt, 1.5, 0.1, 0.02, 4, "log", true);
  EXPECT_EQ(q.sizes(), xt.sizes());
  EXPECT_TRUE(at::equal(q, cpu::exp_quantize(xt.contiguous(), 1.5, 0.1, 0.02, 4,
                                             "log", true)));
  // Empty input.
  EXPECT_EQ(cpu::exp_quantize(at::empty({0, 3}), 1.5, 0.1, 0.02, 4, "log", true)
                .sizes(),
            (std::vector<int64_t>{0, 3}));
}

TEST(Quantize, NegativeOffsetAndTinyMagnitudes) {
  // SPEC: e = -E where |x| - beta <= 0; formulas apply for any beta.
  const at::Tensor x = f32({0.05f, -0.1f, 0.1f, 1e-30f});
  const auto c = to_codes(cpu::exp_quantize(x, 2.0, 0.5, 0.1, 3, "log", true));
  EXPECT_EQ(c, (std::vector<int8_t>{1, -127, 1, 1}));
  const auto cn = to_codes(cpu::exp_quantize(x, 2.0, 0.5, -0.05, 3, "nearest", true));
  const ExpTables t = tables(2.0, 0.5, -0.05, 3, Rounding::kNearest);
  for (size_t i = 0; i < cn.size(); ++i) {
    EXPECT_EQ(static_cast<uint8_t>(cn[i]),
              dnateq::encode(to_floats(x)[i], t.thresholds, t.n_thr));
  }
}

// ------------------------------------------------------------- dequantize --

TEST(Dequantize, LevelsSignsZeroAndDtypes) {
  const ExpTables t = tables(2.0, 0.5, 0.1, 3);
  std::vector<int8_t> codes;
  for (int b = 0; b < 8; ++b) {
    codes.push_back(static_cast<int8_t>(b));
    codes.push_back(static_cast<int8_t>(static_cast<uint8_t>(b | 0x80)));
  }
  const at::Tensor c = codes_tensor(codes, {2, 8});
  const at::Tensor y = cpu::exp_dequantize(c, 2.0, 0.5, 0.1, 3, at::kFloat);
  EXPECT_EQ(y.scalar_type(), at::kFloat);
  EXPECT_EQ(y.sizes(), c.sizes());
  const auto v = to_floats(y);
  for (size_t i = 0; i < codes.size(); ++i) {
    // Biased exponent 0 is zero whatever the sign bit.
    EXPECT_EQ(v[i], static_cast<float>(value_f64(codes[i], t))) << "i=" << i;
  }
  EXPECT_EQ(v[1], 0.f);  // 0x80
  for (auto dt : {at::kHalf, at::kBFloat16}) {
    const at::Tensor yd = cpu::exp_dequantize(c, 2.0, 0.5, 0.1, 3, dt);
    EXPECT_EQ(yd.scalar_type(), dt);
    EXPECT_TRUE(at::equal(yd, y.to(dt)));
  }
}

TEST(Dequantize, RoundTripAllBits) {
  std::mt19937 rng(2);
  for (int bits = dnateq::kMinBits; bits <= dnateq::kMaxBits; ++bits) {
    const Params p = params_for(bits);
    const ExpTables t = tables(p.alpha, p.sa, p.ba, bits);
    const auto codes = random_codes(rng, 999, bits, true);
    const at::Tensor c = codes_tensor(codes, {999});
    const at::Tensor y = cpu::exp_dequantize(c, p.alpha, p.sa, p.ba, bits, at::kFloat);
    const auto v = to_floats(y);
    for (size_t i = 0; i < codes.size(); ++i) {
      ASSERT_EQ(v[i], static_cast<float>(value_f64(codes[i], t)));
    }
    // Quantizing a level gives its code back (sign-bit zeros become 0).
    const auto back = to_codes(cpu::exp_quantize(y, p.alpha, p.sa, p.ba, bits,
                                                 "nearest", true));
    for (size_t i = 0; i < codes.size(); ++i) {
      const int8_t want = bexp(codes[i]) ? codes[i] : 0;
      ASSERT_EQ(back[i], want) << "bits=" << bits << " i=" << i;
    }
  }
}

// ---------------------------------------------------------- pack / unpack --

TEST(Pack, WorkedExampleBytes) {
  // "log" codes of the worked example: 5, 6, -127 (0x81), 0, 7; signed,
  // 4 bits each: fields 5, 6, 9, 0, 7 -> word 0x00070965.
  const at::Tensor c = codes_tensor({5, 6, -127, 0, 7}, {5});
  const at::Tensor p = cpu::exp_pack(c, 3, true);
  EXPECT_EQ(p.scalar_type(), at::kByte);
  EXPECT_EQ(p.sizes(), (std::vector<int64_t>{1, 4}));
  const uint8_t* b = p.data_ptr<uint8_t>();
  EXPECT_EQ(b[0], 0x65);
  EXPECT_EQ(b[1], 0x09);
  EXPECT_EQ(b[2], 0x07);
  EXPECT_EQ(b[3], 0x00);
  EXPECT_TRUE(at::equal(cpu::exp_unpack(p, 3, true, {5}), c));
}

TEST(Pack, RoundTripAndLayoutAllBits) {
  std::mt19937 rng(3);
  const std::vector<std::vector<int64_t>> shapes = {
      {7}, {3, 32}, {5, 33}, {4, 3, 3, 3}, {2, 1}, {1, 257}, {6, 0}};
  for (int bits = dnateq::kMinBits; bits <= dnateq::kMaxBits; ++bits) {
    for (bool is_signed : {true, false}) {
      for (const auto& shape : shapes) {
        int64_t numel = 1;
        for (auto s : shape) numel *= s;
        // A 1-D tensor is one row; otherwise d0 rows of d1*d2*... elements.
        const int64_t rows = shape.size() == 1 ? 1 : shape[0];
        const int64_t K = shape.size() == 1 ? shape[0] : (rows ? numel / rows : 0);
        const auto codes = random_codes(rng, numel, bits, is_signed);
        const at::Tensor c = codes_tensor(codes, shape);
        const at::Tensor p = cpu::exp_pack(c, bits, is_signed);
        const int64_t rb = dnateq::packed_row_bytes(K, bits, is_signed);
        ASSERT_EQ(p.sizes(), (std::vector<int64_t>{rows, rb}))
            << "bits=" << bits << " signed=" << is_signed << " K=" << K;
        // Byte-exact against the bit-stream reference.
        for (int64_t r = 0; r < rows; ++r) {
          const auto ref = ref_pack_row(codes.data() + r * K, K, bits, is_signed);
          const uint8_t* got = p.data_ptr<uint8_t>() + r * rb;
          for (int64_t j = 0; j < rb; ++j) {
            ASSERT_EQ(got[j], ref[j]) << "bits=" << bits << " signed=" << is_signed
                                      << " K=" << K << " row " << r << " byte " << j;
          }
        }
        const at::Tensor u = cpu::exp_unpack(p, bits, is_signed, shape);
        ASSERT_EQ(u.scalar_type(), at::kChar);
        ASSERT_TRUE(at::equal(u, c)) << "bits=" << bits << " signed=" << is_signed;
      }
    }
  }
}

TEST(Pack, ByteSizeMatchesBitClaim) {
  // A 4-D conv weight [O, I, kh, kw] packs as O rows of I*kh*kw elements.
  const at::Tensor c = at::zeros({64, 3, 7, 7}, at::kChar);
  for (int bits = dnateq::kMinBits; bits <= dnateq::kMaxBits; ++bits) {
    for (bool s : {true, false}) {
      const at::Tensor p = cpu::exp_pack(c, bits, s);
      const int64_t b = bits + (s ? 1 : 0);
      EXPECT_EQ(p.size(0), 64);
      EXPECT_EQ(p.size(1), 4 * ((147 * b + 31) / 32));
      EXPECT_LE(p.numel() * 8 - 64 * 147 * b, 64 * 31);
    }
  }
}

TEST(Pack, Rejections) {
  // Bits above n set.
  expect_error_naming(
      [] { cpu::exp_pack(codes_tensor({1, 8}, {2}), 3, true); }, {"codes"});
  // Sign bit in an unsigned tensor.
  expect_error_naming(
      [] { cpu::exp_pack(codes_tensor({1, -127}, {2}), 3, false); },
      {"codes", "signed"});
  // Wrong packed shape for the declared tensor shape.
  const at::Tensor p = cpu::exp_pack(codes_tensor({1, 2, 3}, {3}), 3, true);
  expect_error_naming([&] { cpu::exp_unpack(p, 3, true, {40}); }, {"packed"});
  expect_error_naming([&] { cpu::exp_unpack(p.to(at::kChar), 3, true, {3}); },
                      {"packed"});
  expect_error_naming([] { cpu::exp_pack(at::zeros({3}, at::kFloat), 3, true); },
                      {"codes"});
}

// ----------------------------------------------------------- linear count --

struct LinearCase {
  int bits;
  std::vector<int64_t> a_shape;  // [..., K]
  int64_t N;
  bool a_signed;
  double zero_frac;
};

TEST(LinearCount, MatchesBruteForceDotProduct) {
  std::mt19937 rng(4);
  std::vector<LinearCase> cases;
  for (int bits = dnateq::kMinBits; bits <= dnateq::kMaxBits; ++bits) {
    cases.push_back({bits, {5, 37}, 11, true, 0.2});
    cases.push_back({bits, {2, 3, 64}, 7, false, 0.5});
    cases.push_back({bits, {1, 300}, 3, true, 0.0});
    cases.push_back({bits, {40}, 9, true, 0.9});  // 1-D activation
  }
  for (const auto& cs : cases) {
    const Params p = params_for(cs.bits);
    const ExpTables ta = tables(p.alpha, p.sa, p.ba, cs.bits);
    const ExpTables tw = tables(p.alpha, p.sw, p.bw, cs.bits);
    const int64_t K = cs.a_shape.back();
    int64_t M = 1;
    for (auto s : cs.a_shape) M *= s;
    M /= K;
    const auto a = random_codes(rng, M * K, cs.bits, cs.a_signed, cs.zero_frac);
    const auto w = random_codes(rng, cs.N * K, cs.bits, true, 0.1);
    std::vector<float> bias(cs.N);
    for (int64_t n = 0; n < cs.N; ++n) bias[n] = 0.25f * static_cast<float>(n) - 1.f;
    for (bool with_bias : {false, true}) {
      const c10::optional<at::Tensor> b =
          with_bias ? c10::optional<at::Tensor>(f32(bias)) : c10::nullopt;
      const at::Tensor y = cpu::exp_linear_count(
          codes_tensor(a, cs.a_shape), codes_tensor(w, {cs.N, K}), p.alpha, p.sa,
          p.ba, p.sw, p.bw, cs.bits, b, kExact, kNoTensor);
      std::vector<int64_t> out_shape = cs.a_shape;
      out_shape.back() = cs.N;
      ASSERT_EQ(y.sizes(), out_shape);
      ASSERT_EQ(y.scalar_type(), at::kFloat);
      const auto v = to_floats(y);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < cs.N; ++n) {
          auto [ref, mag] = brute_dot(a.data() + m * K, w.data() + n * K, K, ta, tw);
          if (with_bias) ref += bias[n];
          ASSERT_NEAR(v[m * cs.N + n], ref, 1e-6 * (mag + std::fabs(ref)) + 1e-30)
              << "bits=" << cs.bits << " K=" << K << " m=" << m << " n=" << n;
        }
      }
    }
  }
}

TEST(LinearCount, WorkedExampleByHand) {
  // a = [1.1, -0.1625], w = [2.1, 0.6] at n=3, alpha=2, S=0.5, beta=0.1:
  // y = 1.1*2.1 - 0.1625*0.6 = 2.2125.
  const at::Tensor a = codes_tensor({5, -127}, {1, 2});
  const at::Tensor w = codes_tensor({6, 4}, {1, 2});
  const at::Tensor y = cpu::exp_linear_count(a, w, 2.0, 0.5, 0.1, 0.5, 0.1, 3,
                                             kNoTensor, kExact, kNoTensor);
  EXPECT_NEAR(y.item<float>(), 2.2125f, 1e-6);
}

TEST(LinearCount, WeightTermsGiveTheDirectCountExactly) {
  std::mt19937 rng(5);
  for (int bits = dnateq::kMinBits; bits <= dnateq::kMaxBits; ++bits) {
    const Params p = params_for(bits);
    const int64_t M = 6, K = 129, N = 13;
    const auto w = random_codes(rng, N * K, bits, true, 0.1);
    const at::Tensor wt = weight_terms(w, N, bits);
    const at::Tensor wc = codes_tensor(w, {N, K});
    // Unsigned activations: few zeros (terms pay), many zeros (direct), and
    // signed activations (terms must not be misused).
    for (double zf : {0.0, 0.1, 0.45, 0.55, 0.9, 1.0}) {
      for (bool a_signed : {false, true}) {
        const auto a = random_codes(rng, M * K, bits, a_signed, zf);
        const at::Tensor ac = codes_tensor(a, {M, K});
        const at::Tensor direct = cpu::exp_linear_count(
            ac, wc, p.alpha, p.sa, p.ba, p.sw, p.bw, bits, kNoTensor, kExact, kNoTensor);
        const at::Tensor with_terms = cpu::exp_linear_count(
            ac, wc, p.alpha, p.sa, p.ba, p.sw, p.bw, bits, kNoTensor, kExact, wt);
        ASSERT_TRUE(at::equal(direct, with_terms))
            << "bits=" << bits << " zero_frac=" << zf << " signed=" << a_signed
            << " max diff " << (direct - with_terms).abs().max().item<float>();
      }
    }
  }
}

TEST(LinearCount, CounterBitsClampConstructed) {
  // K = 300 pairs all at e_a = e_w = 0 with positive sign: C1[0] = C2[0] =
  // C3[0] = C4 = 300, so y = (sa*sw + ba*sw + sa*bw + ba*bw) * count, and an
  // 8-bit counter clamps every count to 127 (or -128 for negative products).
  const int bits = 3, K = 300;
  const double alpha = 1.7, sa = 0.5, ba = 0.25, sw = 2.0, bw = 0.125;
  const double f = sa * sw + ba * sw + sa * bw + ba * bw;  // alpha^0 = 1
  const int8_t one = static_cast<int8_t>(dnateq::exp_bias(bits));  // e = 0
  const at::Tensor a = at::full({1, K}, one, at::kChar);
  at::Tensor w = at::full({2, K}, one, at::kChar);
  w[1].fill_(static_cast<int8_t>(static_cast<uint8_t>(one | 0x80)));  // negative
  const at::Tensor exact = cpu::exp_linear_count(a, w, alpha, sa, ba, sw, bw, bits,
                                                 kNoTensor, kExact, kNoTensor);
  EXPECT_NEAR(exact[0][0].item<float>(), f * 300, 1e-4);
  EXPECT_NEAR(exact[0][1].item<float>(), -f * 300, 1e-4);
  const at::Tensor c8 = cpu::exp_linear_count(a, w, alpha, sa, ba, sw, bw, bits,
                                              kNoTensor, int64_t{8}, kNoTensor);
  EXPECT_NEAR(c8[0][0].item<float>(), f * 127, 1e-5);
  EXPECT_NEAR(c8[0][1].item<float>(), -f * 128, 1e-5);
  // 32-bit counters do not clamp here.
  const at::Tensor c32 = cpu::exp_linear_count(a, w, alpha, sa, ba, sw, bw, bits,
                                               kNoTensor, int64_t{32}, kNoTensor);
  EXPECT_TRUE(at::equal(c32, exact));
  // Counters clamp each final count, not the partial sums: 200 positive then
  // 100 negative pairs give 100, inside [-128, 127].
  at::Tensor w2 = at::full({1, K}, one, at::kChar);
  w2.narrow(1, 200, 100).fill_(static_cast<int8_t>(static_cast<uint8_t>(one | 0x80)));
  const at::Tensor c8b = cpu::exp_linear_count(a, w2, alpha, sa, ba, sw, bw, bits,
                                               kNoTensor, int64_t{8}, kNoTensor);
  EXPECT_NEAR(c8b.item<float>(), f * 100, 1e-5);
}

TEST(LinearCount, CounterBitsMatchClampedReference) {
  std::mt19937 rng(6);
  for (int bits : {3, 4, 6}) {
    const Params p = params_for(bits);
    const int64_t M = 4, K = 700, N = 5;
    // Few distinct exponents so that bins overflow small counters.
    const auto a = random_codes(rng, M * K, 2, false, 0.1);  // biased 1..3
    const auto w = random_codes(rng, N * K, 2, true, 0.1);
    const at::Tensor wt = weight_terms(w, N, bits);
    for (int cb : {4, 8, 12}) {
      for (bool terms : {false, true}) {
        const at::Tensor y = cpu::exp_linear_count(
            codes_tensor(a, {M, K}), codes_tensor(w, {N, K}), p.alpha, p.sa, p.ba,
            p.sw, p.bw, bits, kNoTensor, int64_t{cb},
            terms ? c10::optional<at::Tensor>(wt) : kNoTensor);
        const auto v = to_floats(y);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < N; ++n) {
            const double ref =
                ref_count_dot(a.data() + m * K, w.data() + n * K, K, bits, p, cb);
            ASSERT_NEAR(v[m * N + n], ref, 1e-6 * std::fabs(ref) + 1e-9)
                << "bits=" << bits << " counter_bits=" << cb << " terms=" << terms;
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------- conv count --

struct ConvCase {
  int bits;
  int64_t Nb, C, H, W, O, kh, kw;
  int64_t sh, sw, ph, pw, dh, dw, groups;
};

// Explicit im2col: [Nb, groups, Ho*Wo, Cg*kh*kw] codes, zero codes where padded.
std::vector<int8_t> im2col(const std::vector<int8_t>& a, const ConvCase& c,
                           int64_t Ho, int64_t Wo) {
  const int64_t Cg = c.C / c.groups, Kg = Cg * c.kh * c.kw;
  std::vector<int8_t> col(c.Nb * c.groups * Ho * Wo * Kg, 0);
  for (int64_t n = 0; n < c.Nb; ++n)
    for (int64_t g = 0; g < c.groups; ++g)
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t ow = 0; ow < Wo; ++ow) {
          int8_t* dst = col.data() + (((n * c.groups + g) * Ho + oh) * Wo + ow) * Kg;
          int64_t k = 0;
          for (int64_t ci = 0; ci < Cg; ++ci)
            for (int64_t i = 0; i < c.kh; ++i)
              for (int64_t j = 0; j < c.kw; ++j, ++k) {
                const int64_t ih = oh * c.sh - c.ph + i * c.dh;
                const int64_t iw = ow * c.sw - c.pw + j * c.dw;
                if (ih >= 0 && ih < c.H && iw >= 0 && iw < c.W)
                  dst[k] = a[((n * c.C + g * Cg + ci) * c.H + ih) * c.W + iw];
              }
        }
  return col;
}

TEST(ConvCount, MatchesLinearCountOnIm2col) {
  std::mt19937 rng(7);
  const std::vector<ConvCase> cases = {
      {3, 2, 3, 8, 7, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1},
      {4, 1, 4, 9, 9, 6, 3, 2, 2, 1, 0, 2, 1, 2, 2},   // groups, stride, dilation
      {5, 2, 6, 5, 6, 6, 1, 1, 1, 1, 0, 0, 1, 1, 6},   // depthwise 1x1
      {7, 1, 2, 6, 6, 3, 5, 5, 1, 1, 2, 2, 1, 1, 1},   // "same" 5x5
      {2, 1, 3, 7, 5, 2, 2, 3, 3, 2, 1, 1, 1, 1, 1},
  };
  for (const auto& c : cases) {
    const Params p = params_for(c.bits);
    const ExpTables ta = tables(p.alpha, p.sa, p.ba, c.bits);
    const ExpTables tw = tables(p.alpha, p.sw, p.bw, c.bits);
    const int64_t Cg = c.C / c.groups, Og = c.O / c.groups, Kg = Cg * c.kh * c.kw;
    const int64_t Ho = (c.H + 2 * c.ph - c.dh * (c.kh - 1) - 1) / c.sh + 1;
    const int64_t Wo = (c.W + 2 * c.pw - c.dw * (c.kw - 1) - 1) / c.sw + 1;
    const auto a = random_codes(rng, c.Nb * c.C * c.H * c.W, c.bits, true, 0.3);
    const auto w = random_codes(rng, c.O * Kg, c.bits, true, 0.1);
    std::vector<float> bias(c.O);
    for (int64_t o = 0; o < c.O; ++o) bias[o] = 0.1f * static_cast<float>(o);
    const at::Tensor y = cpu::exp_conv2d_count(
        codes_tensor(a, {c.Nb, c.C, c.H, c.W}), codes_tensor(w, {c.O, Cg, c.kh, c.kw}),
        p.alpha, p.sa, p.ba, p.sw, p.bw, c.bits, f32(bias), {c.sh, c.sw},
        {c.ph, c.pw}, {c.dh, c.dw}, c.groups, kExact, kNoTensor);
    ASSERT_EQ(y.sizes(), (std::vector<int64_t>{c.Nb, c.O, Ho, Wo}));
    const auto col = im2col(a, c, Ho, Wo);
    const auto v = to_floats(y);
    for (int64_t g = 0; g < c.groups; ++g) {
      // Linear count of this group's columns against its filters.
      std::vector<int8_t> cols_g;
      for (int64_t n = 0; n < c.Nb; ++n) {
        const int8_t* src = col.data() + (n * c.groups + g) * Ho * Wo * Kg;
        cols_g.insert(cols_g.end(), src, src + Ho * Wo * Kg);
      }
      const std::vector<int8_t> w_g(w.begin() + g * Og * Kg, w.begin() + (g + 1) * Og * Kg);
      const at::Tensor bias_g = f32(bias).narrow(0, g * Og, Og);
      const at::Tensor lin = cpu::exp_linear_count(
          codes_tensor(cols_g, {c.Nb, Ho * Wo, Kg}), codes_tensor(w_g, {Og, Kg}),
          p.alpha, p.sa, p.ba, p.sw, p.bw, c.bits, bias_g, kExact, kNoTensor);
      const auto lv = to_floats(lin);  // [Nb, Ho*Wo, Og]
      for (int64_t n = 0; n < c.Nb; ++n)
        for (int64_t o = 0; o < Og; ++o)
          for (int64_t q = 0; q < Ho * Wo; ++q) {
            const float got = v[((n * c.O + g * Og + o) * Ho * Wo) + q];
            const float want = lv[(n * Ho * Wo + q) * Og + o];
            auto [ref, mag] = brute_dot(
                col.data() + ((n * c.groups + g) * Ho * Wo + q) * Kg,
                w_g.data() + o * Kg, Kg, ta, tw);
            ref += bias[g * Og + o];
            ASSERT_NEAR(got, want, 1e-6 * (mag + std::fabs(ref)) + 1e-30)
                << "bits=" << c.bits << " g=" << g << " o=" << o << " q=" << q;
            ASSERT_NEAR(got, ref, 1e-6 * (mag + std::fabs(ref)) + 1e-30);
          }
    }
  }
}

TEST(ConvCount, WeightTermsAndCounterBits) {
  std::mt19937 rng(8);
  const int bits = 4;
  const Params p = params_for(bits);
  const int64_t Nb = 2, C = 4, H = 6, W = 6, O = 5, k = 3;
  const auto w = random_codes(rng, O * C * k * k, bits, true, 0.1);
  const at::Tensor wc = codes_tensor(w, {O, C, k, k});
  const at::Tensor wt = weight_terms(w, O, bits);
  for (double zf : {0.1, 0.6}) {
    // ReLU-like unsigned activations; padding adds zero codes.
    const auto a = random_codes(rng, Nb * C * H * W, bits, false, zf);
    const at::Tensor ac = codes_tensor(a, {Nb, C, H, W});
    for (c10::optional<int64_t> cb : {kExact, c10::optional<int64_t>(6)}) {
      const at::Tensor direct = cpu::exp_conv2d_count(
          ac, wc, p.alpha, p.sa, p.ba, p.sw, p.bw, bits, kNoTensor, {1, 1}, {1, 1},
          {1, 1}, 1, cb, kNoTensor);
      const at::Tensor with_terms = cpu::exp_conv2d_count(
          ac, wc, p.alpha, p.sa, p.ba, p.sw, p.bw, bits, kNoTensor, {1, 1}, {1, 1},
          {1, 1}, 1, cb, wt);
      EXPECT_TRUE(at::equal(direct, with_terms)) << "zero_frac=" << zf;
    }
  }
}

// ------------------------------------------------------------- LUT path ----

TEST(LutOps, AgreeWithCountOps) {
  at::manual_seed(9);
  for (int bits : {3, 5, 7}) {
    for (const char* rounding : {"nearest", "log"}) {
      const Params p = params_for(bits);
      const ExpTables ta = tables(p.alpha, p.sa, p.ba, bits);
      const ExpTables tw = tables(p.alpha, p.sw, p.bw, bits);
      const int64_t K = 77, N = 9;
      std::mt19937 rng(bits);
      const auto w = random_codes(rng, N * K, bits, true, 0.1);
      const at::Tensor wc = codes_tensor(w, {N, K});
      const at::Tensor wp = cpu::exp_pack(wc, bits, true);
      const at::Tensor bias = at::randn({N});
      for (int64_t M : {1, 3, 16}) {  // fused GEMV and matmul paths
        const at::Tensor x = at::randn({M, K}) * 0.3;
        const at::Tensor ac = cpu::exp_quantize(x, p.alpha, p.sa, p.ba, bits,
                                                rounding, true);
        const at::Tensor yc = cpu::exp_linear_count(ac, wc, p.alpha, p.sa, p.ba,
                                                    p.sw, p.bw, bits, bias, kExact,
                                                    kNoTensor);
        const at::Tensor yl = cpu::exp_linear_lut(x, wp, {N, K}, p.alpha, p.sa, p.ba,
                                                  p.sw, p.bw, bits, true, true,
                                                  rounding, bias);
        ASSERT_EQ(yl.sizes(), yc.sizes());
        const auto a = to_codes(ac);
        const auto vc = to_floats(yc), vl = to_floats(yl);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            const double mag =
                brute_dot(a.data() + m * K, w.data() + n * K, K, ta, tw).second;
            ASSERT_NEAR(vl[m * N + n], vc[m * N + n],
                        1e-4 * (mag + std::fabs(vc[m * N + n])) + 1e-6)
                << "bits=" << bits << " M=" << M << " " << rounding;
          }
      }
      // Conv.
      const int64_t C = 3, O = 4, kk = 3;
      const auto w4 = random_codes(rng, O * C * kk * kk, bits, true, 0.1);
      const at::Tensor w4c = codes_tensor(w4, {O, C, kk, kk});
      const at::Tensor w4p = cpu::exp_pack(w4c, bits, true);
      const at::Tensor x4 = at::relu(at::randn({2, C, 7, 6}));
      const at::Tensor a4 = cpu::exp_quantize(x4, p.alpha, p.sa, p.ba, bits, rounding, true);
      const at::Tensor yc4 = cpu::exp_conv2d_count(a4, w4c, p.alpha, p.sa, p.ba, p.sw,
                                                   p.bw, bits, kNoTensor, {2, 1}, {1, 1},
                                                   {1, 1}, 1, kExact, kNoTensor);
      const at::Tensor yl4 = cpu::exp_conv2d_lut(x4, w4p, {O, C, kk, kk}, p.alpha, p.sa,
                                                 p.ba, p.sw, p.bw, bits, false, true,
                                                 rounding, kNoTensor, {2, 1}, {1, 1},
                                                 {1, 1}, 1);
      ASSERT_EQ(yl4.sizes(), yc4.sizes());
      const double scale = yc4.abs().max().item<double>() + 1e-6;
      EXPECT_LE((yl4 - yc4).abs().max().item<double>(), 1e-4 * scale)
          << "bits=" << bits << " " << rounding;
    }
  }
}

// Per-output-channel weight parameters (SPEC section 9): all rows equal to
// the scalars give the per-tensor result bit for bit; distinct rows agree
// between the count and LUT ops and with a per-row brute-force dot.
TEST(PerChannel, CountAndLutAgreeAndUniformRowsEqualPerTensor) {
  const int bits = 4;
  const Params p = params_for(bits);
  const int64_t K = 70, N = 6;
  std::mt19937 rng(7);
  const auto w = random_codes(rng, N * K, bits, true, 0.1);
  const at::Tensor wc = codes_tensor(w, {N, K});
  const at::Tensor wp = cpu::exp_pack(wc, bits, true);
  const float sw = static_cast<float>(p.sw), bw = static_cast<float>(p.bw);
  const at::Tensor same_s = at::full({N}, sw), same_o = at::full({N}, bw);
  at::Tensor ws = at::empty({N}), wo = at::empty({N});
  for (int64_t n = 0; n < N; ++n) {
    ws[n] = sw * static_cast<float>(1 + n);
    wo[n] = bw * static_cast<float>(n % 3) - 0.01f;
  }
  for (int64_t M : {1, 3, 40}) {  // GEMV and GEMM paths
    const at::Tensor x = at::randn({M, K}) * 0.3;
    const at::Tensor ac = cpu::exp_quantize(x, p.alpha, p.sa, p.ba, bits, "nearest", true);
    const at::Tensor yc = cpu::exp_linear_count(ac, wc, p.alpha, p.sa, p.ba, sw, bw, bits,
                                                kNoTensor, kExact, kNoTensor);
    EXPECT_TRUE(at::equal(yc, cpu::exp_linear_count(ac, wc, p.alpha, p.sa, p.ba, 1.0, 0.0,
                                                    bits, kNoTensor, kExact, kNoTensor,
                                                    same_s, same_o)));
    const at::Tensor yl = cpu::exp_linear_lut(x, wp, {N, K}, p.alpha, p.sa, p.ba, sw, bw,
                                              bits, true, true, "nearest", kNoTensor);
    EXPECT_TRUE(at::equal(yl, cpu::exp_linear_lut(x, wp, {N, K}, p.alpha, p.sa, p.ba, 1.0,
                                                  0.0, bits, true, true, "nearest",
                                                  kNoTensor, same_s, same_o)));
    const at::Tensor pc = cpu::exp_linear_count(ac, wc, p.alpha, p.sa, p.ba, 1.0, 0.0, bits,
                                                kNoTensor, kExact, kNoTensor, ws, wo);
    const at::Tensor pl = cpu::exp_linear_lut(x, wp, {N, K}, p.alpha, p.sa, p.ba, 1.0, 0.0,
                                              bits, true, true, "nearest", kNoTensor, ws, wo);
    const ExpTables ta = tables(p.alpha, p.sa, p.ba, bits);
    const auto a = to_codes(ac);
    const auto vc = to_floats(pc), vl = to_floats(pl);
    for (int64_t n = 0; n < N; ++n) {
      const ExpTables tn = tables(p.alpha, ws[n].item<float>(), wo[n].item<float>(), bits);
      for (int64_t m = 0; m < M; ++m) {
        auto [ref, mag] = brute_dot(a.data() + m * K, w.data() + n * K, K, ta, tn);
        ASSERT_NEAR(vc[m * N + n], ref, 1e-6 * (mag + 1.0)) << "count M=" << M;
        ASSERT_NEAR(vl[m * N + n], ref, 1e-4 * (mag + 1e-2)) << "lut M=" << M;
      }
    }
  }
  // The shared checks name the argument.
  EXPECT_THROW(cpu::exp_linear_count(wc, wc, p.alpha, p.sa, p.ba, 1.0, 0.0, bits, kNoTensor,
                                     kExact, kNoTensor, ws, c10::nullopt),
               c10::Error);
  EXPECT_THROW(cpu::exp_linear_lut(at::randn({1, K}), wp, {N, K}, p.alpha, p.sa, p.ba, 1.0,
                                   0.0, bits, true, true, "nearest", kNoTensor, -ws, wo),
               c10::Error);
}

TEST(LutOps, OutputDtypeFollowsInput) {
  const int bits = 4;
  const Params p = params_for(bits);
  const at::Tensor wc = at::full({3, 8}, static_cast<int8_t>(9), at::kChar);
  const at::Tensor wp = cpu::exp_pack(wc, bits, true);
  for (auto dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor x = at::ones({2, 8}).to(dt);
    const at::Tensor y = cpu::exp_linear_lut(x, wp, {3, 8}, p.alpha, p.sa, p.ba, p.sw,
                                             p.bw, bits, false, true, "nearest",
                                             kNoTensor);
    EXPECT_EQ(y.scalar_type(), dt);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 3}));
  }
}

// ------------------------------------------------------------ exp_error ----

at::Tensor sample_tensor(const std::string& kind, int64_t n, uint64_t seed) {
  at::manual_seed(seed);
  if (kind == "normal") return at::randn({n});
  if (kind == "laplace") {
    const at::Tensor u = at::rand({n}) - 0.5;
    return -at::sign(u) * at::log1p(-2 * u.abs()) * 0.1;
  }
  if (kind == "uniform") return at::rand({n}) * 4 - 2;
  if (kind == "relu") return at::relu(at::randn({n}));
  // heavy tail (Pareto-like magnitudes), mixed signs
  const at::Tensor u = at::rand({n}) * 0.999 + 0.001;
  return at::pow(u, -1.5) * at::sign(at::randn({n})) * 1e-3;
}

at::Tensor sample_tensor_for_threads() {
  at::manual_seed(13);
  return at::randn({200000}) * 0.1;
}

// Brute force: sum |x - x_hat| / sum |x| in float64, x_hat from the operators.
double brute_rmae(const at::Tensor& x, double alpha, double S, double beta, int bits,
                  const char* rounding) {
  const at::Tensor q = cpu::exp_quantize(x, alpha, S, beta, bits, rounding, true);
  const at::Tensor xh = cpu::exp_dequantize(q, alpha, S, beta, bits, at::kFloat);
  const at::Tensor xd = x.to(at::kDouble), xhd = xh.to(at::kDouble);
  const double den = xd.abs().sum().item<double>();
  if (den == 0.0) return 0.0;
  return (xd - xhd).abs().sum().item<double>() / den;
}

TEST(ExpError, MatchesBruteForce) {
  uint64_t seed = 10;
  for (const std::string kind : {"normal", "laplace", "uniform", "relu", "heavy"}) {
    for (int bits = dnateq::kMinBits; bits <= dnateq::kMaxBits; ++bits) {
      for (const char* rounding : {"nearest", "log"}) {
        const at::Tensor x = sample_tensor(kind, 4099, seed++);
        const Params p = params_for(bits);
        for (double beta : {0.0, 0.003, -0.002}) {
          const double e = cpu::exp_error(x, p.alpha, 0.01, beta, bits, rounding);
          const double ref = brute_rmae(x, p.alpha, 0.01, beta, bits, rounding);
          ASSERT_NEAR(e, ref, 1e-9 * std::max(1.0, ref))
              << kind << " bits=" << bits << " " << rounding << " beta=" << beta;
        }
      }
    }
  }
  // All-zero tensor: 0. Half input: same as its float32 widening.
  EXPECT_EQ(cpu::exp_error(at::zeros({17}), 2.0, 1.0, 0.0, 3, "nearest"), 0.0);
  const at::Tensor xh = at::randn({333}).to(at::kHalf);
  EXPECT_DOUBLE_EQ(cpu::exp_error(xh, 1.3, 0.1, 0.0, 4, "log"),
                   cpu::exp_error(xh.to(at::kFloat), 1.3, 0.1, 0.0, 4, "log"));
}

TEST(ExpError, WorkedExample) {
  // log: |1.3-1.1| + |1.58-2.1| + |0.05-0.1625| + 0 + |100-4.1| over 102.93.
  const at::Tensor x = f32({1.3f, 1.58f, -0.05f, 0.0f, 100.0f});
  double num = 0, den = 0;
  const double xs[5] = {1.3f, 1.58f, -0.05f, 0.0f, 100.0f};
  const double xh[5] = {1.1f, 2.1f, -0.1625f, 0.0f, 4.1f};
  for (int i = 0; i < 5; ++i) {
    num += std::fabs(xs[i] - xh[i]);
    den += std::fabs(xs[i]);
  }
  EXPECT_NEAR(cpu::exp_error(x, 2.0, 0.5, 0.1, 3, "log"), num / den, 1e-12);
}

// --------------------------------------------------------------- exp_fit ----

double alpha_max(int bits) {
  return std::min(16.0, std::exp(40.0 / dnateq::exp_range(bits)));
}

TEST(ExpFit, GoldenNeverWorseThanPaperAndConsistent) {
  uint64_t seed = 100;
  for (const std::string kind : {"normal", "laplace", "uniform", "relu", "heavy"}) {
    for (int bits = 3; bits <= dnateq::kMaxBits; ++bits) {
      for (const char* rounding : {"nearest", "log"}) {
        const at::Tensor x = sample_tensor(kind, 3001, seed++);
        const auto [ag, sg, bg, eg] = cpu::exp_fit(x, bits, "golden", rounding, c10::nullopt);
        const auto [ap, sp, bp, ep] = cpu::exp_fit(x, bits, "paper", rounding, c10::nullopt);
        const std::string ctx = kind + " bits=" + std::to_string(bits) + " " + rounding;
        EXPECT_LE(eg, ep) << ctx;
        for (auto [a, s, b, e] : {std::make_tuple(ag, sg, bg, eg),
                                  std::make_tuple(ap, sp, bp, ep)}) {
          EXPECT_GE(a, 1.0 + 1e-4 - 1e-12) << ctx;
          EXPECT_LE(a, alpha_max(bits) + 1e-12) << ctx;
          EXPECT_GT(s, 0.0) << ctx;
          // Reported error is the exact error of the returned parameters.
          EXPECT_NEAR(e, cpu::exp_error(x, a, s, b, bits, rounding), 1e-12) << ctx;
          EXPECT_NEAR(e, brute_rmae(x, a, s, b, bits, rounding), 1e-9) << ctx;
          // Levels cover [lo, hi] exactly (SPEC section 2 reconstruction).
          const at::Tensor m = x.abs().to(at::kDouble);
          const at::Tensor nz = m.masked_select(m > 0);
          const double lo = nz.min().item<double>(), hi = nz.max().item<double>();
          const int E = dnateq::exp_range(bits);
          EXPECT_NEAR(s * std::pow(a, -E) + b, lo, 1e-9 * hi) << ctx;
          EXPECT_NEAR(s * std::pow(a, E) + b, hi, 1e-9 * hi) << ctx;
        }
        // The paper's search ends no worse than its own starting point.
        const at::Tensor m = x.abs();
        const at::Tensor nz = m.masked_select(m > 0).to(at::kDouble);
        const double lo = nz.min().item<double>(), hi = nz.max().item<double>();
        const int E = dnateq::exp_range(bits);
        const double a0 = std::min(alpha_max(bits),
                                   std::max(1.0 + 1e-4, std::pow(hi / lo, 1.0 / (2 * E))));
        const double s0 = (hi - lo) / (std::pow(a0, E) - std::pow(a0, -E));
        const double b0 = lo - s0 * std::pow(a0, -E);
        EXPECT_LE(ep, cpu::exp_error(x, a0, s0, b0, bits, rounding) + 1e-12) << ctx;
      }
    }
  }
}

TEST(ExpFit, ErrorFallsWithBits) {
  const at::Tensor x = sample_tensor("laplace", 5000, 7);
  double prev = 1e300;
  for (int bits = 3; bits <= 7; ++bits) {
    const double e = std::get<3>(cpu::exp_fit(x, bits, "golden", "nearest", c10::nullopt));
    EXPECT_LT(e, prev) << "bits=" << bits;
    prev = e;
  }
  EXPECT_LT(prev, 0.01);
}

TEST(ExpFit, GivenAlphaAndDegenerateTensors) {
  const at::Tensor x = sample_tensor("normal", 1000, 11);
  const auto [a, s, b, e] = cpu::exp_fit(x, 4, "golden", "nearest", 1.25);
  EXPECT_EQ(a, 1.25);
  EXPECT_NEAR(e, cpu::exp_error(x, a, s, b, 4, "nearest"), 1e-12);
  // All zero / empty: alpha = 2, S = 1, beta = 0, RMAE = 0.
  for (const at::Tensor& z : {at::zeros({10}), at::empty({0})}) {
    const auto [az, sz, bz, ez] = cpu::exp_fit(z, 5, "golden", "nearest", c10::nullopt);
    EXPECT_EQ(az, 2.0);
    EXPECT_EQ(sz, 1.0);
    EXPECT_EQ(bz, 0.0);
    EXPECT_EQ(ez, 0.0);
  }
  // One nonzero magnitude: S = lo, beta = 0, alpha = 2 (or the given one);
  // level e = 0 is exact.
  const at::Tensor c = f32({0.0f, 0.75f, -0.75f, 0.75f});
  for (const char* search : {"golden", "paper"}) {
    const auto [ac, sc, bc, ec] = cpu::exp_fit(c, 3, search, "log", c10::nullopt);
    EXPECT_EQ(ac, 2.0);
    EXPECT_FLOAT_EQ(sc, 0.75);
    EXPECT_EQ(bc, 0.0);
    EXPECT_EQ(ec, 0.0);
  }
  const auto [ag, sg, bg, eg] = cpu::exp_fit(c, 3, "golden", "nearest", 1.5);
  EXPECT_EQ(ag, 1.5);
  EXPECT_FLOAT_EQ(sg, 0.75);
  EXPECT_EQ(bg, 0.0);
  EXPECT_EQ(eg, 0.0);
}

// -------------------------------------------------------------- threads ----

TEST(Threads, ParallelForIsParallel) {
  // The library and its users are compiled with OpenMP, so at::parallel_for
  // really runs on several threads.
  const int saved = at::get_num_threads();
  at::set_num_threads(2);
  std::vector<int> seen(64, -1);
  at::parallel_for(0, 64, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) seen[i] = at::get_thread_num();
  });
  EXPECT_NE(std::count(seen.begin(), seen.end(), 0), 64)
      << "at::parallel_for ran on one thread only";
  at::set_num_threads(saved);
}

TEST(Threads, ResultsDoNotDependOnThreadCount) {
  std::mt19937 rng(12);
  const int bits = 5;
  const Params p = params_for(bits);
  const auto a = random_codes(rng, 8 * 3 * 9 * 9, bits, true, 0.3);
  const auto w = random_codes(rng, 16 * 3 * 3 * 3, bits, true, 0.1);
  const auto w_lin = random_codes(rng, 6 * 81, bits, true, 0.1);
  const at::Tensor x = sample_tensor_for_threads();
  const int saved = at::get_num_threads();
  std::vector<at::Tensor> outs;
  std::vector<std::tuple<double, double, double, double>> fits;
  for (int nt : {1, 2}) {
    at::set_num_threads(nt);
    outs.push_back(cpu::exp_conv2d_count(
        codes_tensor(a, {8, 3, 9, 9}), codes_tensor(w, {16, 3, 3, 3}), p.alpha, p.sa,
        p.ba, p.sw, p.bw, bits, kNoTensor, {1, 1}, {1, 1}, {1, 1}, 1, kExact, kNoTensor));
    outs.push_back(cpu::exp_linear_count(
        codes_tensor(a, {24, 81}), codes_tensor(w_lin, {6, 81}),
        p.alpha, p.sa, p.ba, p.sw, p.bw, bits, kNoTensor, kExact, kNoTensor));
    outs.push_back(cpu::exp_quantize(x, p.alpha, p.sa, p.ba, bits, "nearest", true));
    fits.push_back(cpu::exp_fit(x, bits, "golden", "nearest", c10::nullopt));
  }
  at::set_num_threads(saved);
  for (size_t i = 0; i < outs.size() / 2; ++i) {
    EXPECT_TRUE(at::equal(outs[i], outs[i + outs.size() / 2])) << "output " << i;
  }
  EXPECT_EQ(fits[0], fits[1]);
}

// ------------------------------------------------------- error messages ----

TEST(Errors, BitsOutOfRange) {
  const at::Tensor x = f32({1.f, 2.f});
  const at::Tensor c = codes_tensor({1, 2}, {1, 2});
  EXPECT_THROW(cpu::exp_quantize(x, 2.0, 0.5, 0.1, 8, "nearest", true), c10::Error);
  expect_error_naming([&] { cpu::exp_quantize(x, 2.0, 0.5, 0.1, 8, "nearest", true); },
                      {"bits", "8"});
  expect_error_naming([&] { cpu::exp_quantize(x, 2.0, 0.5, 0.1, 1, "nearest", true); },
                      {"bits", "1"});
  expect_error_naming([&] { cpu::exp_dequantize(c, 2.0, 0.5, 0.1, 8, at::kFloat); },
                      {"bits", "8"});
  expect_error_naming([&] { cpu::exp_pack(c, 8, true); }, {"bits", "8"});
  expect_error_naming([&] { cpu::exp_unpack(at::zeros({1, 4}, at::kByte), 8, true, {1, 2}); },
                      {"bits", "8"});
  expect_error_naming([&] {
    cpu::exp_linear_count(c, c, 2.0, 0.5, 0.1, 0.5, 0.1, 8, kNoTensor, kExact, kNoTensor);
  }, {"bits", "8"});
  expect_error_naming([&] { cpu::exp_fit(x, 8, "golden", "nearest", c10::nullopt); },
                      {"bits", "8"});
  expect_error_naming([&] { cpu::exp_error(x, 2.0, 0.5, 0.1, 8, "nearest"); },
                      {"bits", "8"});
}

TEST(Errors, AlphaNotAboveOne) {
  const at::Tensor x = f32({1.f, 2.f});
  const at::Tensor c = codes_tensor({1, 2}, {1, 2});
  EXPECT_THROW(cpu::exp_quantize(x, 1.0, 0.5, 0.1, 3, "nearest", true), c10::Error);
  expect_error_naming([&] { cpu::exp_quantize(x, 1.0, 0.5, 0.1, 3, "nearest", true); },
                      {"alpha"});
  expect_error_naming([&] { cpu::exp_dequantize(c, 1.0, 0.5, 0.1, 3, at::kFloat); },
                      {"alpha"});
  expect_error_naming([&] {
    cpu::exp_linear_count(c, c, 1.0, 0.5, 0.1, 0.5, 0.1, 3, kNoTensor, kExact, kNoTensor);
  }, {"alpha"});
  expect_error_naming([&] { cpu::exp_fit(x, 3, "golden", "nearest", 1.0); }, {"alpha"});
  expect_error_naming([&] { cpu::exp_error(x, 0.5, 0.5, 0.1, 3, "nearest"); }, {"alpha"});
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect_error_naming([&] { cpu::exp_quantize(x, nan, 0.5, 0.1, 3, "nearest", true); },
                      {"alpha"});
}

TEST(Errors, NonFiniteInput) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (float bad : {nan, inf, -inf}) {
    std::vector<float> v(1000, 0.5f);
    v[777] = bad;
    const at::Tensor x = f32(v);
    EXPECT_THROW(cpu::exp_quantize(x, 2.0, 0.5, 0.1, 3, "nearest", true), c10::Error);
    expect_error_naming([&] { cpu::exp_quantize(x, 2.0, 0.5, 0.1, 3, "nearest", true); },
                        {"x", "non"});
    // check_finite=false: the CPU check is always on (SPEC section 1).
    expect_error_naming([&] { cpu::exp_quantize(x, 2.0, 0.5, 0.1, 3, "log", false); },
                        {"x"});
    expect_error_naming([&] { cpu::exp_quantize(x.to(at::kHalf), 2.0, 0.5, 0.1, 3, "log", true); },
                        {"x"});
    expect_error_naming([&] { cpu::exp_fit(x, 3, "golden", "nearest", c10::nullopt); },
                        {"x"});
    expect_error_naming([&] { cpu::exp_error(x, 2.0, 0.5, 0.1, 3, "nearest"); }, {"x"});
    const at::Tensor wp = cpu::exp_pack(at::ones({2, 1000}, at::kChar), 3, true);
    expect_error_naming([&] {
      cpu::exp_linear_lut(x.reshape({1, 1000}), wp, {2, 1000}, 2.0, 0.5, 0.1, 0.5, 0.1,
                          3, true, true, "nearest", kNoTensor);
    }, {"x"});
  }
}

TEST(Errors, OtherArguments) {
  const at::Tensor x = f32({1.f, 2.f});
  const at::Tensor c = codes_tensor({1, 2}, {1, 2});
  expect_error_naming([&] { cpu::exp_quantize(x, 2.0, 0.0, 0.1, 3, "nearest", true); },
                      {"scale"});
  expect_error_naming([&] { cpu::exp_quantize(x, 2.0, -1.0, 0.1, 3, "nearest", true); },
                      {"scale"});
  expect_error_naming([&] {
    cpu::exp_quantize(x, 2.0, 0.5, std::numeric_limits<double>::infinity(), 3, "nearest", true);
  }, {"offset"});
  expect_error_naming([&] { cpu::exp_quantize(x, 2.0, 0.5, 0.1, 3, "round", true); },
                      {"rounding"});
  expect_error_naming([&] { cpu::exp_quantize(x.to(at::kDouble), 2.0, 0.5, 0.1, 3, "log", true); },
                      {"x"});
  expect_error_naming([&] { cpu::exp_fit(x, 3, "grid", "nearest", c10::nullopt); },
                      {"search"});
  expect_error_naming([&] {
    cpu::exp_linear_count(c, c, 2.0, 0.0, 0.1, 0.5, 0.1, 3, kNoTensor, kExact, kNoTensor);
  }, {"sa"});
  expect_error_naming([&] {
    cpu::exp_linear_count(c, c, 2.0, 0.5, 0.1, -0.5, 0.1, 3, kNoTensor, kExact, kNoTensor);
  }, {"sw"});
  expect_error_naming([&] {
    cpu::exp_linear_count(c, c, 2.0, 0.5, 0.1, 0.5, 0.1, 3, kNoTensor, int64_t{1}, kNoTensor);
  }, {"counter_bits"});
  expect_error_naming([&] {
    cpu::exp_linear_count(c, codes_tensor({1, 2, 3}, {1, 3}), 2.0, 0.5, 0.1, 0.5, 0.1, 3,
                          kNoTensor, kExact, kNoTensor);
  }, {"a_codes"});
  expect_error_naming([&] {
    cpu::exp_linear_count(codes_tensor({1, 9}, {1, 2}), c, 2.0, 0.5, 0.1, 0.5, 0.1, 3,
                          kNoTensor, kExact, kNoTensor);
  }, {"a_codes"});
  expect_error_naming([&] {
    cpu::exp_linear_count(c, c, 2.0, 0.5, 0.1, 0.5, 0.1, 3, f32({1.f, 2.f}), kExact, kNoTensor);
  }, {"bias"});
  expect_error_naming([&] {
    cpu::exp_linear_count(c, c, 2.0, 0.5, 0.1, 0.5, 0.1, 3, kNoTensor, kExact,
                          at::zeros({1, 8}, at::kLong));
  }, {"w_terms"});
  expect_error_naming([&] { cpu::exp_dequantize(codes_tensor({1, 8}, {2}), 2.0, 0.5, 0.1, 3, at::kFloat); },
                      {"codes"});
  expect_error_naming([&] { cpu::exp_dequantize(x, 2.0, 0.5, 0.1, 3, at::kFloat); },
                      {"codes"});
  // Parameters whose levels overflow float32.
  expect_error_naming([&] { cpu::exp_quantize(x, 16.0, 0.5, 0.1, 7, "nearest", true); },
                      {"alpha"});
}

}  // namespace
