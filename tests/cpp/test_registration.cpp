// The operators are registered with the dispatcher (csrc/register.cpp,
// csrc/register_cpu.cpp) with the binding argument order of SPEC
// section 5, and calling through the dispatcher reaches the CPU kernels.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

#include "ops.h"

namespace {

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(
      (std::string("dnateq::") + name).c_str(), "");
}

std::vector<std::string> arg_names(const c10::OperatorHandle& h) {
  std::vector<std::string> out;
  for (const auto& a : h.schema().arguments()) out.push_back(a.name());
  return out;
}

using V = std::vector<std::string>;

TEST(Registration, SchemasInBindingOrder) {
  EXPECT_EQ(arg_names(op("exp_quantize")),
            (V{"x", "alpha", "scale", "offset", "bits", "rounding", "check_finite"}));
  EXPECT_EQ(arg_names(op("exp_dequantize")),
            (V{"codes", "alpha", "scale", "offset", "bits", "dtype"}));
  EXPECT_EQ(arg_names(op("exp_pack")), (V{"codes", "bits", "signed"}));
  EXPECT_EQ(arg_names(op("exp_unpack")), (V{"packed", "bits", "signed", "shape"}));
  EXPECT_EQ(arg_names(op("exp_linear_count")),
            (V{"a_codes", "w_codes", "alpha", "sa", "ba", "sw", "bw", "bits", "bias",
               "counter_bits", "w_terms", "w_scale", "w_offset"}));
  EXPECT_EQ(arg_names(op("exp_conv2d_count")),
            (V{"a_codes", "w_codes", "alpha", "sa", "ba", "sw", "bw", "bits", "bias",
               "stride", "padding", "dilation", "groups", "counter_bits", "w_terms", "w_scale",
               "w_offset"}));
  EXPECT_EQ(arg_names(op("exp_linear_lut")),
            (V{"x", "w_packed", "w_shape", "alpha", "sa", "ba", "sw", "bw", "bits",
               "a_signed", "w_signed", "rounding", "bias", "w_scale", "w_offset", "w_layout"}));
  EXPECT_EQ(arg_names(op("exp_conv2d_lut")),
            (V{"x", "w_packed", "w_shape", "alpha", "sa", "ba", "sw", "bw", "bits",
               "a_signed", "w_signed", "rounding", "bias", "stride", "padding",
               "dilation", "groups", "w_scale", "w_offset", "w_layout"}));
  EXPECT_EQ(arg_names(op("exp_fit")), (V{"x", "bits", "search", "rounding", "alpha"}));
  EXPECT_EQ(arg_names(op("exp_error")),
            (V{"x", "alpha", "scale", "offset", "bits", "rounding"}));
  EXPECT_EQ(op("exp_fit").schema().returns().size(), 4u);
}

TEST(Registration, EveryOpHasACpuKernel) {
  for (const char* name :
       {"exp_quantize", "exp_dequantize", "exp_pack", "exp_unpack", "exp_linear_count",
        "exp_conv2d_count", "exp_linear_lut", "exp_conv2d_lut", "exp_fit", "exp_error",
        "exp_lut_layout"}) {
    EXPECT_TRUE(op(name).hasKernelForDispatchKey(c10::DispatchKey::CPU)) << name;
  }
}

TEST(Registration, DispatcherCallReachesCpuKernel) {
  const auto q = op("exp_quantize")
                     .typed<at::Tensor(const at::Tensor&, double, double, double,
                                       int64_t, c10::string_view, bool)>();
  const at::Tensor x = at::tensor({1.3f, 1.58f, -0.05f, 0.0f, 100.0f});
  const at::Tensor c = q.call(x, 2.0, 0.5, 0.1, 3, "log", true);
  EXPECT_TRUE(at::equal(c, dnateq::cpu::exp_quantize(x, 2.0, 0.5, 0.1, 3, "log", true)));
  const at::Tensor expect = at::tensor(std::vector<int8_t>{5, 6, -127, 0, 7});
  EXPECT_TRUE(at::equal(c, expect));
}

}  // namespace
