// C++ entry points of the dnateq operators (SPEC section 5). The CPU
// implementations live in csrc/<family>/cpu.cpp, the CUDA ones in
// csrc/<family>/cuda.cu; both are
// registered with the dispatcher, and C++ tests may call these directly.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace dnateq {
namespace cpu {

at::Tensor exp_quantize(const at::Tensor& x, double alpha, double scale,
                        double offset, int64_t bits, c10::string_view rounding,
                        bool check_finite);
at::Tensor exp_dequantize(const at::Tensor& codes, double alpha, double scale,
                          double offset, int64_t bits, at::ScalarType dtype);
at::Tensor exp_pack(const at::Tensor& codes, int64_t bits, bool is_signed);
at::Tensor exp_unpack(const at::Tensor& packed, int64_t bits, bool is_signed,
                      at::IntArrayRef shape);
at::Tensor exp_linear_count(const at::Tensor& a_codes, const at::Tensor& w_codes,
                            double alpha, double sa, double ba, double sw,
                            double bw, int64_t bits,
                            const c10::optional<at::Tensor>& bias,
                            c10::optional<int64_t> counter_bits,
                            const c10::optional<at::Tensor>& w_terms,
                            const c10::optional<at::Tensor>& w_scale = c10::nullopt,
                            const c10::optional<at::Tensor>& w_offset = c10::nullopt);
at::Tensor exp_conv2d_count(const at::Tensor& a_codes, const at::Tensor& w_codes,
                            double alpha, double sa, double ba, double sw,
                            double bw, int64_t bits,
                            const c10::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups,
                            c10::optional<int64_t> counter_bits,
                            const c10::optional<at::Tensor>& w_terms,
                            const c10::optional<at::Tensor>& w_scale = c10::nullopt,
                            const c10::optional<at::Tensor>& w_offset = c10::nullopt);
at::Tensor exp_linear_lut(const at::Tensor& x, const at::Tensor& w_packed,
                          at::IntArrayRef w_shape, double alpha, double sa,
                          double ba, double sw, double bw, int64_t bits,
                          bool a_signed, bool w_signed,
                          c10::string_view rounding,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& w_scale = c10::nullopt,
                          const c10::optional<at::Tensor>& w_offset = c10::nullopt,
                          const c10::optional<at::Tensor>& w_layout = c10::nullopt);
at::Tensor exp_conv2d_lut(const at::Tensor& x, const at::Tensor& w_packed,
                          at::IntArrayRef w_shape, double alpha, double sa,
                          double ba, double sw, double bw, int64_t bits,
                          bool a_signed, bool w_signed,
                          c10::string_view rounding,
                          const c10::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups,
                          const c10::optional<at::Tensor>& w_scale = c10::nullopt,
                          const c10::optional<at::Tensor>& w_offset = c10::nullopt,
                          const c10::optional<at::Tensor>& w_layout = c10::nullopt);
// Beyond SPEC's list: the offline weight layout of the LUT fast path
// (SPEC section 9), built from exp_pack's rows; see cpu/fast_layout.h.
at::Tensor exp_lut_layout(const at::Tensor& w_packed, at::IntArrayRef w_shape, int64_t bits,
                          bool w_signed);
std::tuple<double, double, double, double> exp_fit(
    const at::Tensor& x, int64_t bits, c10::string_view search,
    c10::string_view rounding, c10::optional<double> alpha);
double exp_error(const at::Tensor& x, double alpha, double scale,
                 double offset, int64_t bits, c10::string_view rounding);
// Beyond SPEC's list: the exact RMAE of many candidates (sorted once).
at::Tensor exp_errors(const at::Tensor& x, at::ArrayRef<double> alpha,
                      at::ArrayRef<double> scale, at::ArrayRef<double> offset,
                      int64_t bits, c10::string_view rounding);
// Beyond SPEC's list: exp_fit for several bit widths, sorted once; float64
// [len(bits), 4] rows (alpha, scale, offset, rmae), bit-identical to exp_fit.
at::Tensor exp_fits(const at::Tensor& x, at::IntArrayRef bits,
                    c10::string_view search, c10::string_view rounding,
                    c10::optional<at::ArrayRef<double>> alpha);

}  // namespace cpu
}  // namespace dnateq
