// The C++ entry points of the dnateq operators (SPEC section 5): one header,
// one declaration per operator, for every backend. Each operator is written
// once, as the front of its family (csrc/<family>/front.h: argument checks,
// tables, output geometry and allocation), which then runs the plan on the
// tensors' device: run_cpu in csrc/<family>/cpu.cpp, run_cuda in
// csrc/<family>/cuda.cu. Those two files also register the entry for their
// dispatch key; the schemas are in csrc/register.cpp. docs/ARCHITECTURE.md
// has the data path and the list of files to touch to add an operator.
//
// C++ programs (and tests/cpp) call dnateq::exp_quantize(...) and so on on
// CPU or CUDA tensors; dnateq::cpu::* names the same functions, as before.
#pragma once

#include "count/front.h"
#include "fit/front.h"
#include "lut/front.h"
#include "pack/front.h"
#include "quantize/front.h"

namespace dnateq {
namespace cpu {

using dnateq::exp_conv2d_count;
using dnateq::exp_conv2d_lut;
using dnateq::exp_dequantize;
using dnateq::exp_error;
using dnateq::exp_errors;
using dnateq::exp_fit;
using dnateq::exp_fits;
using dnateq::exp_linear_count;
using dnateq::exp_linear_lut;
using dnateq::exp_pack;
using dnateq::exp_quantize;
using dnateq::exp_unpack;
// exp_lut_layout (CPU only) is declared in lut/fast_lut.h.

}  // namespace cpu
}  // namespace dnateq
