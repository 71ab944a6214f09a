// Register-resident quantizer for bits <= 5: the thresholds live in
// registers and each magnitude is compared with them; levels are read with
// register permutes.
//   bits <= 3: all (at most 6) thresholds, compared flat;
//   bits 4, 5: runs of 4 thresholds, 3 or 7 compares pick the run and 3
//              permuted thresholds finish the count.
//
// Why: the bucket table (bucket_encoder.h) needs a table load per element
// (two for fake quantization), more than these compares cost: 0.40-0.57 ns
// per element single-threaded at bits 4-5 against 0.59-1.0 for the bucket
// table when it gathered (measured before its scalar-load rewrite; the two
// are now within noise at bits 5-6). Wider tables (bits 6, 7) measured slower
// this way and keep the bucket table. Bit-exact with the normative
// comparison, since it is that comparison: e = -E + #{t_j <= |x|}.
#pragma once

#include <cstdint>

#include "format.h"

namespace dnateq {
namespace cpu {
namespace detail {

// Whether the compare encoder runs for these tables (bits <= 5) on this CPU (AVX2).
bool compare_encoder_ok(const ExpTables& t);

// Same contracts as bucket_encode_codes / bucket_encode_levels: n float32
// inputs; false if any input is non-finite. compare_encoder_ok(t) must hold.
bool compare_encode_codes(const ExpTables& t, const float* x, int64_t n, int8_t* out);
bool compare_encode_levels(const ExpTables& t, const float* x, int64_t n, float* out);

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
