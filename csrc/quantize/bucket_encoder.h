// Exact O(1)-per-element quantizer for the CPU: a table indexed by the top
// bits of |x|'s float32 bit pattern.
//
// Why: counting |x| against every threshold costs 2^n - 2 comparisons per
// element, too slow for n >= 5 and still several passes for small n. For
// non-negative floats the bit pattern is ordered like the value, so the top
// bits (exponent + a few mantissa bits) name a "bucket" of magnitudes. When no
// bucket holds two thresholds, the biased exponent of |x| is
//     1 + base[bucket] + (low bits of |x| >= low bits of the bucket's threshold)
// which is bit-exact with the normative comparison `e = -E + #{t_j <= |x|}`:
// inside a bucket the high bits are equal, so comparing the low bits compares
// the floats. One table entry packs both numbers (the compare becomes a carry
// into bit 24), so the AVX2 path needs one table load and three vector
// instructions per element.
//
// When the thresholds are too dense for the finest resolution tried (alpha
// very close to 1, or equal thresholds), `ok` is false and callers use the
// counting comparator.
#pragma once

#include <cstdint>
#include <vector>

#include "format.h"

namespace dnateq {
namespace cpu {
namespace detail {

struct BucketEncoder {
  bool ok = false;
  int shift = 0;                // bucket = bits(|x|) >> shift
  uint32_t low_mask = 0;        // (1 << shift) - 1
  std::vector<uint32_t> table;  // entry = (1 + base) << 24 + 2^24 - threshold's
                                // low bits (1 << shift: no threshold inside)
  const ExpTables* t = nullptr;
};

// Builds the table for `t`, trying 4..7 mantissa bits of resolution. The
// coarsest table that separates every threshold wins (smallest, stays in L1).
void build_bucket_encoder(const ExpTables& t, BucketEncoder& enc);

// Encoders over n float32 inputs; return false if any input is non-finite.
// codes: int8 codes (sign bit 7 + biased exponent). levels: the dequantized
// value sign * level (fake quantization).
bool bucket_encode_codes(const BucketEncoder& enc, const float* x, int64_t n, int8_t* out);
bool bucket_encode_levels(const BucketEncoder& enc, const float* x, int64_t n, float* out);

// Tensors smaller than this use the counting comparator: building the table
// costs about as much as quantizing this many elements.
constexpr int64_t kBucketMinElements = 1 << 15;

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
