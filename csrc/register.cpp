// Operator schemas (SPEC section 5). The argument order is binding: arguments
// may only be appended, with defaults. w_scale/w_offset (SPEC section 9):
// per-output-channel weight parameters, float32 [N], given together; they
// replace sw/bw. Each family registers its kernels beside them:
// TORCH_LIBRARY_IMPL(dnateq, CPU) in csrc/<family>/cpu.cpp and
// TORCH_LIBRARY_IMPL(dnateq, CUDA) in csrc/<family>/cuda.cu, both for the
// one entry per op of csrc/<family>/front.h; the fake (meta) kernels are
// registered from Python beside each wrapper (python/dnateq/ops.py).
// docs/ARCHITECTURE.md: the data path and the files to touch to add an op.
#include <Python.h>
#include <torch/library.h>

#include "lut/fast_lut.h"
#include "quantize/front.h"

// An importable `dnateq._C` so that `import dnateq` loads this library and
// runs the static registrations below; the module itself holds nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(dnateq, m) {
  m.def(
      "exp_quantize(Tensor x, float alpha, float scale, float offset, int bits, "
      "str rounding=\"nearest\", bool check_finite=True) -> Tensor");
  m.def(
      "exp_dequantize(Tensor codes, float alpha, float scale, float offset, "
      "int bits, ScalarType dtype=float) -> Tensor");
  // Beyond SPEC's list: the level table of a format (analysis, hardware
  // LUT contents); docs/ARCHITECTURE.md.
  m.def("exp_level_table(float alpha, float scale, float offset, int bits) -> Tensor");
  m.def("exp_pack(Tensor codes, int bits, bool signed) -> Tensor");
  m.def(
      "exp_unpack(Tensor packed, int bits, bool signed, int[] shape) -> Tensor");
  m.def(
      "exp_linear_count(Tensor a_codes, Tensor w_codes, float alpha, float sa, "
      "float ba, float sw, float bw, int bits, Tensor? bias, int? counter_bits, "
      "Tensor? w_terms=None, Tensor? w_scale=None, Tensor? w_offset=None) -> Tensor");
  m.def(
      "exp_conv2d_count(Tensor a_codes, Tensor w_codes, float alpha, float sa, "
      "float ba, float sw, float bw, int bits, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int? counter_bits, "
      "Tensor? w_terms=None, Tensor? w_scale=None, Tensor? w_offset=None) -> Tensor");
  m.def(
      "exp_linear_lut(Tensor x, Tensor w_packed, int[] w_shape, float alpha, "
      "float sa, float ba, float sw, float bw, int bits, bool a_signed, "
      "bool w_signed, str rounding, Tensor? bias, Tensor? w_scale=None, "
      "Tensor? w_offset=None, Tensor? w_layout=None) -> Tensor");
  m.def(
      "exp_conv2d_lut(Tensor x, Tensor w_packed, int[] w_shape, float alpha, "
      "float sa, float ba, float sw, float bw, int bits, bool a_signed, "
      "bool w_signed, str rounding, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, Tensor? w_scale=None, "
      "Tensor? w_offset=None, Tensor? w_layout=None) -> Tensor");
  // Beyond SPEC's list: the offline weight layout of the LUT fast path
  // (SPEC section 9), uint8 1-D, versioned, built from w_packed.
  m.def("exp_lut_layout(Tensor w_packed, int[] w_shape, int bits, bool signed) -> Tensor");
  // CPU kernel family: "" queries, "auto" / "avx512" / "avx2" / "portable"
  // sets; returns the active one. And the path of the last CPU LUT call.
  m.def("_cpu_isa(str isa=\"\") -> str", [](c10::string_view isa) {
    return dnateq::cpu::cpu_isa(isa);
  });
  m.def("_lut_path() -> str", []() { return dnateq::cpu::lut_path(); });
  m.def("_quantize_path() -> str", []() { return dnateq::quantize_path(); });
  m.def(
      "exp_fit(Tensor x, int bits, str search=\"golden\", "
      "str rounding=\"nearest\", float? alpha=None) "
      "-> (float, float, float, float)");
  m.def(
      "exp_error(Tensor x, float alpha, float scale, float offset, int bits, "
      "str rounding=\"nearest\") -> float");
  // Beyond SPEC's list: many candidates at once, sorted once (analysis,
  // benchmarks). float64 [C], on the CPU.
  m.def(
      "exp_errors(Tensor x, float[] alpha, float[] scale, float[] offset, "
      "int bits, str rounding=\"nearest\") -> Tensor");
  // Beyond SPEC's list: exp_fit for several bit widths, the magnitudes sorted
  // once (calibration: one call per tensor of a layer). float64 [len(bits), 4]
  // rows (alpha, scale, offset, rmae), on the CPU.
  m.def(
      "exp_fits(Tensor x, int[] bits, str search=\"golden\", "
      "str rounding=\"nearest\", float[]? alpha=None) -> Tensor");
}

// Operators with no tensor argument have no device to dispatch on: one kernel
// for every backend.
TORCH_LIBRARY_IMPL(dnateq, CompositeExplicitAutograd, m) {
  m.impl("exp_level_table", &dnateq::exp_level_table);
}
