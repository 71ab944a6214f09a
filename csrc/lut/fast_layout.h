// The offline weight layout of the LUT fast path (SPEC section 9, "internal
// weight layouts") and the AVX-512 GEMV kernels that read it.
//
// This header is plain C++ (no ATen): fast_avx512.cpp includes it and is
// compiled for AVX-512 (per-file target), so it must not pull in inline code
// that other translation units share.
//
// Layout (version kLayoutVersion), a uint8 tensor of kHeaderBytes + N *
// row_bytes bytes, derived from exp_pack's rows (w_packed stays the
// interchange format; the layout is rebuilt from it, never the other way):
//
//   header (64 bytes, little-endian): u32 magic 'DTQL', u32 version,
//     i64 N, i64 K, u32 bits, u32 signed, u32 kind, u32 group,
//     i64 row_bytes, u64 fingerprint of w_packed (sampled words), zeros.
//
//   kind 1 "nibbles" (magnitude tables of <= 32 levels: signed n <= 5,
//     unsigned n <= 5): the K fields of a row (b = packed field bits) in
//     groups of 32 (the last one padded with zero fields), each group
//     16 bytes of low nibbles, byte j = (f[j] & 15) | (f[j+16] & 15) << 4,
//     then one 32-bit bit plane per field bit above 3 (bit j = bit 4+p of
//     f[j]). A 16-byte load widened to 16 dwords indexes a 16-float register
//     table with vpermps (which reads the low 4 bits only); the planes are
//     k-masks that pick the second table (magnitude bit 4) or flip the sign.
//   kind 2 "bytes" (n >= 6): one byte per field, low 7 bits the biased
//     exponent, bit 7 the sign, in groups of 64 stored in the order that the
//     byte-plane decode (4 x vpermi2b, then byte/word unpacks) yields in
//     natural order: stored[16l + 4r + i] = f[16r + 4l + i].
#pragma once

#include <cstdint>

namespace dnateq {
namespace cpu {
namespace fast {

constexpr uint32_t kLayoutMagic = 0x4C515444u;  // "DTQL"
constexpr uint32_t kLayoutVersion = 1;
constexpr int64_t kHeaderBytes = 64;

struct LayoutHeader {
  uint32_t magic, version;
  int64_t N, K;
  uint32_t bits, is_signed, kind, group;
  int64_t row_bytes;
  uint64_t fingerprint;
  uint8_t pad[kHeaderBytes - 56];
};
static_assert(sizeof(LayoutHeader) == kHeaderBytes, "layout header is 64 bytes");

// Which kind of layout a (bits, signed) format gets.
inline int layout_kind(int bits, bool is_signed) { return bits <= 5 ? 1 : 2; }
inline int layout_group(int kind) { return kind == 1 ? 32 : 64; }
// Field bits (sign + exponent, or exponent) -> bytes per group of kind 1.
inline int64_t kind1_group_bytes(int b) { return 16 + 4 * (b > 4 ? b - 4 : 0); }
inline int64_t layout_row_bytes(int64_t K, int bits, bool is_signed) {
  const int b = is_signed ? bits + 1 : bits;
  const int kind = layout_kind(bits, is_signed);
  const int64_t groups = (K + layout_group(kind) - 1) / layout_group(kind);
  return kind == 1 ? groups * kind1_group_bytes(b) : groups * 64;
}
// Activation row length the kernels read (K padded with zeros to whole groups).
inline int64_t layout_padded_k(int64_t K, int bits, bool is_signed) {
  const int64_t g = layout_group(layout_kind(bits, is_signed));
  return (K + g - 1) / g * g;
}

// Activation rows one GEMV kernel call takes.
constexpr int64_t kGemvRows = 8;

// One call of the kernel: rows [n0, n1) of y[m, n] = sum_k x[m, k] * w[n, k]
// (+ bias[n]) for m < M <= 8.
struct GemvArgs {
  const uint8_t* data;  // the layout's rows (after the header)
  int64_t K, Kp, row_bytes;
  int bits;
  bool is_signed;
  int kind;
  const float* x;   // [M, Kp], quantized activations, zero past K
  int M;
  // Weight levels: per tensor, `levels` (biased exponent -> float level,
  // levels[0] = 0); per output channel, `scale`/`offset` [N] with `pw`
  // (alpha^e by biased exponent, pw[0] = 0): level = float(scale * pw + offset).
  const float* levels;
  const float* scale;
  const float* offset;
  const double* pw;
  const float* bias;  // [N] or null
  float* y;           // [M, ldy]
  int64_t ldy;
};

// AVX-512 (F, BW, VL, DQ, VBMI) kernel; defined in fast_avx512.cpp.
void gemv_avx512(const GemvArgs& a, int64_t n0, int64_t n1);

// Rows [n0, n1) of the layout decoded to float32 levels (per-tensor or
// per-channel tables as in GemvArgs; x/M/y unused): Kp values per row, the
// padding fields 0, row n at out + (n - n0) * ld. Defined in fast_avx512.cpp.
void decode_rows_avx512(const GemvArgs& a, int64_t n0, int64_t n1, float* out, int64_t ld);

// AVX-512 quantizer of n floats against the n_thr (<= 126) sorted
// thresholds: int8 codes, or signed levels (levels[b] by biased exponent b,
// 1 .. n_thr + 1). Same result as format.h's encode; returns false when some
// input is NaN or +-Inf (the caller rejects the tensor).
// The codes take a search on 16-bit keys (32 lanes per instruction) where
// the positive thresholds' top 16 bits are distinct, else the float search.
// *plan (if given) says which ran on the bulk of x: kFloat, kWord, or the
// word search whose first 4 or 5 steps are one cell lookup.
enum class EncodePlan : int { kFloat = 0, kWord = 1, kWordCell4 = 4, kWordCell5 = 5 };
bool encode_codes_avx512(const float* thr, int n_thr, const float* x, int64_t n, int8_t* out,
                         EncodePlan* plan = nullptr);
bool encode_levels_avx512(const float* thr, int n_thr, const float* levels, const float* x,
                          int64_t n, float* out);

}  // namespace fast
}  // namespace cpu
}  // namespace dnateq
