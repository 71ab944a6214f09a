// Register-resident quantizer for the smallest tables (bits <= 3: at most 6
// thresholds and 8 levels): each magnitude is compared with every threshold
// held in a register, and levels are read with one register permute.
//
// Why: the bucket table (bucket_encoder.h) costs an AVX2 gather per 8
// elements whatever the bit width, which on AMD Zen is slower than the 2 to 6
// compares these widths need. Bit-exact with the normative comparison, since
// it is that comparison: e = -E + #{t_j <= |x|}.
#pragma once

#include <cstdint>

#include "../format.h"

namespace dnateq {
namespace cpu {
namespace detail {

// Whether the compare encoder runs for these tables on this CPU (AVX2).
bool compare_encoder_ok(const ExpTables& t);

// Same contracts as bucket_encode_codes / bucket_encode_levels: n float32
// inputs; false if any input is non-finite. compare_encoder_ok(t) must hold.
bool compare_encode_codes(const ExpTables& t, const float* x, int64_t n, int8_t* out);
bool compare_encode_levels(const ExpTables& t, const float* x, int64_t n, float* out);

}  // namespace detail
}  // namespace cpu
}  // namespace dnateq
