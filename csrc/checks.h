// Argument validation shared by every backend. Messages name the argument,
// what was expected and what was given (SPEC section 5).
#pragma once

#include <cstring>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/safe_numerics.h>

#include <cmath>
#include <string>
#include <utility>

#include "format.h"

namespace dnateq {

inline void check_bits(int64_t bits, const char* name = "bits") {
  TORCH_CHECK(bits >= kMinBits && bits <= kMaxBits, "dnateq: ", name,
              " must be in [", kMinBits, ", ", kMaxBits, "], got ", bits);
}

inline void check_alpha(double alpha, const char* name = "alpha") {
  TORCH_CHECK(std::isfinite(alpha) && alpha > 1.0, "dnateq: ", name,
              " must be a finite base > 1, got ", alpha);
}

inline void check_scale(double scale, const char* name = "scale") {
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, "dnateq: ", name,
              " must be finite and > 0, got ", scale);
}

inline void check_offset(double offset, const char* name = "offset") {
  TORCH_CHECK(std::isfinite(offset), "dnateq: ", name,
              " must be finite, got ", offset);
}

inline Rounding parse_rounding(c10::string_view r) {
  if (r == "log") return Rounding::kLog;
  if (r == "nearest") return Rounding::kNearest;
  TORCH_CHECK(false, "dnateq: rounding must be \"log\" or \"nearest\", got \"",
              std::string(r), "\"");
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(is_supported_float(x.scalar_type()), "dnateq: ", name,
              " must be float32, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_codes(const at::Tensor& c, const char* name) {
  TORCH_CHECK(c.scalar_type() == at::kChar, "dnateq: ", name,
              " must be int8 codes, got ", c.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an,
                              const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "dnateq: ", an, " and ", bn,
              " must be on the same device, got ", a.device(), " and ",
              b.device());
}

// The code-range check, which reads the values and so runs in the backends:
// `ok` is what the backend found; one message for every op and backend.
inline void check_codes_valid(bool ok, const char* name, int64_t bits) {
  TORCH_CHECK(ok, "dnateq: ", name, " has bits above bit ", bits - 1,
              " set, which is not a valid code for bits=", bits);
}

inline void check_counter_bits(const c10::optional<int64_t>& cb) {
  if (cb.has_value()) {
    TORCH_CHECK(*cb >= 2 && *cb <= 32,
                "dnateq: counter_bits must be in [2, 32] or None, got ", *cb);
  }
}

// Validates a conv2d's geometry (input [N, C, H, W], weight shape
// [O, C/groups, kh, kw]) and returns the output size (Ho, Wo).
inline std::pair<int64_t, int64_t> check_conv_geometry(
    at::IntArrayRef in, at::IntArrayRef w, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const char* in_name, const char* w_name) {
  TORCH_CHECK(in.size() == 4, "dnateq: ", in_name,
              " must be 4-D [N, C, H, W], got shape ", in);
  TORCH_CHECK(w.size() == 4, "dnateq: ", w_name,
              " must be 4-D [O, C/groups, kh, kw], got shape ", w);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "dnateq: stride, padding and dilation must have 2 elements");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0,
              "dnateq: stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0,
              "dnateq: dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0,
              "dnateq: padding must be non-negative, got ", padding);
  TORCH_CHECK(groups > 0, "dnateq: groups must be positive, got ", groups);
  for (int64_t s : w) {
    TORCH_CHECK(s >= 0, "dnateq: ", w_name, " must be non-negative, got ", w);
  }
  TORCH_CHECK(in[1] % groups == 0 && w[0] % groups == 0 && w[1] * groups == in[1],
              "dnateq: ", w_name, " ", w, " does not match ", in_name,
              " channels ", in[1], " with groups=", groups);
  // (in + 2*pad - dil*(k-1) - 1) / stride + 1, refusing geometry whose
  // intermediate terms overflow int64 instead of wrapping to garbage.
  int64_t out[2];
  for (int d = 0; d < 2; ++d) {
    int64_t padded, span, num;
    const bool overflow = c10::mul_overflows(padding[d], int64_t{2}, &padded) ||
                          c10::add_overflows(padded, in[2 + d], &padded) ||
                          c10::mul_overflows(dilation[d], w[2 + d] - 1, &span) ||
                          c10::add_overflows(padded, -span, &num);
    TORCH_CHECK(!overflow, "dnateq: conv geometry overflows int64: ", in_name,
                " size ", in[2 + d], ", kernel ", w[2 + d], ", padding ", padding[d],
                ", dilation ", dilation[d]);
    out[d] = num > 0 ? (num - 1) / stride[d] + 1 : 0;
  }
  const int64_t Ho = out[0], Wo = out[1];
  TORCH_CHECK(Ho > 0 && Wo > 0, "dnateq: ", in_name, " spatial size (", in[2],
              ", ", in[3], ") is too small for kernel (", w[2], ", ", w[3],
              ") with padding ", padding, " and dilation ", dilation);
  return {Ho, Wo};
}

// Level overflow check shared by every count and LUT op (CPU and CUDA), for
// scalar and per-channel parameters: every level S * alpha^e + beta,
// e = -E .. E, must be finite once rounded to float32. The levels increase
// with e (S > 0, alpha > 1), so the two extremes decide. `pw_lo`/`pw_hi` are
// alpha^-E and alpha^E.
inline bool levels_finite_f32(double pw_lo, double pw_hi, double scale, double offset) {
  return std::isfinite(static_cast<float>(scale * pw_lo + offset)) &&
         std::isfinite(static_cast<float>(scale * pw_hi + offset));
}

// Validates one tensor's scalar format parameters (bits, alpha, scale > 0,
// finite offset, all levels finite in float32).
inline void check_format_params(double alpha, double scale, double offset, int64_t bits,
                                const char* scale_name, const char* offset_name) {
  check_bits(bits);
  check_alpha(alpha);
  check_scale(scale, scale_name);
  check_offset(offset, offset_name);
  const int E = exp_range(static_cast<int>(bits));
  TORCH_CHECK(levels_finite_f32(std::pow(alpha, -E), std::pow(alpha, E), scale, offset),
              "dnateq: alpha=", alpha, ", ", scale_name, "=", scale, ", ", offset_name, "=",
              offset, " give a non-finite level at bits=", bits,
              " (S * alpha^E + beta overflows float32)");
}

// The last tables each thread built, by their exact parameters: a layer's
// every call passes the same (alpha, S, beta, n, rounding), and building the
// tables takes 2^n + 2^(n+1) calls of pow (about 2 us a call at n = 4 for the
// activation and the weight tables, a third of a small layer's time). The
// tables are a pure function of these five values, so a hit gives the very
// tables make_tables would build.
struct TablesCache {
  static constexpr int kEntries = 16;
  struct Entry {
    double alpha = 0, scale = 0, offset = 0;
    int bits = 0;
    Rounding rounding = Rounding::kNearest;
    ExpTables t;
  };
  Entry e[kEntries];
  int used = 0, next = 0;
  const ExpTables* find(double alpha, double scale, double offset, int bits, Rounding r) const {
    for (int i = 0; i < used; ++i) {
      const Entry& x = e[i];
      if (x.bits == bits && x.rounding == r && same(x.alpha, alpha) && same(x.scale, scale) &&
          same(x.offset, offset))
        return &x.t;
    }
    return nullptr;
  }
  void put(double alpha, double scale, double offset, int bits, Rounding r, const ExpTables& t) {
    Entry& x = e[next];
    x.alpha = alpha; x.scale = scale; x.offset = offset; x.bits = bits; x.rounding = r; x.t = t;
    next = (next + 1) % kEntries;
    used = used < kEntries ? used + 1 : used;
  }
  // bitwise (-0.0 and 0.0: two entries, both right; NaN is rejected before)
  static bool same(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }
};

// Validates the parameters of one tensor's format and builds its tables;
// rejects parameter sets whose levels or thresholds are not finite.
inline void make_checked_tables(ExpTables& t, double alpha, double scale,
                                double offset, int64_t bits,
                                Rounding rounding, const char* scale_name,
                                const char* offset_name) {
  // A hit skips the other checks: only parameter sets that passed them are
  // put (bits first: the key holds it narrowed to int).
  check_bits(bits);
  static thread_local TablesCache cache;
  const int nb = static_cast<int>(bits);
  if (const ExpTables* hit = cache.find(alpha, scale, offset, nb, rounding)) {
    t = *hit;
    return;
  }
  check_format_params(alpha, scale, offset, bits, scale_name, offset_name);
  make_tables(t, alpha, scale, offset, nb, rounding);
  for (int b = 1; b <= num_levels(nb); ++b) {
    TORCH_CHECK(std::isfinite(t.levels[b]), "dnateq: alpha=", alpha, ", ",
                scale_name, "=", scale, ", ", offset_name, "=", offset,
                " give a non-finite level at bits=", bits,
                " (alpha^E overflows float32)");
  }
  cache.put(alpha, scale, offset, nb, rounding, t);
}

// Per-output-channel weight parameters (SPEC section 9): w_scale and
// w_offset, float32 [n_out] on `ref`'s device, given together or not at all.
// Given, they replace the scalar sw/bw (which are then not read). Returns
// contiguous float32 CPU copies (undefined when absent) for the checks and
// the CPU kernels; CUDA kernels read the device tensors.
struct ChannelParams {
  at::Tensor scale, offset;  // float32 [n_out] contiguous, on the CPU
  at::Tensor scale_dev, offset_dev;  // the caller's tensors, contiguous
  bool defined() const { return scale.defined(); }
};

inline ChannelParams check_channel_params(const c10::optional<at::Tensor>& w_scale,
                                          const c10::optional<at::Tensor>& w_offset,
                                          int64_t n_out, double alpha, int64_t bits,
                                          const at::Tensor& ref, const char* ref_name) {
  ChannelParams P;
  const bool hs = w_scale.has_value() && w_scale->defined();
  const bool ho = w_offset.has_value() && w_offset->defined();
  if (!hs && !ho) return P;
  TORCH_CHECK(hs && ho, "dnateq: w_scale and w_offset must be given together (per-channel "
              "weight parameters), got only ", hs ? "w_scale" : "w_offset");
  const std::pair<const at::Tensor*, const char*> ts[2] = {{&*w_scale, "w_scale"},
                                                           {&*w_offset, "w_offset"}};
  for (const auto& [t, name] : ts) {
    check_same_device(*t, name, ref, ref_name);
    TORCH_CHECK(t->scalar_type() == at::kFloat, "dnateq: ", name,
                " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n_out, "dnateq: ", name,
                " must have shape [", n_out, "] (one per output channel), got ",
                t->sizes());
  }
  P.scale_dev = w_scale->contiguous();
  P.offset_dev = w_offset->contiguous();
  P.scale = P.scale_dev.is_cpu() ? P.scale_dev : P.scale_dev.cpu();
  P.offset = P.offset_dev.is_cpu() ? P.offset_dev : P.offset_dev.cpu();
  const int E = exp_range(static_cast<int>(bits));
  const double lo = std::pow(alpha, -E), hi = std::pow(alpha, E);
  const float* s = P.scale.const_data_ptr<float>();
  const float* o = P.offset.const_data_ptr<float>();
  for (int64_t j = 0; j < n_out; ++j) {
    TORCH_CHECK(std::isfinite(s[j]) && s[j] > 0.f, "dnateq: w_scale must be finite and > 0, "
                "got w_scale[", j, "]=", s[j]);
    TORCH_CHECK(std::isfinite(o[j]), "dnateq: w_offset must be finite, got w_offset[", j,
                "]=", o[j]);
    TORCH_CHECK(levels_finite_f32(lo, hi, s[j], o[j]), "dnateq: alpha=", alpha,
                ", w_scale[", j, "]=", s[j], ", w_offset[", j, "]=", o[j],
                " give a non-finite level at bits=", bits,
                " (S * alpha^E + beta overflows float32)");
  }
  return P;
}

// Rows and row length of a tensor's packed layout (SPEC section 1): a 0-d
// tensor is one row of one element, a 1-D tensor one row, otherwise d0 rows
// of d1*d2*... elements.
inline std::pair<int64_t, int64_t> packed_dims(at::IntArrayRef shape) {
  if (shape.empty()) return {1, 1};
  if (shape.size() == 1) return {1, shape[0]};
  int64_t K = 1;
  for (size_t i = 1; i < shape.size(); ++i) K *= shape[i];
  return {shape[0], K};
}

// Validates a packed tensor against (rows, K, bits, signed).
inline void check_packed(const at::Tensor& packed, int64_t rows, int64_t K,
                         int64_t bits, bool is_signed, const char* name) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "dnateq: ", name,
              " must be uint8 (from exp_pack), got ", packed.scalar_type());
  const int64_t rb = packed_row_bytes(K, static_cast<int>(bits), is_signed);
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == rows &&
                  packed.size(1) == rb,
              "dnateq: ", name, " must have shape [", rows, ", ", rb,
              "] for ", rows, " rows of ", K, " elements at bits=", bits,
              (is_signed ? " signed" : " unsigned"), ", got ", packed.sizes());
}

inline void check_w_shape(at::IntArrayRef w_shape, int64_t dims, const char* what) {
  TORCH_CHECK(static_cast<int64_t>(w_shape.size()) == dims, "dnateq: w_shape must have ",
              dims, " elements ", what, ", got ", w_shape);
  for (int64_t s : w_shape) {
    TORCH_CHECK(s >= 0, "dnateq: w_shape must be non-negative, got ", w_shape);
  }
}

// Optional float bias of n_out outputs, on `ref`'s device: returned as a
// contiguous float32 tensor (undefined when absent). NaN/Inf is rejected.
inline at::Tensor checked_bias(const c10::optional<at::Tensor>& bias, int64_t n_out,
                               const at::Tensor& ref, const char* ref_name) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_same_device(*bias, "bias", ref, ref_name);
  TORCH_CHECK(is_supported_float(bias->scalar_type()),
              "dnateq: bias must be float32, float16 or bfloat16, got ",
              bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_out,
              "dnateq: bias must have shape [", n_out, "], got ", bias->sizes());
  at::Tensor b = bias->to(at::kFloat).contiguous();
  bool finite = true;
  if (b.is_cpu()) {
    const float* p = b.const_data_ptr<float>();
    for (int64_t i = 0; i < n_out; ++i) finite &= std::isfinite(p[i]);
  } else {
    finite = at::isfinite(b).all().item<bool>();
  }
  TORCH_CHECK(finite, "dnateq: bias contains non-finite values (NaN or Inf)");
  return b;
}

// Validated arguments of the count ops of every backend.
struct CountArgs {
  at::Tensor bias;   // float32 or undefined
  ChannelParams wc;  // per-channel weight parameters (undefined: sw/bw)
};

// Validation common to the count ops of every backend.
inline CountArgs check_count_args(const at::Tensor& a, const at::Tensor& w,
                                  double alpha, double sa, double ba, double sw,
                                  double bw, int64_t bits,
                                  const c10::optional<at::Tensor>& bias,
                                  c10::optional<int64_t> counter_bits,
                                  const c10::optional<at::Tensor>& w_terms,
                                  int64_t n_out,
                                  const c10::optional<at::Tensor>& w_scale,
                                  const c10::optional<at::Tensor>& w_offset) {
  check_codes(a, "a_codes");
  check_codes(w, "w_codes");
  check_same_device(a, "a_codes", w, "w_codes");
  check_format_params(alpha, sa, ba, bits, "sa", "ba");
  CountArgs A;
  A.wc = check_channel_params(w_scale, w_offset, n_out, alpha, bits, w, "w_codes");
  if (!A.wc.defined()) check_format_params(alpha, sw, bw, bits, "sw", "bw");
  check_counter_bits(counter_bits);
  const int E = exp_range(static_cast<int>(bits));
  TORCH_CHECK(std::isfinite(std::pow(alpha, 2 * E)),
              "dnateq: alpha=", alpha, " overflows alpha^(2E) at bits=", bits);
  A.bias = checked_bias(bias, n_out, w, "w_codes");
  if (w_terms.has_value() && w_terms->defined()) {
    check_same_device(*w_terms, "w_terms", w, "w_codes");
    TORCH_CHECK(w_terms->scalar_type() == at::kInt,
                "dnateq: w_terms must be int32 (from dnateq.weight_terms), got ",
                w_terms->scalar_type());
    TORCH_CHECK(w_terms->dim() == 2 && w_terms->size(0) == n_out &&
                    w_terms->size(1) == (int64_t{1} << bits),
                "dnateq: w_terms must have shape [", n_out, ", ", (1 << bits),
                "], got ", w_terms->sizes());
  }
  return A;
}

// Validated arguments of the LUT ops of every backend: both tensors' tables
// (tw holds the scalar sw/bw; unused when wc is defined), the per-channel
// weight parameters and the float32 bias.
struct LutArgs {
  ExpTables ta, tw;
  ChannelParams wc;
  at::Tensor bias;  // float32 or undefined
};

inline LutArgs check_lut_args(const at::Tensor& x, const at::Tensor& w_packed,
                              int64_t rows, int64_t K, double alpha, double sa,
                              double ba, double sw, double bw, int64_t bits,
                              bool w_signed, c10::string_view rounding,
                              const c10::optional<at::Tensor>& bias, int64_t n_out,
                              const c10::optional<at::Tensor>& w_scale,
                              const c10::optional<at::Tensor>& w_offset) {
  check_float_input(x, "x");
  check_same_device(x, "x", w_packed, "w_packed");
  LutArgs A;
  const Rounding r = parse_rounding(rounding);
  make_checked_tables(A.ta, alpha, sa, ba, bits, r, "sa", "ba");
  A.wc = check_channel_params(w_scale, w_offset, n_out, alpha, bits, x, "x");
  if (A.wc.defined()) {
    A.tw.bits = static_cast<int>(bits);  // levels come per row from wc
    A.tw.E = exp_range(static_cast<int>(bits));
  } else {
    make_checked_tables(A.tw, alpha, sw, bw, bits, r, "sw", "bw");
  }
  check_packed(w_packed, rows, K, bits, w_signed, "w_packed");
  A.bias = checked_bias(bias, n_out, x, "x");
  return A;
}

// Field values of one weight row with per-channel parameters (scale,
// offset): lut[f] = sign * (scale * alpha^e + offset) rounded once to
// float32, exactly the per-tensor table of (alpha, scale, offset).
// `pw` holds alpha^e at index biased(e) (pw[0] unused).
inline void row_field_values(const double* pw, int bits, bool is_signed, double scale,
                             double offset, float* lut) {
  const int b = packed_field_bits(bits, is_signed);
  for (uint32_t f = 0; f < (1u << b); ++f) {
    const uint8_t code = field_to_code(f, bits, is_signed);
    const int mag = code & kMagMask;
    const float lv = mag ? static_cast<float>(scale * pw[mag] + offset) : 0.f;
    lut[f] = (code & kSignBit) ? -lv : lv;
  }
}

// alpha^(b - 2^(n-1)) for biased exponents b = 1 .. 2^n - 1, as level_f64
// computes them (index 0 = 0).
inline void biased_powers(double alpha, int bits, double* pw) {
  pw[0] = 0.0;
  for (int b = 1; b <= num_levels(bits); ++b) {
    pw[b] = std::pow(alpha, static_cast<double>(b - exp_bias(bits)));
  }
}

// Per-operator argument checks shared by the backends.

// exp_dequantize: codes and output dtype; returns the format's tables.
inline ExpTables check_dequantize_args(const at::Tensor& codes, double alpha,
                                       double scale, double offset, int64_t bits,
                                       at::ScalarType dtype) {
  check_codes(codes, "codes");
  TORCH_CHECK(is_supported_float(dtype),
              "dnateq: dtype must be float32, float16 or bfloat16, got ", dtype);
  ExpTables t;
  make_checked_tables(t, alpha, scale, offset, bits, Rounding::kNearest,
                      "scale", "offset");
  return t;
}

// exp_unpack: returns the (rows, K) of the requested shape.
inline std::pair<int64_t, int64_t> check_unpack_args(const at::Tensor& packed,
                                                     int64_t bits, bool is_signed,
                                                     at::IntArrayRef shape) {
  check_bits(bits);
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "dnateq: shape must be non-negative, got ", shape);
  }
  const auto dims = packed_dims(shape);
  check_packed(packed, dims.first, dims.second, bits, is_signed, "packed");
  return dims;
}

// exp_linear_count: a_codes [*, K], w_codes [N, K]; returns (N, K).
inline std::pair<int64_t, int64_t> check_linear_count_shapes(const at::Tensor& a,
                                                             const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "dnateq: w_codes must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK(a.dim() >= 1, "dnateq: a_codes must have at least 1 dimension");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(a.size(-1) == K, "dnateq: a_codes last dimension (", a.size(-1),
              ") must equal w_codes.shape[1] (", K, ")");
  return {N, K};
}

// exp_linear_lut: x [*, K], w_shape [N, K]; returns (N, K).
inline std::pair<int64_t, int64_t> check_linear_lut_shapes(const at::Tensor& x,
                                                           at::IntArrayRef w_shape) {
  check_w_shape(w_shape, 2, "[N, K] for a linear weight");
  const int64_t N = w_shape[0], K = w_shape[1];
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "dnateq: x last dimension (",
              x.dim() ? x.size(-1) : 0, ") must equal w_shape[1] (", K, ")");
  return {N, K};
}

}  // namespace dnateq
