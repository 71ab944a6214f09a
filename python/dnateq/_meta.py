"""Fake (meta) kernels: output shapes and dtypes without computing, so that
``torch.compile`` / ``torch.export`` trace modules that call the operators.

The calibration ops ``exp_fit`` and ``exp_error`` return Python floats that
depend on the data: they cannot be traced and say so.
"""
from __future__ import annotations

import math

import torch

_lib = "dnateq::"


def _register(name):
    return torch.library.register_fake(_lib + name)


def _check_bits(bits):
    torch._check(2 <= bits <= 7, lambda: f"dnateq: bits must be in [2, 7], got {bits}")


def _check_channel_params(w_scale, w_offset, n_out, ref, ref_name):
    """Per-channel weight parameters (SPEC section 9): both or neither,
    float32 [n_out] on ref's device (values are checked by the real kernels)."""
    if w_scale is None and w_offset is None:
        return
    torch._check(w_scale is not None and w_offset is not None,
                 lambda: "dnateq: w_scale and w_offset must be given together (per-channel "
                         "weight parameters)")
    for t, name in ((w_scale, "w_scale"), (w_offset, "w_offset")):
        torch._check(t.device == ref.device,
                     lambda: f"dnateq: {name} and {ref_name} must be on the same device, got "
                             f"{t.device} and {ref.device}")
        torch._check(t.dtype == torch.float32,
                     lambda: f"dnateq: {name} must be float32, got {t.dtype}")
        torch._check(t.dim() == 1 and t.shape[0] == n_out,
                     lambda: f"dnateq: {name} must have shape [{n_out}] (one per output "
                             f"channel), got {list(t.shape)}")


def _rows_k(shape):
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


@_register("exp_quantize")
def _quantize(x, alpha, scale, offset, bits, rounding="nearest", check_finite=True):
    _check_bits(bits)
    return torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format)


@_register("exp_dequantize")
def _dequantize(codes, alpha, scale, offset, bits, dtype=torch.float32):
    _check_bits(bits)
    return torch.empty_like(codes, dtype=dtype, memory_format=torch.contiguous_format)


@_register("exp_pack")
def _pack(codes, bits, signed):
    _check_bits(bits)
    rows, k = _rows_k(codes.shape)
    b = bits + 1 if signed else bits
    return codes.new_empty((rows, 4 * ((k * b + 31) // 32)), dtype=torch.uint8)


@_register("exp_unpack")
def _unpack(packed, bits, signed, shape):
    _check_bits(bits)
    return packed.new_empty(shape, dtype=torch.int8)


@_register("exp_linear_count")
def _linear_count(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                  w_terms=None, w_scale=None, w_offset=None):
    _check_bits(bits)
    _check_channel_params(w_scale, w_offset, w_codes.shape[0], w_codes, "w_codes")
    torch._check(a_codes.shape[-1] == w_codes.shape[1],
                 lambda: "dnateq: a_codes last dimension must equal w_codes.shape[1]")
    return a_codes.new_empty((*a_codes.shape[:-1], w_codes.shape[0]), dtype=torch.float32)


def _conv_out(h, w, kh, kw, stride, padding, dilation):
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


@_register("exp_conv2d_count")
def _conv2d_count(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, stride, padding,
                  dilation, groups, counter_bits, w_terms=None, w_scale=None, w_offset=None):
    _check_bits(bits)
    _check_channel_params(w_scale, w_offset, w_codes.shape[0], w_codes, "w_codes")
    n, _, h, w = a_codes.shape
    o, _, kh, kw = w_codes.shape
    ho, wo = _conv_out(h, w, kh, kw, stride, padding, dilation)
    return a_codes.new_empty((n, o, ho, wo), dtype=torch.float32)


@_register("exp_linear_lut")
def _linear_lut(x, w_packed, w_shape, alpha, sa, ba, sw, bw, bits, a_signed, w_signed,
                rounding, bias, w_scale=None, w_offset=None):
    _check_bits(bits)
    _check_channel_params(w_scale, w_offset, w_shape[0], x, "x")
    return x.new_empty((*x.shape[:-1], w_shape[0]))


@_register("exp_conv2d_lut")
def _conv2d_lut(x, w_packed, w_shape, alpha, sa, ba, sw, bw, bits, a_signed, w_signed,
                rounding, bias, stride, padding, dilation, groups, w_scale=None, w_offset=None):
    _check_bits(bits)
    _check_channel_params(w_scale, w_offset, w_shape[0], x, "x")
    n, _, h, w = x.shape
    o, _, kh, kw = w_shape
    ho, wo = _conv_out(h, w, kh, kw, stride, padding, dilation)
    return x.new_empty((n, o, ho, wo))


@_register("exp_errors")
def _errors(x, alpha, scale, offset, bits, rounding="nearest"):
    _check_bits(bits)
    return x.new_empty((len(alpha),), dtype=torch.float64, device="cpu")


@_register("exp_fits")
def _fits(x, bits, search="golden", rounding="nearest", alpha=None):
    for b in bits:
        _check_bits(b)
    return x.new_empty((len(bits), 4), dtype=torch.float64, device="cpu")


def _data_dependent(name):
    def fake(*args, **kwargs):
        raise RuntimeError(
            f"dnateq: {name} returns data-dependent Python floats and cannot be traced "
            f"by torch.compile/export; call it eagerly (calibration is offline)")
    return fake


_register("exp_fit")(_data_dependent("exp_fit"))
_register("exp_error")(_data_dependent("exp_error"))
