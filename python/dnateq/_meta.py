"""Fake (meta) kernels: output shapes and dtypes without computing, so that
``torch.compile`` / ``torch.export`` trace modules that call the operators.

Each fake kernel first runs the same argument checks as the real kernel, in
the same order and with the same messages (:mod:`dnateq._checks`, the
transcription of ``csrc/checks.h``), so a bad call fails at trace time with
the message the eager call gives (issue 14 item 5). Checks that need the
values (code ranges, non-finite input or bias, per-channel parameter values)
run in the real kernels only.

The calibration ops ``exp_fit`` and ``exp_error`` return Python floats that
depend on the data: they cannot be traced and say so.
"""
from __future__ import annotations

import torch

from . import _checks as C

_lib = "dnateq::"


def _register(name):
    return torch.library.register_fake(_lib + name)


@_register("exp_quantize")
def _quantize(x, alpha, scale, offset, bits, rounding="nearest", check_finite=True):
    C.check_float_input(x, "x")
    C.parse_rounding(rounding)
    C.make_checked_tables(alpha, scale, offset, bits, rounding, "scale", "offset")
    return torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format)


@_register("exp_dequantize")
def _dequantize(codes, alpha, scale, offset, bits, dtype=torch.float32):
    C.check_dequantize_args(codes, alpha, scale, offset, bits, dtype)
    return torch.empty_like(codes, dtype=dtype, memory_format=torch.contiguous_format)


@_register("exp_pack")
def _pack(codes, bits, signed):
    C.check_codes(codes, "codes")
    C.check_bits(bits)
    rows, k = C.packed_dims(codes.shape)
    return codes.new_empty((rows, C.packed_row_bytes(k, bits, signed)), dtype=torch.uint8)


@_register("exp_unpack")
def _unpack(packed, bits, signed, shape):
    C.check_unpack_args(packed, bits, signed, shape)
    return packed.new_empty(shape, dtype=torch.int8)


@_register("exp_linear_count")
def _linear_count(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                  w_terms=None, w_scale=None, w_offset=None):
    n, _ = C.check_linear_count_shapes(a_codes, w_codes)
    C.check_count_args(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                       w_terms, n, w_scale, w_offset)
    return a_codes.new_empty((*a_codes.shape[:-1], n), dtype=torch.float32)


@_register("exp_conv2d_count")
def _conv2d_count(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, stride, padding,
                  dilation, groups, counter_bits, w_terms=None, w_scale=None, w_offset=None):
    ho, wo = C.check_conv_geometry(a_codes.shape, w_codes.shape, stride, padding, dilation,
                                   groups, "a_codes", "w_codes")
    o = w_codes.shape[0]
    C.check_count_args(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                       w_terms, o, w_scale, w_offset)
    return a_codes.new_empty((a_codes.shape[0], o, ho, wo), dtype=torch.float32)


@_register("exp_linear_lut")
def _linear_lut(x, w_packed, w_shape, alpha, sa, ba, sw, bw, bits, a_signed, w_signed,
                rounding, bias, w_scale=None, w_offset=None, w_layout=None):
    n, k = C.check_linear_lut_shapes(x, w_shape)
    C.check_lut_args(x, w_packed, n, k, alpha, sa, ba, sw, bw, bits, w_signed, rounding, bias,
                     n, w_scale, w_offset)
    return x.new_empty((*x.shape[:-1], n))


@_register("exp_conv2d_lut")
def _conv2d_lut(x, w_packed, w_shape, alpha, sa, ba, sw, bw, bits, a_signed, w_signed,
                rounding, bias, stride, padding, dilation, groups, w_scale=None, w_offset=None,
                w_layout=None):
    C.check_w_shape(w_shape, 4, "[O, C/groups, kh, kw] for a conv weight")
    ho, wo = C.check_conv_geometry(x.shape, w_shape, stride, padding, dilation, groups, "x",
                                   "w_shape")
    o, k = w_shape[0], w_shape[1] * w_shape[2] * w_shape[3]
    C.check_lut_args(x, w_packed, o, k, alpha, sa, ba, sw, bw, bits, w_signed, rounding, bias,
                     o, w_scale, w_offset)
    return x.new_empty((x.shape[0], o, ho, wo))


@_register("exp_lut_layout")
def _lut_layout(w_packed, w_shape, bits, signed):
    C.check_bits(bits)
    rows, K = C.packed_dims(w_shape)
    C.check_packed(w_packed, rows, K, bits, signed, "w_packed")
    b = bits + 1 if signed else bits
    if bits <= 5:
        row_bytes = -(-K // 32) * (16 + 4 * max(b - 4, 0))
    else:
        row_bytes = -(-K // 64) * 64
    return w_packed.new_empty((64 + rows * row_bytes,), dtype=torch.uint8)


@_register("exp_errors")
def _errors(x, alpha, scale, offset, bits, rounding="nearest"):
    C._check(len(alpha) == len(scale) == len(offset),
             lambda: f"dnateq: alpha, scale and offset must have the same length, got "
                     f"{len(alpha)}, {len(scale)}, {len(offset)}")
    C.parse_rounding(rounding)
    for a, s, o in zip(alpha, scale, offset):
        C.make_checked_tables(a, s, o, bits, rounding, "scale", "offset")
    C.check_float_input(x, "x")
    return x.new_empty((len(alpha),), dtype=torch.float64, device="cpu")


@_register("exp_fits")
def _fits(x, bits, search="golden", rounding="nearest", alpha=None):
    C._check(len(bits) > 0, "dnateq: bits must list at least one bit width")
    for b in bits:
        C.check_bits(b)
    C.parse_rounding(rounding)
    C._check(search in ("golden", "paper"),
             lambda: f'dnateq: search must be "golden" or "paper", got "{search}"')
    if alpha is not None:
        C._check(len(alpha) == len(bits),
                 lambda: f"dnateq: alpha must have one value per bit width, got {len(alpha)} "
                         f"values for {len(bits)} bit widths")
        for a in alpha:
            C.check_alpha(a)
    C.check_float_input(x, "x")
    return x.new_empty((len(bits), 4), dtype=torch.float64, device="cpu")


def _data_dependent(name):
    def fake(*args, **kwargs):
        raise RuntimeError(
            f"dnateq: {name} returns data-dependent Python floats and cannot be traced "
            f"by torch.compile/export; call it eagerly (calibration is offline)")
    return fake


_register("exp_fit")(_data_dependent("exp_fit"))
_register("exp_error")(_data_dependent("exp_error"))
