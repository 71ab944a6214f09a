// Count-based exponential dot product (SPEC section 4, the paper's Eq. 8) on
// the CPU: exact integer counts C1..C4 per output, then a float64
// post-processing with a LUT of alpha^k.
//
// Counting scheme: each code maps once to a histogram offset, so that one
// add gives the bin of a pair, and the pair's sign product s_a*s_w is the
// increment (+1 or -1). Bins of one histogram:
//   C1[k] at s = biased(a) + biased(w) = k + 2^n      in [2, 2^(n+1) - 2]
//   C3[e] at off3 + biased(a),  off3 = 2^(n+1)
//   C2[e] at off2 + biased(w),  off2 = 2^(n+1) + 2^n
// A zero weight maps to TRASH = 2^(n+2), so its pairs land in a region that
// is never read (zero activations are skipped before counting).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "cpu_kernels.h"

namespace dnateq {
namespace cpu {
namespace {

struct Layout {
  int bits, nb;        // n and 2^n
  int off2, off3;      // C2 and C3 bin offsets
  int trash, hsize;    // trash start (= bins to clear and read); size
  explicit Layout(int n) : bits(n), nb(1 << n) {
    off3 = 1 << (n + 1);
    off2 = (1 << (n + 1)) + nb;
    trash = 1 << (n + 2);
    hsize = 2 * trash;  // a trash offset plus any valid one stays inside
  }
  static int32_t sign(uint8_t c) { return (c & kSignBit) ? -1 : 1; }
  int16_t biased_or_trash(uint8_t c) const {
    return static_cast<int16_t>((c & kMagMask) ? (c & kMagMask) : trash);
  }
  int16_t c3_or_trash(uint8_t c) const {
    return static_cast<int16_t>((c & kMagMask) ? off3 : trash);
  }
};

// Weight side, transformed once per call: [N, K] offsets for C1/C2 and C3.
// What one weight code contributes to a pair, looked up per pair from a
// 256-entry table (so the weights are read raw, never transformed per call).
struct WEntry {
  int16_t f;     // biased(w), or TRASH for a zero weight
  int16_t g;     // off3, or TRASH for a zero weight
  int32_t sign;  // +1 / -1
};

struct Weights {
  int64_t N = 0, K = 0;
  const uint8_t* codes = nullptr;  // [N, K]
  WEntry table[256];
  const int32_t* terms = nullptr;  // [N, 2^n] or null
};

struct Post {
  double sasw, basw, sabw, babw;
  std::vector<double> pw;  // alpha^k, k = -2E .. 2E, at index k + 2E
  int E;
  bool clamp = false;
  int64_t lo = 0, hi = 0;
  const float* bias = nullptr;
  int64_t c(int64_t v) const { return clamp ? std::min(hi, std::max(lo, v)) : v; }
};

void check_code_range(const at::Tensor& codes, int64_t bits, const char* name) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(codes.const_data_ptr<int8_t>());
  const int max_mag = num_levels(static_cast<int>(bits));
  std::atomic<bool> ok{true};
  at::parallel_for(0, codes.numel(), 1 << 16, [&](int64_t b0, int64_t b1) {
    bool good = true;
    for (int64_t i = b0; i < b1; ++i) good &= (p[i] & kMagMask) <= max_mag;
    if (!good) ok = false;
  });
  TORCH_CHECK(ok.load(), "dnateq: ", name, " has bits above bit ", bits - 1,
              " set, which is not a valid code for bits=", bits);
}

Weights prepare_weights(const at::Tensor& w, const Layout& L,
                        const c10::optional<at::Tensor>& w_terms) {
  Weights W;
  W.N = w.size(0);
  W.K = W.N ? w.numel() / W.N : 0;
  W.codes = reinterpret_cast<const uint8_t*>(w.const_data_ptr<int8_t>());
  for (int c = 0; c < 256; ++c) {
    const uint8_t u = static_cast<uint8_t>(c);
    W.table[c] = {L.biased_or_trash(u), L.c3_or_trash(u), Layout::sign(u)};
  }
  if (w_terms.has_value()) W.terms = w_terms->const_data_ptr<int32_t>();
  return W;
}

// The nonzero positions of one activation row with their histogram offsets,
// built once per row and shared by every output.
struct RowList {
  std::vector<int32_t> pos, zeros, sign;
  std::vector<int16_t> ta;
  bool has_neg = false;
  void build(const uint8_t* a, int64_t K) {
    pos.clear(); zeros.clear(); sign.clear(); ta.clear();
    has_neg = false;
    for (int64_t i = 0; i < K; ++i) {
      const uint8_t c = a[i];
      if ((c & kMagMask) == 0) { zeros.push_back(static_cast<int32_t>(i)); continue; }
      has_neg |= (c & kSignBit) != 0;
      pos.push_back(static_cast<int32_t>(i));
      ta.push_back(static_cast<int16_t>(c & kMagMask));
      sign.push_back(Layout::sign(c));
    }
  }
};

// Counts the pairs of one row into `copies` interleaved histograms:
// consecutive pairs go to different copies so that two updates of one bin
// do not wait on each other through memory.
template <int kCopies>
void count_pairs(const RowList& R, const Weights& W, const Layout& L, int64_t n,
                 bool use_terms, uint32_t* h) {
  const int64_t hs = L.hsize;
  const uint8_t* wc = W.codes + n * W.K;
  const WEntry* T = W.table;
  const int32_t* pos = R.pos.data();
  const int16_t* ta = R.ta.data();
  const int32_t* sa = R.sign.data();
  const int64_t nnz = static_cast<int64_t>(R.pos.size());
  const int off2 = L.off2;
  // Unsigned arithmetic: the trash bins may wrap, harmlessly.
  int64_t p = 0;
  for (; p + kCopies <= nnz; p += kCopies) {
#pragma GCC unroll 4
    for (int c = 0; c < kCopies; ++c) {
      uint32_t* hc = h + c * hs;
      const WEntry e = T[wc[pos[p + c]]];
      const uint32_t sg = static_cast<uint32_t>(sa[p + c] * e.sign);
      hc[ta[p + c] + e.f] += sg;
      hc[ta[p + c] + e.g] += sg;
      if (!use_terms) hc[off2 + e.f] += sg;
    }
  }
  for (; p < nnz; ++p) {
    const WEntry e = T[wc[pos[p]]];
    const uint32_t sg = static_cast<uint32_t>(sa[p] * e.sign);
    h[ta[p] + e.f] += sg;
    h[ta[p] + e.g] += sg;
    if (!use_terms) h[off2 + e.f] += sg;
  }
  if (use_terms) {
    // Zero activations: their weight-term contributions (activation sign
    // taken as +1), subtracted from the precomputed terms afterwards.
    for (int32_t z : R.zeros) {
      const WEntry e = T[wc[z]];
      h[off2 + e.f] += static_cast<uint32_t>(e.sign);
    }
  }
  for (int c = 1; c < kCopies; ++c) {
    for (int64_t b = 0; b < L.trash; ++b) h[b] += h[c * hs + b];
  }
}

// Counts one activation row against outputs [n0, n1) and writes
// out[n * out_stride].
void count_row(const RowList& R, const Weights& W, const Layout& L,
               const Post& P, int64_t n0, int64_t n1, float* out,
               int64_t out_stride, std::vector<uint32_t>& hist) {
  const int64_t nnz = static_cast<int64_t>(R.pos.size());
  // Precomputed weight terms serve unsigned rows only; they pay when the
  // zero positions are fewer than the nonzero ones (SPEC section 4).
  const bool use_terms = W.terms && !R.has_neg && !P.clamp &&
                         static_cast<int64_t>(R.zeros.size()) < nnz;
  const int nb = L.nb, E = P.E;
  // Fewer copies for large tables, where clearing them would dominate.
  const int copies = L.bits <= 5 ? 4 : 2;
  hist.resize(copies * L.hsize);
  uint32_t* h = hist.data();
  for (int64_t n = n0; n < n1; ++n) {
    for (int c = 0; c < copies; ++c) std::fill(h + c * L.hsize, h + c * L.hsize + L.trash, 0u);
    if (copies == 4) count_pairs<4>(R, W, L, n, use_terms, h);
    else count_pairs<2>(R, W, L, n, use_terms, h);
    // Post-processing in float64.
    double t1 = 0, t2 = 0, t3 = 0;
    int64_t c4 = 0;
    for (int s = 2; s <= 2 * nb - 2; ++s) {  // s = biased sum = k + 2^n
      const int64_t c = static_cast<int32_t>(h[s]);
      if (c) t1 += static_cast<double>(P.c(c)) * P.pw[s - nb + 2 * E];
    }
    const int32_t* terms = use_terms ? W.terms + n * nb : nullptr;
    for (int b = 1; b < nb; ++b) {  // b = biased exponent = e + 2^(n-1)
      const double pe = P.pw[b - nb / 2 + 2 * E];
      const int64_t c3 = static_cast<int32_t>(h[L.off3 + b]);
      int64_t c2 = static_cast<int32_t>(h[L.off2 + b]);
      if (terms) c2 = terms[b] - c2;
      c4 += c2;
      if (c3) t3 += static_cast<double>(P.c(c3)) * pe;
      if (c2) t2 += static_cast<double>(P.c(c2)) * pe;
    }
    double y = P.sasw * t1 + P.basw * t2 + P.sabw * t3 +
               P.babw * static_cast<double>(P.c(c4));
    if (P.bias) y += static_cast<double>(P.bias[n]);
    out[n * out_stride] = static_cast<float>(y);
  }
}

Post make_post(double alpha, double sa, double ba, double sw, double bw,
               int64_t bits, c10::optional<int64_t> counter_bits,
               const float* bias) {
  Post P;
  P.sasw = sa * sw; P.basw = ba * sw; P.sabw = sa * bw; P.babw = ba * bw;
  P.E = exp_range(static_cast<int>(bits));
  for (int k = -2 * P.E; k <= 2 * P.E; ++k) P.pw.push_back(std::pow(alpha, k));
  if (counter_bits.has_value()) {
    P.clamp = true;
    P.hi = (int64_t{1} << (*counter_bits - 1)) - 1;
    P.lo = -(int64_t{1} << (*counter_bits - 1));
  }
  P.bias = bias;
  return P;
}

c10::optional<at::Tensor> contiguous_terms(const c10::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return c10::nullopt;
}

}  // namespace

at::Tensor exp_linear_count(const at::Tensor& a_in, const at::Tensor& w_in,
                            double alpha, double sa, double ba, double sw,
                            double bw, int64_t bits,
                            const c10::optional<at::Tensor>& bias,
                            c10::optional<int64_t> counter_bits,
                            const c10::optional<at::Tensor>& w_terms_in) {
  const auto [N, K] = check_linear_count_shapes(a_in, w_in);
  const at::Tensor b = check_count_args(a_in, w_in, alpha, sa, ba, sw, bw, bits,
                                        bias, counter_bits, w_terms_in, N);
  const at::Tensor a = a_in.contiguous(), w = w_in.contiguous();
  check_code_range(a, bits, "a_codes");
  check_code_range(w, bits, "w_codes");
  const auto w_terms = contiguous_terms(w_terms_in);
  std::vector<int64_t> out_shape(a.sizes().begin(), a.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, a.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / N;
  const Layout L(static_cast<int>(bits));
  const Weights W = prepare_weights(w, L, w_terms);
  const Post P = make_post(alpha, sa, ba, sw, bw, bits, counter_bits,
                           b.defined() ? b.const_data_ptr<float>() : nullptr);
  const uint8_t* ap = reinterpret_cast<const uint8_t*>(a.const_data_ptr<int8_t>());
  float* op = out.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  if (rows >= 2 * threads) {
    // Many rows: a task owns whole rows, each row's list built once.
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      RowList R;
      std::vector<uint32_t> hist;
      for (int64_t r = r0; r < r1; ++r) {
        R.build(ap + r * K, K);
        count_row(R, W, L, P, 0, N, op + r * N, 1, hist);
      }
    });
  } else {
    // Few rows (batch 1 decoding): build the lists once, split the outputs.
    std::vector<RowList> lists(rows);
    for (int64_t r = 0; r < rows; ++r) lists[r].build(ap + r * K, K);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      std::vector<uint32_t> hist;
      for (int64_t r = 0; r < rows; ++r) {
        count_row(lists[r], W, L, P, n0, n1, op + r * N, 1, hist);
      }
    });
  }
  return out;
}

at::Tensor exp_conv2d_count(const at::Tensor& a_in, const at::Tensor& w_in,
                            double alpha, double sa, double ba, double sw,
                            double bw, int64_t bits,
                            const c10::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups,
                            c10::optional<int64_t> counter_bits,
                            const c10::optional<at::Tensor>& w_terms_in) {
  const auto [Ho, Wo] = check_conv_geometry(a_in.sizes(), w_in.sizes(), stride, padding,
                                            dilation, groups, "a_codes", "w_codes");
  const int64_t Nb = a_in.size(0), C = a_in.size(1), H = a_in.size(2), Wd = a_in.size(3);
  const int64_t O = w_in.size(0), Cg = w_in.size(1), kh = w_in.size(2), kw = w_in.size(3);
  const at::Tensor b = check_count_args(a_in, w_in, alpha, sa, ba, sw, bw, bits,
                                        bias, counter_bits, w_terms_in, O);
  const at::Tensor a = a_in.contiguous(), w = w_in.contiguous();
  check_code_range(a, bits, "a_codes");
  check_code_range(w, bits, "w_codes");
  const auto w_terms = contiguous_terms(w_terms_in);
  at::Tensor out = at::empty({Nb, O, Ho, Wo}, a.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t Kg = Cg * kh * kw, Og = O / groups, HW = Ho * Wo;
  const Layout L(static_cast<int>(bits));
  const Weights W = prepare_weights(w, L, w_terms);
  const Post P = make_post(alpha, sa, ba, sw, bw, bits, counter_bits,
                           b.defined() ? b.const_data_ptr<float>() : nullptr);
  const uint8_t* ap = reinterpret_cast<const uint8_t*>(a.const_data_ptr<int8_t>());
  float* op = out.data_ptr<float>();
  // One task per (image, group, output position): gather the receptive field
  // (zero codes where padded) and count it against the group's filters.
  at::parallel_for(0, Nb * groups * HW, 16, [&](int64_t t0, int64_t t1) {
    RowList R;
    std::vector<uint32_t> hist;
    std::vector<uint8_t> col(Kg);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t img = t / (groups * HW), g = (t / HW) % groups, p = t % HW;
      const int64_t oh = p / Wo, ow = p % Wo;
      int64_t k = 0;
      for (int64_t c = 0; c < Cg; ++c) {
        const uint8_t* plane = ap + ((img * C) + g * Cg + c) * H * Wd;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t ih = oh * stride[0] - padding[0] + i * dilation[0];
          for (int64_t j = 0; j < kw; ++j, ++k) {
            const int64_t iw = ow * stride[1] - padding[1] + j * dilation[1];
            col[k] = (ih >= 0 && ih < H && iw >= 0 && iw < Wd) ? plane[ih * Wd + iw] : 0;
          }
        }
      }
      R.build(col.data(), Kg);
      count_row(R, W, L, P, g * Og, (g + 1) * Og, op + img * O * HW + p, HW, hist);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace dnateq
