// The LUT fast path's offline weight layout (fast_layout.h): building it from
// exp_pack's rows, validating it, the run-time ISA choice of the CPU kernels
// (AVX-512 -> AVX2 -> portable, DNATEQ_CPU_ISA or dnateq::_cpu_isa to force
// one), and the batch-1..8 linear on the layout.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "common/cpu_kernels.h"
#include "lut/fast_layout.h"
#include "lut/fast_lut.h"

namespace dnateq {
namespace cpu {

// ------------------------------------------------------------------ ISA --
namespace {

Isa detect_isa() {
#ifdef DNATEQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa parse_isa(const std::string& s, const char* what) {
  if (s == "avx512") return Isa::kAvx512;
  if (s == "avx2") return Isa::kAvx2;
  if (s == "portable") return Isa::kPortable;
  TORCH_CHECK(false, "dnateq: ", what, " must be \"avx512\", \"avx2\", \"portable\" or "
              "\"auto\", got \"", s, "\"");
}

// -1: not decided yet.
std::atomic<int> g_isa{-1};
std::atomic<int> g_last_path{-1};

const char* const kPathNames[] = {"portable", "avx2", "avx512", "gemm", "avx512_gemm",
                                   "avx512_conv", "avx512_direct_conv"};

}  // namespace

Isa supported_isa() {
  static const Isa best = detect_isa();
  return best;
}

const char* isa_name(Isa isa) { return kPathNames[static_cast<int>(isa)]; }

Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v >= 0) return static_cast<Isa>(v);
  Isa isa = supported_isa();
  if (const char* env = std::getenv("DNATEQ_CPU_ISA")) {
    const std::string s(env);
    if (!s.empty() && s != "auto") {
      const Isa want = parse_isa(s, "DNATEQ_CPU_ISA");
      TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(isa), "dnateq: DNATEQ_CPU_ISA=",
                  s, " but this CPU supports at most ", isa_name(isa));
      isa = want;
    }
  }
  g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
  return isa;
}

std::string cpu_isa(c10::string_view request) {
  const std::string s(request);
  if (s == "auto") {
    g_isa.store(static_cast<int>(supported_isa()), std::memory_order_relaxed);
  } else if (!s.empty()) {
    const Isa want = parse_isa(s, "isa");
    TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(supported_isa()),
                "dnateq: cannot use the ", s, " kernels: this CPU supports at most ",
                isa_name(supported_isa()));
    g_isa.store(static_cast<int>(want), std::memory_order_relaxed);
  }
  return isa_name(active_isa());
}

void note_lut_path(LutPath p) { g_last_path.store(static_cast<int>(p), std::memory_order_relaxed); }

std::string lut_path() {
  const int v = g_last_path.load(std::memory_order_relaxed);
  return v < 0 ? std::string("none") : std::string(kPathNames[v]);
}

namespace detail {
bool cpu_has_avx2() { return static_cast<int>(active_isa()) >= static_cast<int>(Isa::kAvx2); }
}  // namespace detail

// --------------------------------------------------------------- layout --
namespace {

using fast::LayoutHeader;

uint64_t fingerprint(const at::Tensor& packed) {
  // FNV-1a over 16 sampled 8-byte words and the byte count: a cheap check
  // that the layout was built from these packed weights (not a proof).
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const int64_t n = packed.numel();
  uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(n);
  if (n >= 8) {
    for (int i = 0; i < 16; ++i) {
      const int64_t off = (n - 8) * i / 15;
      uint64_t v;
      std::memcpy(&v, p + off, 8);
      h = (h ^ v) * 1099511628211ull;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  }
  return h;
}

// Field i of a packed row (LSB-first little-endian words).
inline uint32_t packed_field(const uint8_t* row, int64_t i, int b) {
  const int64_t bit = i * b;
  uint32_t v = 0;
  const int64_t byte = bit >> 3;
  // at most 8 + 7 bits span 2 bytes
  v = row[byte];
  if ((bit & 7) + b > 8) v |= static_cast<uint32_t>(row[byte + 1]) << 8;
  return (v >> (bit & 7)) & ((1u << b) - 1u);
}

}  // namespace

at::Tensor exp_lut_layout(const at::Tensor& w_packed_in, at::IntArrayRef w_shape,
                          int64_t bits, bool w_signed) {
  check_bits(bits);
  TORCH_CHECK(w_shape.size() >= 1, "dnateq: w_shape must have at least 1 element, got ",
              w_shape);
  for (int64_t s : w_shape) {
    TORCH_CHECK(s >= 0, "dnateq: w_shape must be non-negative, got ", w_shape);
  }
  const auto [N, K] = packed_dims(w_shape);
  check_packed(w_packed_in, N, K, bits, w_signed, "w_packed");
  const at::Tensor w_packed = w_packed_in.contiguous();
  const int nb = static_cast<int>(bits);
  const int b = packed_field_bits(nb, w_signed);
  const int kind = fast::layout_kind(nb, w_signed);
  const int64_t rb = fast::layout_row_bytes(K, nb, w_signed);
  const int64_t prb = w_packed.size(1);
  at::Tensor out = at::zeros({fast::kHeaderBytes + N * rb}, w_packed.options());
  uint8_t* o = out.data_ptr<uint8_t>();
  LayoutHeader h{};
  h.magic = fast::kLayoutMagic;
  h.version = fast::kLayoutVersion;
  h.N = N;
  h.K = K;
  h.bits = static_cast<uint32_t>(bits);
  h.is_signed = w_signed ? 1u : 0u;
  h.kind = static_cast<uint32_t>(kind);
  h.group = static_cast<uint32_t>(fast::layout_group(kind));
  h.row_bytes = rb;
  h.fingerprint = fingerprint(w_packed);
  std::memcpy(o, &h, sizeof(h));
  const uint8_t* src = w_packed.const_data_ptr<uint8_t>();
  uint8_t* dst = o + fast::kHeaderBytes;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = src + n * prb;
      uint8_t* d = dst + n * rb;
      if (kind == 1) {
        const int64_t gb = fast::kind1_group_bytes(b);
        for (int64_t k = 0; k < K; ++k) {
          const uint32_t f = packed_field(row, k, b);
          uint8_t* g = d + (k / 32) * gb;
          const int j = static_cast<int>(k % 32);
          g[j % 16] |= static_cast<uint8_t>((f & 15u) << (j < 16 ? 0 : 4));
          for (int p = 0; p < b - 4; ++p) {
            if ((f >> (4 + p)) & 1u) g[16 + 4 * p + j / 8] |= static_cast<uint8_t>(1u << (j % 8));
          }
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const uint32_t f = packed_field(row, k, b);
          const uint32_t mag = f & ((1u << nb) - 1u);
          const uint32_t sgn = w_signed ? (f >> nb) & 1u : 0u;
          const int64_t g = k / 64;
          const int q = static_cast<int>(k % 64);   // = 16r + 4l + i
          const int r = q / 16, l = (q / 4) % 4, i = q % 4;
          d[64 * g + 16 * l + 4 * r + i] = static_cast<uint8_t>(mag | (sgn << 7));
        }
      }
    }
  });
  return out;
}

namespace {

// Validates a layout against the op's weight (shape, bits, sign, version and
// the packed weights' fingerprint) and returns its header.
LayoutHeader check_layout(const at::Tensor& layout, const at::Tensor& w_packed, int64_t N,
                          int64_t K, int64_t bits, bool w_signed) {
  TORCH_CHECK(layout.scalar_type() == at::kByte && layout.dim() == 1,
              "dnateq: w_layout must be a 1-D uint8 tensor (from dnateq.exp_lut_layout), got ",
              layout.scalar_type(), " of shape ", layout.sizes());
  check_same_device(layout, "w_layout", w_packed, "w_packed");
  TORCH_CHECK(layout.is_contiguous(), "dnateq: w_layout must be contiguous");
  TORCH_CHECK(layout.numel() >= fast::kHeaderBytes,
              "dnateq: w_layout is too short to be a layout (", layout.numel(), " bytes)");
  LayoutHeader h;
  std::memcpy(&h, layout.const_data_ptr<uint8_t>(), sizeof(h));
  TORCH_CHECK(h.magic == fast::kLayoutMagic,
              "dnateq: w_layout is not a dnateq weight layout (bad magic)");
  TORCH_CHECK(h.version == fast::kLayoutVersion, "dnateq: w_layout has version ", h.version,
              ", this dnateq uses version ", fast::kLayoutVersion,
              "; rebuild it with dnateq.exp_lut_layout(w_packed, ...)");
  TORCH_CHECK(h.N == N && h.K == K && h.bits == static_cast<uint32_t>(bits) &&
                  h.is_signed == (w_signed ? 1u : 0u),
              "dnateq: w_layout was built for a [", h.N, ", ", h.K, "] weight at bits=", h.bits,
              (h.is_signed ? " signed" : " unsigned"), ", not for this [", N, ", ", K,
              "] weight at bits=", bits, (w_signed ? " signed" : " unsigned"),
              "; rebuild it with dnateq.exp_lut_layout");
  const int nb = static_cast<int>(bits);
  const int64_t rb = fast::layout_row_bytes(K, nb, w_signed);
  TORCH_CHECK(h.kind == static_cast<uint32_t>(fast::layout_kind(nb, w_signed)) &&
                  h.row_bytes == rb && layout.numel() == fast::kHeaderBytes + N * rb,
              "dnateq: w_layout is corrupt (size or kind does not match its header)");
  TORCH_CHECK(h.fingerprint == fingerprint(w_packed),
              "dnateq: w_layout was not built from this w_packed (fingerprint mismatch); "
              "rebuild it with dnateq.exp_lut_layout");
  return h;
}

}  // namespace

fast::LayoutHeader validate_layout(const at::Tensor& layout, const at::Tensor& w_packed,
                                  int64_t N, int64_t K, int64_t bits, bool w_signed) {
  return check_layout(layout, w_packed, N, K, bits, w_signed);
}

void fill_weight_args(fast::GemvArgs& a, const LayoutHeader& h, const at::Tensor& layout,
                      int64_t K, const ExpTables& tw, double alpha, const at::Tensor& w_scale,
                      const at::Tensor& w_offset, bool w_signed, WeightTables& wt) {
  const int nb = tw.bits;
  a.data = layout.const_data_ptr<uint8_t>() + fast::kHeaderBytes;
  a.K = K;
  a.Kp = fast::layout_padded_k(K, nb, w_signed);
  a.row_bytes = h.row_bytes;
  a.bits = nb;
  a.is_signed = w_signed;
  a.kind = static_cast<int>(h.kind);
  if (w_scale.defined()) {
    wt.pw[0] = 0.0;
    for (int e = 1; e <= num_levels(nb); ++e) {
      wt.pw[e] = std::pow(alpha, static_cast<double>(e - exp_bias(nb)));
    }
    a.scale = w_scale.const_data_ptr<float>();
    a.offset = w_offset.const_data_ptr<float>();
    a.pw = wt.pw;
  } else {
    for (int e = 0; e <= num_levels(nb); ++e) wt.levels[e] = tw.levels[e];
    a.levels = wt.levels;
  }
}

at::Tensor fast_linear(const at::Tensor& x, const at::Tensor& layout,
                       const at::Tensor& w_packed, int64_t N, int64_t K, const ExpTables& ta,
                       const ExpTables& tw, double alpha, const at::Tensor& w_scale,
                       const at::Tensor& w_offset, bool w_signed, const at::Tensor& bias) {
  const LayoutHeader h = check_layout(layout, w_packed, N, K, tw.bits, w_signed);
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(M >= 1 && M <= kFastMaxRows, "dnateq: internal: fast_linear with ", M, " rows");
  const int nb = tw.bits;
  const int64_t Kp = fast::layout_padded_k(K, nb, w_signed);
  // Quantize the activations once, into a zero-padded [M, Kp] buffer.
  static thread_local std::vector<float> xq;
  xq.assign(static_cast<size_t>(M * Kp), 0.f);
  {
    const at::Tensor xc = x.contiguous();
    float tmp[detail::kBlock];
    bool ok = true;
    for (int64_t m = 0; m < M && xc.scalar_type() == at::kFloat; ++m) {
      // float32: one quantizer call per row (it builds its tables per call)
      ok &= fast::encode_levels_avx512(ta.thresholds, ta.n_thr, ta.levels,
                                       xc.const_data_ptr<float>() + m * K, K, xq.data() + m * Kp);
    }
    for (int64_t m = 0; m < M && xc.scalar_type() != at::kFloat; ++m) {
      for (int64_t k0 = 0; k0 < K; k0 += detail::kBlock) {
        const int64_t len = std::min<int64_t>(detail::kBlock, K - k0);
        detail::load_as_float(xc, m * K + k0, len, tmp);
        ok &= fast::encode_levels_avx512(ta.thresholds, ta.n_thr, ta.levels, tmp, len,
                                         xq.data() + m * Kp + k0);
      }
    }
    TORCH_CHECK(ok, "dnateq: x contains non-finite values (NaN or Inf)");
  }
  WeightTables wt;
  fast::GemvArgs a{};
  fill_weight_args(a, h, layout, K, tw, alpha, w_scale, w_offset, w_signed, wt);
  a.x = xq.data();
  a.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  a.y = out.data_ptr<float>();
  a.ldy = N;
  if (M <= fast::kGemvRows) {
    a.M = static_cast<int>(M);
    // Output blocks of 64 rows (a multiple of every kernel's row block).
    const int64_t grain = std::max<int64_t>(64, (N / (4 * at::get_num_threads())) / 64 * 64);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fast::gemv_avx512(a, n0, n1); });
    note_lut_path(LutPath::kAvx512);
  } else {
    gemm_rows_avx512(a, M, N);   // fast_gemm.cpp
    note_lut_path(LutPath::kAvx512Gemm);
  }
  return out;
}

}  // namespace cpu
}  // namespace dnateq
