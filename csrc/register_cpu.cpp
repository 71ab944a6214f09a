// CPU backend: one TORCH_LIBRARY_IMPL for every operator.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(dnateq, CPU, m) {
  m.impl("exp_quantize", &dnateq::cpu::exp_quantize);
  m.impl("exp_dequantize", &dnateq::cpu::exp_dequantize);
  m.impl("exp_pack", &dnateq::cpu::exp_pack);
  m.impl("exp_unpack", &dnateq::cpu::exp_unpack);
  m.impl("exp_linear_count", &dnateq::cpu::exp_linear_count);
  m.impl("exp_conv2d_count", &dnateq::cpu::exp_conv2d_count);
  m.impl("exp_linear_lut", &dnateq::cpu::exp_linear_lut);
  m.impl("exp_conv2d_lut", &dnateq::cpu::exp_conv2d_lut);
  m.impl("exp_lut_layout", &dnateq::cpu::exp_lut_layout);
  m.impl("exp_fit", &dnateq::cpu::exp_fit);
  m.impl("exp_error", &dnateq::cpu::exp_error);
  m.impl("exp_errors", &dnateq::cpu::exp_errors);
  m.impl("exp_fits", &dnateq::cpu::exp_fits);
}
