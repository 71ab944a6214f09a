// Count-based exponential dot product (SPEC section 4, the paper's Eq. 8) on
// the CPU: exact integer counts C1..C4 per output, then a float64
// post-processing with a LUT of alpha^k.
//
// Counting scheme: the nonzero activations of a row are grouped by their
// code (a counting sort, once per row, shared by every output). Inside a
// group the activation's biased exponent b_a and sign s_a are fixed, so:
//   C3[b_a] is the sum of the group's sign products: a register, no memory;
//   C1 at s = b_a + biased(w) = k + 2^n, in [2, 2^(n+1) - 2];
//   C2 at OFF2 + biased(w),  OFF2 = 2^(n+1).
// Each weight code maps once (a 256-entry table per activation sign) to its
// biased exponent and the pair's sign product s_a*s_w, which is 0 for a zero
// weight: its two updates add nothing, so no branch and no trash bins.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "checks.h"
#include "count/front.h"
#include "common/cpu_kernels.h"

namespace dnateq {
namespace cpu {
namespace {

struct Layout {
  int bits, nb;   // n and 2^n
  int off2;       // C2 bins: off2 + biased(w)
  int off3;       // C3 bins: off3 + biased(a) (one copy, written per group)
  int counted;    // bins [0, counted) take per-pair updates (C1 and C2)
  int hsize;      // one histogram copy
  explicit Layout(int n) : bits(n), nb(1 << n) {
    off2 = 2 * nb;
    off3 = 3 * nb;
    counted = 3 * nb;
    hsize = 4 * nb;
  }
  static int32_t sign(uint8_t c) { return (c & kSignBit) ? -1 : 1; }
};

// What one weight code contributes to a pair with an activation of sign +1
// (table[0]) or -1 (table[1]).
struct WEntry {
  int16_t f;   // biased(w); 0 for a zero weight
  int16_t sg;  // s_a * s_w; 0 for a zero weight
};

struct Weights {
  int64_t N = 0, K = 0;
  const uint8_t* codes = nullptr;  // [N, K]
  WEntry table[2][256];
  const int32_t* terms = nullptr;  // [N, 2^n] or null
};

struct Post {
  double sasw, basw, sabw, babw;
  // Per-output-channel weight parameters (null: the scalars above).
  double sa = 0, ba = 0;
  const float* ws = nullptr;
  const float* wo = nullptr;
  std::vector<double> pw;  // alpha^k, k = -2E .. 2E, at index k + 2E
  int E;
  bool clamp = false;
  int64_t lo = 0, hi = 0;
  const float* bias = nullptr;
  int64_t c(int64_t v) const { return clamp ? std::min(hi, std::max(lo, v)) : v; }
};

// Whether every code's magnitude is a valid biased exponent for bits=n.
bool code_range_ok(const at::Tensor& codes, int64_t bits) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(codes.const_data_ptr<int8_t>());
  const int max_mag = num_levels(static_cast<int>(bits));
  std::atomic<bool> ok{true};
  at::parallel_for(0, codes.numel(), 1 << 16, [&](int64_t b0, int64_t b1) {
    bool good = true;
    for (int64_t i = b0; i < b1; ++i) good &= (p[i] & kMagMask) <= max_mag;
    if (!good) ok = false;
  });
  return ok.load();
}

// 1 (a_codes) | 2 (w_codes) where the codes are out of range.
int bad_codes(const CountPlan& p) {
  return (code_range_ok(p.a, p.bits) ? 0 : 1) | (code_range_ok(p.w, p.bits) ? 0 : 2);
}

Weights prepare_weights(const at::Tensor& w, const at::Tensor& w_terms) {
  Weights W;
  W.N = w.size(0);
  W.K = W.N ? w.numel() / W.N : 0;
  W.codes = reinterpret_cast<const uint8_t*>(w.const_data_ptr<int8_t>());
  for (int c = 0; c < 256; ++c) {
    const uint8_t u = static_cast<uint8_t>(c);
    const int16_t mag = static_cast<int16_t>(u & kMagMask);
    const int16_t sg = static_cast<int16_t>(mag ? Layout::sign(u) : 0);
    W.table[0][c] = {mag, sg};
    W.table[1][c] = {mag, static_cast<int16_t>(-sg)};
  }
  if (w_terms.defined()) W.terms = w_terms.const_data_ptr<int32_t>();
  return W;
}

// One activation row: its nonzero positions grouped by code, and its zero
// positions. Built once per row and shared by every output.
struct RowList {
  struct Group {
    int32_t begin, end;  // range of `pos`
    int16_t b;           // biased exponent of the group's activations
    uint8_t neg;         // their sign is negative
  };
  std::vector<int32_t> pos, zeros;
  std::vector<Group> groups;
  bool has_neg = false;
  int64_t nnz() const { return static_cast<int64_t>(pos.size()); }
  void build(const uint8_t* a, int64_t K) {
    int32_t count[256] = {0};
    for (int64_t i = 0; i < K; ++i) ++count[a[i]];
    int32_t start[256];
    int32_t total = 0;
    groups.clear();
    has_neg = false;
    for (int c = 0; c < 256; ++c) {
      start[c] = total;
      if ((c & kMagMask) == 0 || count[c] == 0) continue;
      groups.push_back({total, total + count[c], static_cast<int16_t>(c & kMagMask),
                        static_cast<uint8_t>((c & kSignBit) ? 1 : 0)});
      has_neg |= (c & kSignBit) != 0;
      total += count[c];
    }
    pos.resize(total);
    zeros.clear();
    for (int64_t i = 0; i < K; ++i) {
      const uint8_t c = a[i];
      if ((c & kMagMask) == 0) zeros.push_back(static_cast<int32_t>(i));
      else pos[start[c]++] = static_cast<int32_t>(i);
    }
  }
};

// Counts the pairs of one row with output n into `kCopies` interleaved
// histograms: consecutive pairs go to different copies so that two updates
// of one bin do not wait on each other through memory. C3 goes to copy 0.
template <int kCopies, bool kTerms>
void count_pairs(const RowList& R, const Weights& W, const Layout& L, int64_t n,
                 uint32_t* h) {
  const int hs = L.hsize, off2 = L.off2;
  const uint8_t* wc = W.codes + n * W.K;
  const int32_t* pos = R.pos.data();
  int64_t p = 0;  // running pair index: picks the copy
  for (const RowList::Group& g : R.groups) {
    const WEntry* T = W.table[g.neg];
    uint32_t* c1 = h + g.b;  // C1 bin of weight exponent f: c1[f]
    int32_t c3 = 0;
    for (int32_t q = g.begin; q < g.end; ++q, ++p) {
      const WEntry e = T[wc[pos[q]]];
      const int64_t copy = kCopies == 1 ? 0 : (p & (kCopies - 1)) * hs;
      // Unsigned adds: -1 wraps and is read back as int32.
      c1[copy + e.f] += static_cast<uint32_t>(e.sg);
      if (!kTerms) h[copy + off2 + e.f] += static_cast<uint32_t>(e.sg);
      c3 += e.sg;
    }
    h[L.off3 + g.b] += static_cast<uint32_t>(c3);
  }
  if (kTerms) {
    // Zero activations: their weight-term contributions (activation sign
    // taken as +1), subtracted from the precomputed terms afterwards.
    const WEntry* T = W.table[0];
    for (int32_t z : R.zeros) {
      const WEntry e = T[wc[z]];
      h[off2 + e.f] += static_cast<uint32_t>(e.sg);
    }
  }
  for (int c = 1; c < kCopies; ++c) {
    for (int b = 0; b < L.counted; ++b) h[b] += h[c * hs + b];
  }
}

template <bool kTerms>
void count_pairs_any(int copies, const RowList& R, const Weights& W, const Layout& L,
                     int64_t n, uint32_t* h) {
  switch (copies) {
    case 4: return count_pairs<4, kTerms>(R, W, L, n, h);
    case 2: return count_pairs<2, kTerms>(R, W, L, n, h);
    default: return count_pairs<1, kTerms>(R, W, L, n, h);
  }
}

// sum_i w[i] * clamp(c[i]) in float64: branch-free so that it vectorizes.
double weighted_sum(const uint32_t* c, const double* w, int len, const Post& P) {
  double t = 0;
  if (P.clamp) {
    for (int i = 0; i < len; ++i) {
      t += static_cast<double>(P.c(static_cast<int32_t>(c[i]))) * w[i];
    }
  } else {
    for (int i = 0; i < len; ++i) t += static_cast<double>(static_cast<int32_t>(c[i])) * w[i];
  }
  return t;
}

// Counts one activation row against outputs [n0, n1) and writes
// out[n * out_stride].
void count_row(const RowList& R, const Weights& W, const Layout& L,
               const Post& P, int64_t n0, int64_t n1, float* out,
               int64_t out_stride, std::vector<uint32_t>& hist) {
  const int64_t nnz = R.nnz();
  // Precomputed weight terms serve unsigned rows only; they pay when the
  // zero positions are fewer than the nonzero ones (SPEC section 4).
  const bool use_terms = W.terms && !R.has_neg && !P.clamp &&
                         static_cast<int64_t>(R.zeros.size()) < nnz;
  const int nb = L.nb, E = P.E;
  // Copies break store-to-load chains on repeated bins; small tables repeat
  // bins most, and large ones cost the most to clear and merge.
  const int copies = L.bits <= 3 ? 4 : (L.bits <= 5 ? 2 : 1);
  hist.resize(copies * L.hsize);
  uint32_t* h = hist.data();
  // Bin weights: C1 at s = 2 .. 2nb-2 (k = s - nb); C2/C3 at b = 1 .. nb-1.
  const double* pw1 = P.pw.data() + 2 * E - nb;      // pw1[s] = alpha^(s - nb)
  const double* pw2 = P.pw.data() + 2 * E - nb / 2;  // pw2[b] = alpha^(b - nb/2)
  for (int64_t n = n0; n < n1; ++n) {
    for (int c = 0; c < copies; ++c) std::fill(h + c * L.hsize, h + c * L.hsize + L.counted, 0u);
    std::fill(h + L.off3, h + L.off3 + nb, 0u);
    if (use_terms) count_pairs_any<true>(copies, R, W, L, n, h);
    else count_pairs_any<false>(copies, R, W, L, n, h);
    uint32_t* c2 = h + L.off2;
    if (use_terms) {
      const int32_t* terms = W.terms + n * nb;
      for (int b = 0; b < nb; ++b) c2[b] = static_cast<uint32_t>(terms[b]) - c2[b];
    }
    // Post-processing in float64.
    const double t1 = weighted_sum(h + 2, pw1 + 2, 2 * nb - 3, P);
    const double t2 = weighted_sum(c2 + 1, pw2 + 1, nb - 1, P);
    const double t3 = weighted_sum(h + L.off3 + 1, pw2 + 1, nb - 1, P);
    int64_t c4 = 0;
    for (int b = 1; b < nb; ++b) c4 += static_cast<int32_t>(c2[b]);
    double sasw = P.sasw, basw = P.basw, sabw = P.sabw, babw = P.babw;
    if (P.ws) {
      const double s = P.ws[n], o = P.wo[n];
      sasw = P.sa * s; basw = P.ba * s; sabw = P.sa * o; babw = P.ba * o;
    }
    double y = sasw * t1 + basw * t2 + sabw * t3 + babw * static_cast<double>(P.c(c4));
    if (P.bias) y += static_cast<double>(P.bias[n]);
    out[n * out_stride] = static_cast<float>(y);
  }
}

Post make_post(double alpha, double sa, double ba, double sw, double bw,
               int64_t bits, c10::optional<int64_t> counter_bits,
               const float* bias, const ChannelParams& wc) {
  Post P;
  P.sasw = sa * sw; P.basw = ba * sw; P.sabw = sa * bw; P.babw = ba * bw;
  if (wc.defined()) {
    P.sa = sa; P.ba = ba;
    P.ws = wc.scale.const_data_ptr<float>();
    P.wo = wc.offset.const_data_ptr<float>();
  }
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


}  // namespace

}  // namespace cpu

int run_cpu(const CountPlan& p) {
  using namespace cpu;
  if (const int bad = bad_codes(p)) return bad;
  if (p.out.numel() == 0) return 0;
  const int64_t N = p.N, K = p.K;
  const at::Tensor& out = p.out;
  const Layout L(static_cast<int>(p.bits));
  const Weights W = prepare_weights(p.w, p.terms);
  const Post P = make_post(p.alpha, p.sa, p.ba, p.sw, p.bw, p.bits, p.counter_bits,
                           p.bias.defined() ? p.bias.const_data_ptr<float>() : nullptr, p.wc);
  const uint8_t* ap = reinterpret_cast<const uint8_t*>(p.a.const_data_ptr<int8_t>());
  const int64_t rows = out.numel() / N;
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
  return 0;
}

int run_cpu(const ConvCountPlan& p) {
  using namespace cpu;
  if (const int bad = bad_codes(p)) return bad;
  if (p.out.numel() == 0) return 0;
  const int64_t Nb = p.a.size(0), C = p.a.size(1), H = p.a.size(2), Wd = p.a.size(3);
  const int64_t O = p.N, Cg = p.w.size(1), kh = p.w.size(2), kw = p.w.size(3);
  const int64_t Ho = p.Ho, Wo = p.Wo, groups = p.groups;
  const auto &stride = p.stride, &padding = p.padding, &dilation = p.dilation;
  const int64_t Kg = Cg * kh * kw, Og = O / groups, HW = Ho * Wo;
  const Layout L(static_cast<int>(p.bits));
  const Weights W = prepare_weights(p.w, p.terms);
  const Post P = make_post(p.alpha, p.sa, p.ba, p.sw, p.bw, p.bits, p.counter_bits,
                           p.bias.defined() ? p.bias.const_data_ptr<float>() : nullptr, p.wc);
  const uint8_t* ap = reinterpret_cast<const uint8_t*>(p.a.const_data_ptr<int8_t>());
  float* op = p.out.data_ptr<float>();
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
  return 0;
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CPU, m) {
  m.impl("exp_linear_count", &dnateq::exp_linear_count);
  m.impl("exp_conv2d_count", &dnateq::exp_conv2d_count);
}
