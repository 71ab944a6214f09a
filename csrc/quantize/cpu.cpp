// exp_quantize / exp_dequantize on the CPU (run_cpu of the plans of
// quantize/front.h), plus the block quantizer shared with the LUT operators.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>

#include "checks.h"
#include "quantize/bucket_encoder.h"
#include "quantize/compare_encoder.h"
#include "common/cpu_kernels.h"
#include "lut/fast_layout.h"
#include "lut/fast_lut.h"
#include "quantize/front.h"

namespace dnateq {
namespace cpu {
namespace detail {

void load_as_float(const at::Tensor& x, int64_t begin, int64_t n, float* out) {
  switch (x.scalar_type()) {
    case at::kFloat:
      std::memcpy(out, x.const_data_ptr<float>() + begin, n * sizeof(float));
      break;
    case at::kHalf: {
      const at::Half* p = x.const_data_ptr<at::Half>() + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
    case at::kBFloat16: {
      const at::BFloat16* p = x.const_data_ptr<at::BFloat16>() + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "dnateq: unsupported dtype ", x.scalar_type());
  }
}

namespace {

// Counting comparator: every element against every threshold. Branch-free
// and vectorizable, so it wins while the table is small. Compiled for AVX2
// as well as the baseline; the loader picks at run time.
__attribute__((target_clones("avx2", "default")))
bool count_small(const float* x, int64_t n, const float* thr, int n_thr,
                 uint8_t* biased) {
  int32_t cnt[kBlock];
  float mag[kBlock];
  int32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float m = std::fabs(x[i]);
    mag[i] = m;
    bad |= !(m <= FLT_MAX);  // NaN and Inf both fail
    cnt[i] = 1;
  }
  for (int k = 0; k < n_thr; ++k) {
    const float t = thr[k];
    for (int64_t i = 0; i < n; ++i) cnt[i] += (mag[i] >= t) ? 1 : 0;
  }
  for (int64_t i = 0; i < n; ++i) biased[i] = static_cast<uint8_t>(cnt[i]);
  return bad == 0;
}

// Two levels for the larger tables (n >= 6): a vectorized count against
// every 8th threshold picks a run of 8, then 7 branch-free comparisons
// inside it. Same result as counting every threshold.
__attribute__((target_clones("avx2", "default")))
bool count_two_level(const float* x, int64_t n, const ExpTables& t,
                     uint8_t* biased) {
  float coarse[kMaxThresholds / 8 + 1];
  const int n_coarse = t.n_thr / 8;  // thresholds 8c+7 that exist
  for (int c = 0; c < n_coarse; ++c) coarse[c] = t.thresholds[8 * c + 7];
  // fine[c][j] = threshold 8c+j, j < 7, +inf past the end
  float fine[kMaxThresholds / 8 + 1][8];
  for (int c = 0; c <= n_coarse; ++c) {
    for (int j = 0; j < 8; ++j) {
      const int k = 8 * c + j;
      fine[c][j] = (j < 7 && k < t.n_thr) ? t.thresholds[k] : INFINITY;
    }
  }
  int32_t cnt[kBlock];
  float mag[kBlock];
  int32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float m = std::fabs(x[i]);
    mag[i] = m;
    bad |= !(m <= FLT_MAX);
    cnt[i] = 0;
  }
  for (int c = 0; c < n_coarse; ++c) {
    const float th = coarse[c];
    for (int64_t i = 0; i < n; ++i) cnt[i] += (mag[i] >= th) ? 1 : 0;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* f = fine[cnt[i]];
    const float m = mag[i];
    int k = 0;
    for (int j = 0; j < 7; ++j) k += (m >= f[j]) ? 1 : 0;
    biased[i] = static_cast<uint8_t>(1 + 8 * cnt[i] + k);
  }
  return bad == 0;
}

}  // namespace

bool biased_exponents(const float* x, int64_t n, const ExpTables& t,
                      uint8_t* biased) {
  if (t.bits <= 5) return count_small(x, n, t.thresholds, t.n_thr, biased);
  return count_two_level(x, n, t, biased);
}

bool encode_block(const float* x, int64_t n, const ExpTables& t, int8_t* out) {
  uint8_t b[kBlock];
  const bool ok = biased_exponents(x, n, t, b);
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    uint8_t c = (v < 0.f) ? static_cast<uint8_t>(b[i] | kSignBit) : b[i];
    out[i] = static_cast<int8_t>(v == 0.f ? 0 : c);
  }
  return ok;
}

bool fake_quantize_block(const float* x, int64_t n, const ExpTables& t,
                         float* out) {
  uint8_t b[kBlock];
  const bool ok = biased_exponents(x, n, t, b);
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float lv = t.levels[b[i]];
    out[i] = v == 0.f ? 0.f : (v < 0.f ? -lv : lv);
  }
  return ok;
}

// The AVX-512 encoders keep fast::EncodePlan's numbers, so a plan converts.
enum class Encoder : int {
  kAvx512Float = static_cast<int>(fast::EncodePlan::kFloat),
  kAvx512Word = static_cast<int>(fast::EncodePlan::kWord),
  kAvx512WordCell4 = static_cast<int>(fast::EncodePlan::kWordCell4),
  kAvx512WordCell5 = static_cast<int>(fast::EncodePlan::kWordCell5),
  kAvx2Compare = 6, kBucket = 7, kCounting = 8
};
static std::atomic<int> g_last_encoder{-1};
inline void note_encoder(Encoder e) {
  g_last_encoder.store(static_cast<int>(e), std::memory_order_relaxed);
}

inline bool avx512_encode(const ExpTables& t, const float* in, int64_t n, int8_t* out,
                          bool note) {
  fast::EncodePlan plan = fast::EncodePlan::kFloat;
  const bool ok = fast::encode_codes_avx512(t.thresholds, t.n_thr, in, n, out, &plan);
  if (note) note_encoder(static_cast<Encoder>(plan));
  return ok;
}
inline bool avx512_encode(const ExpTables& t, const float* in, int64_t n, float* out,
                          bool note) {
  if (note) note_encoder(Encoder::kAvx512Float);
  return fast::encode_levels_avx512(t.thresholds, t.n_thr, t.levels, in, n, out);
}

// Encodes a contiguous tensor into `o` with the fastest exact encoder for the
// table: bits <= 3 compare in registers (any size); larger tables use the
// bucket table on large tensors, else (small tensors, dense thresholds) the
// counting comparator. Half and bfloat16 are widened per block first.
// Returns false if any input was non-finite.
template <typename Out, typename CompareFn, typename BucketFn, typename BlockFn>
bool encode_tensor(const at::Tensor& x, const ExpTables& t, Out* o, CompareFn compare_fn,
                   BucketFn bucket_fn, BlockFn block_fn) {
  // AVX-512 first (every n), then the AVX2 register compare (n <= 5), the
  // bucket table, the portable counting comparator.
  const bool avx512 = active_isa() == Isa::kAvx512;
  const bool compare = !avx512 && compare_encoder_ok(t);
  BucketEncoder enc;
  if (!avx512 && !compare && x.numel() >= kBucketMinElements) build_bucket_encoder(t, enc);
  // `first`: the block at offset 0, whose encoder quantize_path() reports
  auto encode = [&](const float* in, int64_t n, Out* out, bool first) {
    if (avx512) return avx512_encode(t, in, n, out, first);
    const Encoder e = compare ? Encoder::kAvx2Compare
                              : (enc.ok ? Encoder::kBucket : Encoder::kCounting);
    if (first) note_encoder(e);
    if (compare) return compare_fn(t, in, n, out);
    if (enc.ok) return bucket_fn(enc, in, n, out);
    return block_fn(in, n, t, out);
  };
  const bool direct = (avx512 || compare || enc.ok) && x.scalar_type() == at::kFloat;
  std::atomic<bool> ok{true};
  at::parallel_for(0, x.numel(), 16 * kBlock, [&](int64_t b0, int64_t b1) {
    if (direct) {
      if (!encode(x.const_data_ptr<float>() + b0, b1 - b0, o + b0, b0 == 0)) ok = false;
      return;
    }
    float buf[kBlock];
    for (int64_t s = b0; s < b1; s += kBlock) {
      const int64_t n = std::min(kBlock, b1 - s);
      load_as_float(x, s, n, buf);
      if (!encode(buf, n, o + s, s == 0)) ok = false;
    }
  });
  return ok.load();
}

at::Tensor fake_quantize_to_float(const at::Tensor& x_in, const ExpTables& t,
                                  const char* arg) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const bool ok = encode_tensor(x, t, out.data_ptr<float>(), compare_encode_levels,
                                bucket_encode_levels, fake_quantize_block);
  TORCH_CHECK(ok, "dnateq: ", arg, " contains non-finite values (NaN or Inf)");
  return out;
}

}  // namespace detail

}  // namespace cpu

std::string quantize_path() {
  static const char* const kNames[] = {"avx512_float", "avx512_word", "", "", "avx512_word_cell4",
                                       "avx512_word_cell5", "avx2_compare", "bucket", "counting"};
  const int v = cpu::detail::g_last_encoder.load(std::memory_order_relaxed);
  return v < 0 ? std::string("none") : std::string(kNames[v]);
}

bool run_cpu(const QuantizePlan& p) {
  // The CPU always checks for non-finite input (check_finite only lets CUDA
  // skip its host synchronization).
  return cpu::detail::encode_tensor(p.x, p.t, p.out.data_ptr<int8_t>(),
                                    cpu::detail::compare_encode_codes,
                                    cpu::detail::bucket_encode_codes, cpu::detail::encode_block);
}

bool run_cpu(const DequantizePlan& p) {
  float lut[256];  // indexed by the code byte
  code_values(p.t, lut);
  const int max_mag = num_levels(p.t.bits);
  const bool f32 = p.out.scalar_type() == at::kFloat;
  at::Tensor outf = f32 ? p.out : at::empty(p.codes.sizes(), p.codes.options().dtype(at::kFloat));
  const uint8_t* c = reinterpret_cast<const uint8_t*>(p.codes.const_data_ptr<int8_t>());
  float* o = outf.data_ptr<float>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, p.codes.numel(), 1 << 14, [&](int64_t b0, int64_t b1) {
    bool good = true;
    for (int64_t i = b0; i < b1; ++i) {
      o[i] = lut[c[i]];
      good &= (c[i] & kMagMask) <= max_mag;
    }
    if (!good) ok = false;
  });
  if (!f32) p.out.copy_(outf);
  return ok.load();
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CPU, m) {
  m.impl("exp_quantize", &dnateq::exp_quantize);
  m.impl("exp_dequantize", &dnateq::exp_dequantize);
}
