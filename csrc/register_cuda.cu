// CUDA backend: one TORCH_LIBRARY_IMPL for every operator (schemas in
// csrc/register.cpp). Compiled only in the CUDA build (setup.py adds
// csrc/<family>/cuda.cu when CUDA is available).
#include <torch/library.h>

#include "cuda_ops.h"

TORCH_LIBRARY_IMPL(dnateq, CUDA, m) {
  m.impl("exp_quantize", &dnateq::cuda::exp_quantize);
  m.impl("exp_dequantize", &dnateq::cuda::exp_dequantize);
  m.impl("exp_pack", &dnateq::cuda::exp_pack);
  m.impl("exp_unpack", &dnateq::cuda::exp_unpack);
  m.impl("exp_linear_count", &dnateq::cuda::exp_linear_count);
  m.impl("exp_conv2d_count", &dnateq::cuda::exp_conv2d_count);
  m.impl("exp_linear_lut", &dnateq::cuda::exp_linear_lut);
  m.impl("exp_conv2d_lut", &dnateq::cuda::exp_conv2d_lut);
  m.impl("exp_fit", &dnateq::cuda::exp_fit);
  m.impl("exp_error", &dnateq::cuda::exp_error);
}
