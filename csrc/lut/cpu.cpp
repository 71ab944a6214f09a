// The fast ("lut") path on the CPU: quantize the float activations with the
// layer's parameters, dequantize activations and packed weights through
// their level tables, and call the native matmul / convolution. For a few
// rows (GEMV, the memory-bound decoding case) a fused kernel reads the packed
// weights directly and never writes a float copy of them.
//
// Per-output-channel weight parameters (w_scale/w_offset, SPEC section 9):
// every path decodes weight row n through its own field table, built from
// (alpha, w_scale[n], w_offset[n]) exactly as the per-tensor table is.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "common/cpu_kernels.h"
#include "lut/fast_lut.h"
#include "lut/front.h"

namespace dnateq {
namespace cpu {
namespace {

// Field tables of the weight rows: one shared table (per-tensor) or one per
// row (per-channel), built on demand into a caller's buffer.
struct RowTables {
  const ExpTables* tw;
  bool w_signed;
  const float* ws = nullptr;  // per-channel scale / offset, or null
  const float* wo = nullptr;
  double pw[kMaxLevels + 1];
  float shared[256];
  RowTables(const ExpTables& t, bool is_signed, const ChannelParams& wc, double alpha)
      : tw(&t), w_signed(is_signed) {
    if (wc.defined()) {
      ws = wc.scale.const_data_ptr<float>();
      wo = wc.offset.const_data_ptr<float>();
      biased_powers(alpha, t.bits, pw);
    } else {
      field_values(t, is_signed, shared);
    }
  }
  // The table of row n: `shared`, or row n's built into buf.
  const float* row(int64_t n, float* buf) const {
    if (!ws) return shared;
    row_field_values(pw, tw->bits, w_signed, ws[n], wo[n], buf);
    return buf;
  }
};

// Rows at or below which exp_linear_lut uses the fused decode-and-dot kernel.
constexpr int64_t kGemvMaxRows = 4;
// Activations (floats) up to which exp_linear_lut multiplies panel by panel:
// they stay in each core's L2 (1 MB here) while every panel reuses them.
constexpr int64_t kPanelMaxActivations = int64_t{1} << 18;

// y[m, n] = sum_k xq[m, k] * level(w[n, k]) + bias[n], decoding each weight
// row once for all m, in registers (no float copy of the row).
at::Tensor fused_gemv(const at::Tensor& xq, const at::Tensor& packed, int64_t N,
                      int64_t K, const RowTables& T, const at::Tensor& bias) {
  const int64_t M = xq.size(0);
  const int b = packed_field_bits(T.tw->bits, T.w_signed);
  const int64_t rb = packed.size(1);
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  const float* x = xq.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({M, N}, xq.options());
  float* o = out.data_ptr<float>();
  constexpr int64_t kChunk = 1024;  // multiple of 32: chunks start on words
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float part[kGemvMaxRows];
    float buf[256];
    for (int64_t n = n0; n < n1; ++n) {
      const float* lut = T.row(n, buf);
      // float partial sums per chunk, accumulated in double
      double acc[kGemvMaxRows] = {0, 0, 0, 0};
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t len = std::min(kChunk, K - k0);
        const int64_t off = (k0 / 32) * 4 * b;
        detail::dot_packed_row(src + n * rb + off, len, rb - off, b, lut, x + k0, K,
                               static_cast<int>(M), part);
        for (int64_t m = 0; m < M; ++m) acc[m] += part[m];
      }
      for (int64_t m = 0; m < M; ++m) {
        o[m * N + n] = static_cast<float>(acc[m] + (bp ? bp[n] : 0.0));
      }
    }
  });
  return out;
}

// y = xq @ level(w)^T + bias for many rows, one panel of weight rows at a
// time: each task decodes its panel into a reused per-thread buffer sized
// for L2 and multiplies it straight into its columns of y. The float copy of
// the whole weight (4 bytes per weight, written then read back from memory)
// never exists; at batch 64 its round trip was a third of the GEMM's time.
at::Tensor panel_gemm(const at::Tensor& xq, const at::Tensor& packed, int64_t N, int64_t K,
                      const RowTables& T, const at::Tensor& bias) {
  const int64_t M = xq.size(0);
  const int b = packed_field_bits(T.tw->bits, T.w_signed);
  const int64_t rb = packed.size(1);
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  at::Tensor out = at::empty({M, N}, xq.options());
  // About 1 MB of float weights per panel, in multiples of 16 rows.
  const int64_t rows = std::clamp<int64_t>((int64_t{1} << 18) / std::max<int64_t>(K, 1) / 16 * 16,
                                           16, 512);
  const int64_t panels = (N + rows - 1) / rows;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    static thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(rows * K));
    float lbuf[256];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * rows, nr = std::min(rows, N - n0);
      for (int64_t r = 0; r < nr; ++r) {
        detail::decode_row_float(src + (n0 + r) * rb, K, rb, b, T.row(n0 + r, lbuf),
                                 buf.data() + r * K);
      }
      const at::Tensor wp = at::from_blob(buf.data(), {nr, K}, xq.options());
      at::Tensor cols = out.narrow(1, n0, nr);
      if (bias.defined()) {
        at::addmm_out(cols, bias.narrow(0, n0, nr), xq, wp.t());
      } else {
        at::mm_out(cols, xq, wp.t());
      }
    }
  });
  return out;
}

// The whole weight decoded to float32 [N, K] (per-tensor: the shared
// decoder; per-channel: row by row through each row's table).
at::Tensor decode_weight(const at::Tensor& packed_in, int64_t N, int64_t K, const RowTables& T) {
  if (!T.ws) return detail::decode_packed_to_float(packed_in, N, K, *T.tw, T.w_signed);
  const at::Tensor packed = packed_in.contiguous();
  const int b = packed_field_bits(T.tw->bits, T.w_signed);
  const int64_t rb = packed.size(1);
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  at::Tensor out = at::empty({N, K}, packed.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float lbuf[256];
    for (int64_t n = n0; n < n1; ++n) {
      detail::decode_row_float(src + n * rb, K, rb, b, T.row(n, lbuf), o + n * K);
    }
  });
  return out;
}

}  // namespace

}  // namespace cpu

at::Tensor run_cpu(const LutPlan& p) {
  using namespace cpu;
  const at::Tensor &x = p.x, &w_packed = p.w_packed;
  const LutArgs& A = p.A;
  const int64_t N = p.N, K = p.K, M = p.M, bits = p.bits;
  const bool w_signed = p.w_signed;
  const std::vector<int64_t>& out_shape = p.out_shape;
  const RowTables T(A.tw, w_signed, A.wc, p.alpha);
  if (K == 0 || N == 0) {
    // Empty dot products: the output is the bias (or zeros); x is still checked.
    detail::fake_quantize_to_float(x, A.ta, "x");
    at::Tensor y = at::zeros({M, N}, x.options().dtype(at::kFloat));
    if (A.bias.defined()) y.add_(A.bias);
    y = y.reshape(out_shape);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  if (p.w_layout.defined()) {
    if (M >= 1 && M <= kFastMaxRows &&
        active_isa() == Isa::kAvx512) {
      // fast_linear validates the layout against this weight.
      at::Tensor y = fast_linear(x, p.w_layout, w_packed, N, K, A.ta, A.tw, p.alpha,
                                 A.wc.scale, A.wc.offset, w_signed, A.bias)
                         .reshape(out_shape);
      return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
    }
    // Another path reads w_packed; a layout that does not belong to it is
    // still an error.
    validate_layout(p.w_layout, w_packed, N, K, bits, w_signed);
  }
  const at::Tensor xq = detail::fake_quantize_to_float(x, A.ta, "x").reshape({M, K});
  at::Tensor y;
  if (xq.size(0) <= kGemvMaxRows && K > 0) {
    note_lut_path(active_isa() >= Isa::kAvx2 ? LutPath::kAvx2 : LutPath::kPortable);
    y = fused_gemv(xq, w_packed.contiguous(), N, K, T, A.bias);
  } else if (xq.numel() <= kPanelMaxActivations) {
    note_lut_path(LutPath::kGemm);
    y = panel_gemm(xq, w_packed.contiguous(), N, K, T, A.bias);
  } else {
    // Large activations would be re-read from memory by every panel: decode
    // the whole weight once and make one call to the native GEMM.
    const at::Tensor wq = decode_weight(w_packed, N, K, T);
    y = A.bias.defined() ? at::linear(xq, wq, A.bias) : at::linear(xq, wq);
  }
  y = y.reshape(out_shape);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor run_cpu(const ConvLutPlan& p) {
  using namespace cpu;
  const at::Tensor &x = p.x, &w_packed = p.w_packed;
  const LutArgs& A = p.A;
  const int64_t O = p.N, K = p.K, bits = p.bits;
  const bool w_signed = p.w_signed;
  if (O == 0 || K == 0) {
    // No output channels, or empty dot products (the output is the bias).
    detail::fake_quantize_to_float(x, A.ta, "x");
    at::Tensor y = at::zeros(p.out_shape, x.options().dtype(at::kFloat));
    if (A.bias.defined()) y.add_(A.bias.view({1, O, 1, 1}));
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  if (p.w_layout.defined()) {
    if (p.groups == 1 && x.size(0) <= kFastConvBatch && active_isa() == Isa::kAvx512) {
      // fast_conv2d validates the layout against this weight and notes the
      // path it took (direct or native conv).
      at::Tensor y = fast_conv2d(x, p.w_layout, w_packed, p.w_shape, A.ta, A.tw, p.alpha,
                                 A.wc.scale, A.wc.offset, w_signed, A.bias, p.stride, p.padding,
                                 p.dilation);
      return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
    }
    validate_layout(p.w_layout, w_packed, O, K, bits, w_signed);
  }
  const RowTables T(A.tw, w_signed, A.wc, p.alpha);
  note_lut_path(LutPath::kGemm);
  const at::Tensor xq = detail::fake_quantize_to_float(x, A.ta, "x");
  const at::Tensor wq = decode_weight(w_packed, O, K, T).reshape(p.w_shape);
  at::Tensor y = at::conv2d(xq, wq, A.bias.defined() ? c10::optional<at::Tensor>(A.bias)
                                                     : c10::nullopt,
                            p.stride, p.padding, p.dilation, p.groups);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace dnateq

TORCH_LIBRARY_IMPL(dnateq, CPU, m) {
  m.impl("exp_linear_lut", &dnateq::exp_linear_lut);
  m.impl("exp_conv2d_lut", &dnateq::exp_conv2d_lut);
  m.impl("exp_lut_layout", &dnateq::cpu::exp_lut_layout);
}
