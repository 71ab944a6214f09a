// Fitting one tensor (SPEC section 2): exact errors from sorted magnitudes and
// prefix sums, the paper's base search (Algorithm 1) and our golden-section
// search. exp_error and exp_fit on the CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>

#include "checks.h"
#include "fit/front.h"
#include "common/cpu_kernels.h"
#include "fit/magnitudes.h"

namespace dnateq {
namespace cpu {

SortedMagnitudes::SortedMagnitudes(const at::Tensor& x_in, const char* arg) {
  check_float_input(x_in, arg);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  // Magnitudes of nonzero elements, gathered per chunk then concatenated.
  const int64_t chunk = 1 << 16;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::vector<std::vector<float>> parts(nchunks);
  std::atomic<bool> ok{true};
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(chunk);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t s = c * chunk, len = std::min(chunk, n - s);
      detail::load_as_float(x, s, len, buf.data());
      auto& out = parts[c];
      out.reserve(len);
      bool good = true;
      for (int64_t i = 0; i < len; ++i) {
        const float m = std::fabs(buf[i]);
        good &= (m <= FLT_MAX);
        if (m != 0.f) out.push_back(m);
      }
      if (!good) ok = false;
    }
  });
  TORCH_CHECK(ok.load(), "dnateq: ", arg, " contains non-finite values (NaN or Inf)");
  size_t total = 0;
  for (auto& p : parts) total += p.size();
  m_.reserve(total);
  for (auto& p : parts) m_.insert(m_.end(), p.begin(), p.end());
  std::sort(m_.begin(), m_.end());
  build_prefix();
}

SortedMagnitudes::SortedMagnitudes(std::vector<float> sorted) : m_(std::move(sorted)) {
  build_prefix();
}

void SortedMagnitudes::build_prefix() {
  prefix_.resize(m_.size() + 1);
  prefix_[0] = 0.0;
  for (size_t i = 0; i < m_.size(); ++i) prefix_[i + 1] = prefix_[i] + m_[i];
}

double SortedMagnitudes::abs_error(const ExpTables& t) const {
  // Elements with biased exponent b are those in [t_{b-2}, t_{b-1}) (with
  // -inf / +inf at the ends); inside that segment the error against level v
  // splits at v into (v - m) below and (m - v) above.
  const float* first = m_.data();
  const float* last = m_.data() + m_.size();
  const int L = num_levels(t.bits);
  double err = 0.0;
  int64_t s = 0;
  for (int b = 1; b <= L; ++b) {
    const int64_t e = (b - 1 < t.n_thr)
        ? std::lower_bound(first + s, last, t.thresholds[b - 1]) - first
        : size();
    if (e > s) {
      const double v = static_cast<double>(t.levels[b]);
      // first index in [s, e) with m >= v (compare in float64: v is exact)
      const int64_t q = std::lower_bound(first + s, first + e, v,
          [](float m, double val) { return static_cast<double>(m) < val; }) - first;
      err += v * static_cast<double>(q - s) - (prefix_[q] - prefix_[s]);
      err += (prefix_[e] - prefix_[q]) - v * static_cast<double>(e - q);
    }
    s = e;
  }
  return err;
}

double SortedMagnitudes::rmae(const ExpTables& t) const {
  if (m_.empty()) return 0.0;
  return abs_error(t) / total();
}

namespace {

struct Candidate {
  double alpha = 2.0, scale = 1.0, offset = 0.0, rmae = 0.0;
};

double alpha_min() { return 1.0 + 1e-4; }
// Largest base for which every alpha^k, |k| <= 2E, is finite in float32.
double alpha_max(int bits) {
  return std::min(16.0, std::exp(40.0 / exp_range(bits)));
}

// S and beta that put the lowest level at lo and the highest at hi (SPEC
// section 2, our reconstruction of Eq. 4-5), and the exact error.
Candidate evaluate(const SortedMagnitudes& m, double alpha, int bits, Rounding r) {
  const int E = exp_range(bits);
  const double lo = m.lo(), hi = m.hi();
  Candidate c;
  c.alpha = alpha;
  c.scale = (hi - lo) / (std::pow(alpha, E) - std::pow(alpha, -E));
  c.offset = lo - c.scale * std::pow(alpha, -E);
  ExpTables t;
  make_tables(t, alpha, c.scale, c.offset, bits, r);
  c.rmae = m.rmae(t);
  return c;
}

// Algorithm 1: start at (hi/lo)^(1/2E), step by (alpha0 - 1)/10 in the
// better direction while the error falls, within [alpha_min, alpha_max].
Candidate search_paper(const SortedMagnitudes& m, int bits, Rounding r) {
  const double amin = alpha_min(), amax = alpha_max(bits);
  const int E = exp_range(bits);
  double a0 = std::pow(static_cast<double>(m.hi()) / m.lo(), 1.0 / (2.0 * E));
  if (!std::isfinite(a0)) a0 = amax;
  a0 = std::min(amax, std::max(amin, a0));
  const double delta = (a0 - 1.0) / 10.0;
  const auto clamp = [&](double a) { return std::min(amax, std::max(amin, a)); };
  Candidate best = evaluate(m, a0, bits, r);
  double dir = 0.0;
  Candidate probe = best;
  for (double d : {+1.0, -1.0}) {
    const double a = clamp(a0 + d * delta);
    if (a == a0) continue;
    const Candidate c = evaluate(m, a, bits, r);
    if (c.rmae < probe.rmae) { probe = c; dir = d; }
  }
  if (dir == 0.0) return best;
  best = probe;
  // Bounded so a tiny delta on a long slope cannot run for ever.
  for (int step = 0; step < 100000; ++step) {
    const double a = clamp(best.alpha + dir * delta);
    if (a == best.alpha) break;
    const Candidate c = evaluate(m, a, bits, r);
    if (!(c.rmae < best.rmae)) break;
    best = c;
  }
  return best;
}

// Coarse log-spaced scan, golden-section refinement around the best point,
// and the paper's answer: the best of all, so never worse than "paper". The
// grid (48 points), the bracket and the 60 golden steps are the same as
// dnateq.reference's, so every point the reference evaluates is evaluated here
// too and the native answer is never worse than the reference's (up to the
// last bits of the two error sums; tests/test_fit.py).
Candidate search_golden(const SortedMagnitudes& m, int bits, Rounding r) {
  const double la = std::log(alpha_min()), lb = std::log(alpha_max(bits));
  Candidate best = search_paper(m, bits, r);
  const auto consider = [&](double log_alpha) {
    const Candidate c = evaluate(m, std::exp(log_alpha), bits, r);
    if (c.rmae < best.rmae) best = c;
    return c.rmae;
  };
  constexpr int kGrid = 48;
  constexpr int kIters = 60;
  double grid_err[kGrid];
  int gi = 0;
  for (int i = 0; i < kGrid; ++i) {
    grid_err[i] = consider(la + (lb - la) * i / (kGrid - 1));
    if (grid_err[i] < grid_err[gi]) gi = i;
  }
  double a = la + (lb - la) * std::max(0, gi - 1) / (kGrid - 1);
  double b = la + (lb - la) * std::min(kGrid - 1, gi + 1) / (kGrid - 1);
  const double g = (std::sqrt(5.0) - 1.0) / 2.0;
  double c = b - g * (b - a), d = a + g * (b - a);
  double fc = consider(c), fd = consider(d);
  for (int it = 0; it < kIters; ++it) {
    if (fc <= fd) { b = d; d = c; fd = fc; c = b - g * (b - a); fc = consider(c); }
    else { a = c; c = d; fc = fd; d = a + g * (b - a); fd = consider(d); }
  }
  return best;
}

}  // namespace

namespace {

// The fit of one bit width on already sorted magnitudes: exp_fit's body, so
// that exp_fit and exp_fits give bit-identical answers.
Candidate fit_sorted(const SortedMagnitudes& m, int64_t bits, bool paper,
                     Rounding r, c10::optional<double> alpha) {
  const int n = static_cast<int>(bits);
  // Degenerate tensors (SPEC section 2); a given alpha is kept so that the
  // two tensors of a layer always share their base.
  if (m.size() == 0) {
    Candidate c;
    c.alpha = alpha.value_or(2.0);
    return c;
  }
  if (m.hi() == m.lo()) {
    Candidate c;
    c.alpha = alpha.value_or(2.0);
    ExpTables t;
    make_checked_tables(t, c.alpha, m.lo(), 0.0, bits, r, "scale", "offset");
    c.scale = static_cast<double>(m.lo());
    c.offset = 0.0;
    c.rmae = m.rmae(t);
    return c;
  }
  Candidate c;
  if (alpha.has_value()) {
    c = evaluate(m, *alpha, n, r);
    TORCH_CHECK(std::isfinite(c.scale) && c.scale > 0 && std::isfinite(c.offset),
                "dnateq: alpha=", *alpha, " is too large for bits=", bits,
                " (alpha^E overflows)");
    ExpTables t;
    make_checked_tables(t, c.alpha, c.scale, c.offset, bits, r, "scale", "offset");
  } else {
    c = paper ? search_paper(m, n, r) : search_golden(m, n, r);
  }
  return c;
}

}  // namespace

}  // namespace cpu

double run_cpu(const ErrorPlan& p) { return cpu::SortedMagnitudes(p.x, "x").rmae(p.t); }

at::Tensor run_cpu(const ErrorsPlan& p) {
  const cpu::SortedMagnitudes m(p.x, "x");  // sorted once for every candidate
  const int64_t n = static_cast<int64_t>(p.tables.size());
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  at::parallel_for(0, n, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) o[i] = m.rmae(p.tables[i]);
  });
  return out;
}

std::tuple<double, double, double, double> run_cpu(const FitPlan& p) {
  const cpu::SortedMagnitudes m(p.x, "x");
  const cpu::Candidate c = cpu::fit_sorted(m, p.bits, p.paper, p.rounding, p.alpha);
  return {c.alpha, c.scale, c.offset, c.rmae};
}

at::Tensor run_cpu(const FitsPlan& p) {
  const cpu::SortedMagnitudes m(p.x, "x");  // sorted once for every bit width
  const int64_t nb = static_cast<int64_t>(p.bits.size());
  at::Tensor out = at::empty({nb, 4}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      const c10::optional<double> a =
          p.alpha.empty() ? c10::nullopt : c10::optional<double>(p.alpha[i]);
      const cpu::Candidate c = cpu::fit_sorted(m, p.bits[i], p.paper, p.rounding, a);
      o[4 * i + 0] = c.alpha;
      o[4 * i + 1] = c.scale;
      o[4 * i + 2] = c.offset;
      o[4 * i + 3] = c.rmae;
    }
  });
  return out;
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CPU, m) {
  m.impl("exp_fit", &dnateq::exp_fit);
  m.impl("exp_error", &dnateq::exp_error);
  m.impl("exp_errors", &dnateq::exp_errors);
  m.impl("exp_fits", &dnateq::exp_fits);
}
