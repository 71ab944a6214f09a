// The packed-weight GEMV of exp_linear_lut (csrc/lut/gemv.cu) and the
// float32-faithful GEMM helpers of the LUT path. Not a public API.
#pragma once

#include "common/cuda_common.cuh"

namespace dnateq {
namespace cuda {
namespace detail {

// Rows (M) up to which exp_linear_lut uses a fused GEMV.
constexpr int64_t kGemv2MaxRows = 8;

// Whether gemv2 takes this call: 1 <= M <= 8, N > 0, K a positive multiple
// of 128 (every row then holds whole 16-byte groups of fields), x
// float32/float16/bfloat16, w_packed a contiguous [N, row_bytes] uint8 CUDA
// tensor whose base is 16-byte aligned. Never throws; the caller's checks
// run first.
bool gemv2_eligible(const at::Tensor& x, const at::Tensor& w_packed, int64_t M,
                    int64_t N, int64_t K, int64_t bits, bool w_signed);

// y [M, N] in x.dtype = fake_quant(x) @ level(w)^T + bias, float32 products
// and sums, one kernel launch (two when K is split over blocks and summed by
// a second, deterministic, kernel). Raises on non-finite x (FiniteCheck).
// The kernel parameter blocks (thresholds, levels, field table) come from a
// per-thread cache keyed on the tables, so a repeated call builds nothing.
at::Tensor gemv2(const at::Tensor& x, const at::Tensor& w_packed, int64_t M,
                 int64_t N, int64_t K, const LutArgs& A, bool w_signed);

// float32 x_hat [M, K] @ w_hat [N, K]^T (+ bias) in float32, emulated with
// three bf16 tensor-core GEMMs (hi*hi + hi*lo + lo*hi, one call over 3K):
// each float32 value v = hi + lo + r with hi = bf16(v), lo = bf16(v - hi),
// |r| <= 2^-17 |v|, so each product is off by about 3 * 2^-17 relative.
at::Tensor bf16x3_linear(const at::Tensor& xq, const at::Tensor& wq,
                         const at::Tensor& bias);

// Turns cuBLAS TF32 off for float32 matmuls while alive (and back on after,
// if it was on). The setting is process-global: a concurrent thread that
// changes it meanwhile races with this guard.
class NoTF32Matmul {
 public:
  NoTF32Matmul() : was_(at::globalContext().allowTF32CuBLAS()) {
    if (was_) at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~NoTF32Matmul() {
    if (was_) at::globalContext().setAllowTF32CuBLAS(true);
  }
  NoTF32Matmul(const NoTF32Matmul&) = delete;
  NoTF32Matmul& operator=(const NoTF32Matmul&) = delete;

 private:
  bool was_;
};

}  // namespace detail
}  // namespace cuda
}  // namespace dnateq
