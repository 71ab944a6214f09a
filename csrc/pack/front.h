// The pack family's front: exp_pack and exp_unpack (SPEC sections 1 and 5).
// Layout: d0 rows of K fields of b bits (b = n + 1 signed, n unsigned),
// LSB-first into little-endian 32-bit words, each row 4-byte aligned. Each
// entry validates, allocates the output and runs the plan on its device
// (common/plan.h); the kernels are in cpu.cpp and cuda.cu beside this file.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "common/plan.h"

namespace dnateq {

struct PackPlan {
  c10::Device device{at::kCPU};
  at::Tensor codes;  // contiguous int8 codes
  at::Tensor out;    // uint8 [rows, row_bytes]
  int64_t rows = 0, K = 0, bits = 0;
  bool is_signed = false;
};
// Flags of what the kernel found: 1 = a code has bits above bit n-1 set,
// 2 = a sign bit in an unsigned tensor.
int run_cpu(const PackPlan& p);
int run_cuda(const PackPlan& p);

struct UnpackPlan {
  c10::Device device{at::kCPU};
  at::Tensor packed;  // contiguous uint8 [rows, row_bytes]
  at::Tensor out;     // int8 codes of the requested shape
  int64_t rows = 0, K = 0, bits = 0;
  bool is_signed = false;
};
void run_cpu(const UnpackPlan& p);
void run_cuda(const UnpackPlan& p);

inline at::Tensor exp_pack(const at::Tensor& codes, int64_t bits, bool is_signed) {
  check_codes(codes, "codes");
  check_bits(bits);
  PackPlan p;
  std::tie(p.rows, p.K) = packed_dims(codes.sizes());
  p.device = codes.device();
  p.bits = bits;
  p.is_signed = is_signed;
  p.codes = codes.contiguous();
  // Every word of every row is written by the kernels.
  p.out = at::empty({p.rows, packed_row_bytes(p.K, static_cast<int>(bits), is_signed)},
                    p.codes.options().dtype(at::kByte));
  const int flags = p.out.numel() == 0 ? 0 : run(p);
  check_codes_valid(!(flags & 1), "codes", bits);
  TORCH_CHECK(!(flags & 2),
              "dnateq: codes has negative codes (sign bit set) but signed=False; "
              "pack signed tensors with signed=True");
  return p.out;
}

inline at::Tensor exp_unpack(const at::Tensor& packed, int64_t bits, bool is_signed,
                             at::IntArrayRef shape) {
  UnpackPlan p;
  std::tie(p.rows, p.K) = check_unpack_args(packed, bits, is_signed, shape);
  p.device = packed.device();
  p.bits = bits;
  p.is_signed = is_signed;
  p.packed = packed.contiguous();
  p.out = at::empty(shape, p.packed.options().dtype(at::kChar));
  if (p.rows * p.K > 0) run(p);
  return p.out;
}

}  // namespace dnateq
