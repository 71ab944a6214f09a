// ATen side of the LUT fast path (fast_lut.cpp): the run-time ISA choice of
// the CPU kernels, the offline weight layout's builder and checks, and the
// batch-1..8 linear on that layout.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "format.h"

namespace dnateq {
namespace cpu {

// Kernel families, in order: a CPU that runs one runs the ones before it.
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
// The best this CPU runs (AVX-512 = F, BW, VL, DQ, VBMI; AVX2 with FMA).
Isa supported_isa();
// The family the kernels use now: supported_isa(), lowered by the
// DNATEQ_CPU_ISA environment variable (read once) or cpu_isa().
Isa active_isa();
const char* isa_name(Isa isa);
// dnateq::_cpu_isa: "" queries, "auto" resets to the best supported,
// "avx512" / "avx2" / "portable" forces (an error when the CPU lacks it).
// Returns the active family's name.
std::string cpu_isa(c10::string_view request);

// Which path the last CPU LUT linear/conv call took (dnateq::_lut_path), so
// tests can name the kernels they checked.
enum class LutPath : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kGemm = 3 };
void note_lut_path(LutPath p);
std::string lut_path();

// Activation rows up to which exp_linear_lut uses the layout's GEMV kernels.
constexpr int64_t kFastMaxRows = 8;

// dnateq::exp_lut_layout: the offline layout of a packed weight (fast_layout.h).
at::Tensor exp_lut_layout(const at::Tensor& w_packed, at::IntArrayRef w_shape, int64_t bits,
                          bool w_signed);
// Throws a clear error unless `layout` is a current-version layout of this
// weight (shape, bits, sign, and built from these packed bytes).
void validate_layout(const at::Tensor& layout, const at::Tensor& w_packed, int64_t N,
                     int64_t K, int64_t bits, bool w_signed);
// y [M, N] (float32) = fake_quantize(x) @ levels(w)^T + bias, M <= 8 rows of x
// (x: [.., K] float/half/bf16), on the AVX-512 kernels. Per-channel weight
// parameters when w_scale/w_offset (float32 [N], contiguous) are defined.
at::Tensor fast_linear(const at::Tensor& x, const at::Tensor& layout,
                       const at::Tensor& w_packed, int64_t N, int64_t K, const ExpTables& ta,
                       const ExpTables& tw, double alpha, const at::Tensor& w_scale,
                       const at::Tensor& w_offset, bool w_signed, const at::Tensor& bias);

}  // namespace cpu
}  // namespace dnateq
