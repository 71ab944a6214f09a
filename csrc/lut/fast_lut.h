// ATen side of the LUT fast path (fast_lut.cpp): the run-time ISA choice of
// the CPU kernels, the offline weight layout's builder and checks, and the
// batch-1..8 linear on that layout.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "format.h"
#include "lut/fast_layout.h"

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
// kAvx512Gemm: the layout kernels on blocks of 8 rows (fast_gemm.cpp);
// kAvx512Conv: quantize + layout decode + native conv (fast_conv.cpp);
// kAvx512DirectConv: quantize into shifted planes + layout decode + the
// direct FMA kernel (fast_conv.cpp, direct_conv_avx512.cpp).
enum class LutPath : int {
  kPortable = 0, kAvx2 = 1, kAvx512 = 2, kGemm = 3, kAvx512Gemm = 4, kAvx512Conv = 5,
  kAvx512DirectConv = 6
};
void note_lut_path(LutPath p);
std::string lut_path();

// Activation rows up to which exp_linear_lut uses the layout's kernels: the
// GEMV kernels directly up to fast::kGemvRows, in blocks of them above
// (gemm_rows_avx512); more rows go to the decoded-panel native GEMM. The
// GEMV kernels slice K so that each 8-row block of x stays in L1 at any K
// (measured, K=N=4096, 1 thread, time / fp32: M=16 0.75x, M=32 0.85x, where
// the panel GEMM took 1.77x and 1.64x; at M=64 both took about 1.5x, and the
// panel GEMM is kept there).
constexpr int64_t kFastMaxRows = 32;

// dnateq::exp_lut_layout: the offline layout of a packed weight (fast_layout.h).
at::Tensor exp_lut_layout(const at::Tensor& w_packed, at::IntArrayRef w_shape, int64_t bits,
                          bool w_signed);
// Throws a clear error unless `layout` is a current-version layout of this
// weight (shape, bits, sign, and built from these packed bytes).
// Returns its header.
fast::LayoutHeader validate_layout(const at::Tensor& layout, const at::Tensor& w_packed,
                                  int64_t N, int64_t K, int64_t bits, bool w_signed);

// Storage for the weight level tables a GemvArgs points to.
struct WeightTables {
  alignas(64) float levels[128] = {};
  double pw[128] = {};
};
// Fills the weight side of `a` (data, K, Kp, row_bytes, bits, sign, kind and
// the per-tensor levels or per-channel scale/offset/powers, kept in `wt`)
// from a validated layout.
void fill_weight_args(fast::GemvArgs& a, const fast::LayoutHeader& h, const at::Tensor& layout,
                      int64_t K, const ExpTables& tw, double alpha, const at::Tensor& w_scale,
                      const at::Tensor& w_offset, bool w_signed, WeightTables& wt);
// y[M, N] of the layout kernels for M > fast::kGemvRows: blocks of 8 activation
// rows against L2-sized blocks of weight rows, at::parallel_for over the
// weight rows (fast_gemm.cpp). `a` is filled except for M.
void gemm_rows_avx512(const fast::GemvArgs& a, int64_t M, int64_t N);
// exp_conv2d_lut on the layout (fast_conv.cpp): batch <= kFastConvBatch,
// groups == 1, AVX-512. Arguments checked by the caller, layout validated
// here; notes the path it took (kAvx512DirectConv or kAvx512Conv).
constexpr int64_t kFastConvBatch = 8;
at::Tensor fast_conv2d(const at::Tensor& x, const at::Tensor& layout, const at::Tensor& w_packed,
                       at::IntArrayRef w_shape, const ExpTables& ta, const ExpTables& tw,
                       double alpha, const at::Tensor& w_scale, const at::Tensor& w_offset,
                       bool w_signed, const at::Tensor& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation);
// y [M, N] (float32) = fake_quantize(x) @ levels(w)^T + bias, M <= 8 rows of x
// (x: [.., K] float/half/bf16), on the AVX-512 kernels. Per-channel weight
// parameters when w_scale/w_offset (float32 [N], contiguous) are defined.
at::Tensor fast_linear(const at::Tensor& x, const at::Tensor& layout,
                       const at::Tensor& w_packed, int64_t N, int64_t K, const ExpTables& ta,
                       const ExpTables& tw, double alpha, const at::Tensor& w_scale,
                       const at::Tensor& w_offset, bool w_signed, const at::Tensor& bias);

}  // namespace cpu
}  // namespace dnateq
