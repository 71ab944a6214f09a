// exp_pack / exp_unpack on the CPU (run_cpu of the plans of pack/front.h),
// and the packed-weight decoder used by the LUT operators. Layout (SPEC section 1): d0 rows of K fields of b bits,
// LSB-first into little-endian 32-bit words, each row 4-byte aligned.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "checks.h"
#include "pack/front.h"
#include "common/cpu_kernels.h"

namespace dnateq {
namespace cpu {
namespace {

// 32 fields of b bits fill exactly b words, so work splits on 32-element
// groups without sharing a word.
constexpr int64_t kGroup = 32;

}  // namespace

namespace detail {

at::Tensor decode_packed_to_float(const at::Tensor& packed_in, int64_t rows,
                                  int64_t K, const ExpTables& t,
                                  bool is_signed) {
  const at::Tensor packed = packed_in.contiguous();
  float lut[256];
  field_values(t, is_signed, lut);
  const int b = packed_field_bits(t.bits, is_signed);
  const int64_t rb = packed.size(1);
  at::Tensor out = at::empty({rows, K}, packed.options().dtype(at::kFloat));
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) decode_row_float(src + r * rb, K, rb, b, lut, dst + r * K);
  });
  return out;
}

}  // namespace detail

}  // namespace cpu

int run_cpu(const PackPlan& p) {
  using cpu::kGroup;
  const int64_t rows = p.rows, K = p.K, bits = p.bits;
  const bool is_signed = p.is_signed;
  const int b = packed_field_bits(static_cast<int>(bits), is_signed);
  const int64_t rb = p.out.size(1);
  const uint8_t* src = reinterpret_cast<const uint8_t*>(p.codes.const_data_ptr<int8_t>());
  uint8_t* dst = p.out.data_ptr<uint8_t>();
  const int max_mag = num_levels(static_cast<int>(bits));
  const int64_t groups = (K + kGroup - 1) / kGroup;
  // Per code byte, its field (b <= 8 bits) and what is wrong with it (1: bits
  // above n set; 2: a sign in an unsigned tensor): the loop below is two table
  // loads per code and no branch on the code.
  uint8_t field_of[256], bad_of[256];
  for (int c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    field_of[c] = static_cast<uint8_t>(code_to_field(code, static_cast<int>(bits), is_signed));
    bad_of[c] = static_cast<uint8_t>(((code & kMagMask) > max_mag ? 1 : 0) |
                                     (!is_signed && (code & kSignBit) ? 2 : 0));
  }
  std::atomic<int> bad{0};
  at::parallel_for(0, rows * groups, 256, [&](int64_t g0, int64_t g1) {
    int local = 0;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r = g / groups, i0 = (g % groups) * kGroup;
      const int64_t i1 = std::min(K, i0 + kGroup);
      const uint8_t* c = src + r * K;
      uint8_t* row = dst + r * rb + (i0 / kGroup) * 4 * b;
      uint64_t acc = 0;
      int nbits = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const uint8_t code = c[i];
        local |= bad_of[code];
        acc |= static_cast<uint64_t>(field_of[code]) << nbits;
        nbits += b;
        if (nbits >= 32) {
          const uint32_t w = static_cast<uint32_t>(acc);
          std::memcpy(row, &w, 4);
          row += 4;
          acc >>= 32;
          nbits -= 32;
        }
      }
      if (nbits > 0) {  // last partial word of the row
        const uint32_t w = static_cast<uint32_t>(acc);
        std::memcpy(row, &w, 4);
      }
    }
    if (local) bad |= local;
  });
  return bad.load();
}

void run_cpu(const UnpackPlan& p) {
  const int64_t K = p.K;
  const int b = packed_field_bits(static_cast<int>(p.bits), p.is_signed);
  int8_t lut[256];
  for (uint32_t f = 0; f < (1u << b); ++f) {
    lut[f] = static_cast<int8_t>(field_to_code(f, static_cast<int>(p.bits), p.is_signed));
  }
  const uint8_t* src = p.packed.const_data_ptr<uint8_t>();
  int8_t* dst = p.out.data_ptr<int8_t>();
  const int64_t rb = p.packed.size(1);
  at::parallel_for(0, p.rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      cpu::detail::decode_row(src + r * rb, K, b, lut, dst + r * K);
    }
  });
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CPU, m) {
  m.impl("exp_pack", &dnateq::exp_pack);
  m.impl("exp_unpack", &dnateq::exp_unpack);
}
