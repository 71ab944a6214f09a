"""The operators' argument checks for the fake (meta) kernels: a line-by-line
transcription of ``csrc/checks.h`` that needs no data, only shapes, dtypes,
devices and the scalar arguments.

Why a transcription and not one implementation: the real kernels check in C++
(``checks.h``, shared by the CPU and CUDA backends and the C++ API), while
the fake kernels must run on fake tensors with symbolic sizes, which C++
kernels taking ``int64_t`` sizes cannot. So the checks exist twice, with the
same names, the same order and the same messages, and
``tests/test_fake_checks.py`` pins them together: for a catalogue of bad calls
(every check below) the eager C++ error and the fake-mode error must be the
same text, and ``torch.compile`` / ``torch.export`` must fail at trace time
with it. A change to ``checks.h`` that is not mirrored here fails that test.

What stays runtime-only (it needs the values): codes with bits above bit n-1,
non-finite input, a NaN/Inf bias and the values of w_scale/w_offset.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

K_MIN_BITS, K_MAX_BITS = 2, 7

# c10's ScalarType names, as TORCH_CHECK prints them.
_SCALAR_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int8: "Char", torch.uint8: "Byte",
    torch.int16: "Short", torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def st(dtype: torch.dtype) -> str:
    return _SCALAR_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def num(v: float) -> str:
    """A double as std::ostream prints it (6 significant digits)."""
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:g}"


def shape(s) -> str:
    return "[" + ", ".join(str(int(d)) if not isinstance(d, torch.SymInt) else str(d)
                           for d in s) + "]"


def _check(cond, msg) -> None:
    torch._check(cond, lambda: msg() if callable(msg) else msg)


def exp_range(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def check_bits(bits: int, name: str = "bits") -> None:
    _check(K_MIN_BITS <= bits <= K_MAX_BITS,
           lambda: f"dnateq: {name} must be in [{K_MIN_BITS}, {K_MAX_BITS}], got {bits}")


def check_alpha(alpha: float, name: str = "alpha") -> None:
    _check(math.isfinite(alpha) and alpha > 1.0,
           lambda: f"dnateq: {name} must be a finite base > 1, got {num(alpha)}")


def check_scale(scale: float, name: str = "scale") -> None:
    _check(math.isfinite(scale) and scale > 0.0,
           lambda: f"dnateq: {name} must be finite and > 0, got {num(scale)}")


def check_offset(offset: float, name: str = "offset") -> None:
    _check(math.isfinite(offset), lambda: f"dnateq: {name} must be finite, got {num(offset)}")


def parse_rounding(r: str) -> None:
    _check(r in ("log", "nearest"),
           lambda: f'dnateq: rounding must be "log" or "nearest", got "{r}"')


def check_float_input(x: torch.Tensor, name: str) -> None:
    _check(x.dtype in _FLOATS, lambda: f"dnateq: {name} must be float32, float16 or "
                                       f"bfloat16, got {st(x.dtype)}")


def check_codes(c: torch.Tensor, name: str) -> None:
    _check(c.dtype == torch.int8, lambda: f"dnateq: {name} must be int8 codes, got "
                                          f"{st(c.dtype)}")


def check_same_device(a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    _check(a.device == b.device, lambda: f"dnateq: {an} and {bn} must be on the same "
                                         f"device, got {a.device} and {b.device}")


def check_counter_bits(cb: Optional[int]) -> None:
    if cb is not None:
        _check(2 <= cb <= 32, lambda: f"dnateq: counter_bits must be in [2, 32] or None, "
                                      f"got {cb}")


_I64 = (-(1 << 63), (1 << 63) - 1)


def _overflows(v: int) -> bool:
    return not (_I64[0] <= v <= _I64[1])


def check_conv_geometry(inp: Sequence[int], w: Sequence[int], stride, padding, dilation,
                        groups: int, in_name: str, w_name: str) -> Tuple[int, int]:
    _check(len(inp) == 4, lambda: f"dnateq: {in_name} must be 4-D [N, C, H, W], got shape "
                                  f"{shape(inp)}")
    _check(len(w) == 4, lambda: f"dnateq: {w_name} must be 4-D [O, C/groups, kh, kw], got "
                                f"shape {shape(w)}")
    _check(len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
           "dnateq: stride, padding and dilation must have 2 elements")
    _check(stride[0] > 0 and stride[1] > 0,
           lambda: f"dnateq: stride must be positive, got {shape(stride)}")
    _check(dilation[0] > 0 and dilation[1] > 0,
           lambda: f"dnateq: dilation must be positive, got {shape(dilation)}")
    _check(padding[0] >= 0 and padding[1] >= 0,
           lambda: f"dnateq: padding must be non-negative, got {shape(padding)}")
    _check(groups > 0, lambda: f"dnateq: groups must be positive, got {groups}")
    for s in w:
        _check(s >= 0, lambda: f"dnateq: {w_name} must be non-negative, got {shape(w)}")
    _check(inp[1] % groups == 0 and w[0] % groups == 0 and w[1] * groups == inp[1],
           lambda: f"dnateq: {w_name} {shape(w)} does not match {in_name} channels {inp[1]} "
                   f"with groups={groups}")
    out = []
    for d in range(2):
        padded2 = padding[d] * 2
        padded = padded2 + inp[2 + d]
        span = dilation[d] * (w[2 + d] - 1)
        n = padded - span
        overflow = (_overflows(padded2) or _overflows(padded) or _overflows(span)
                    or _overflows(n))
        _check(not overflow, lambda: f"dnateq: conv geometry overflows int64: {in_name} size "
                                     f"{inp[2 + d]}, kernel {w[2 + d]}, padding {padding[d]}, "
                                     f"dilation {dilation[d]}")
        out.append((n - 1) // stride[d] + 1 if n > 0 else 0)
    ho, wo = out
    _check(ho > 0 and wo > 0,
           lambda: f"dnateq: {in_name} spatial size ({inp[2]}, {inp[3]}) is too small for "
                   f"kernel ({w[2]}, {w[3]}) with padding {shape(padding)} and dilation "
                   f"{shape(dilation)}")
    return ho, wo


def _f32_finite(v: float) -> bool:
    """``std::isfinite(static_cast<float>(v))``."""
    import warnings

    import numpy as np
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(np.isfinite(np.float32(v)))


def check_format_params(alpha, scale, offset, bits, scale_name, offset_name) -> None:
    check_bits(bits)
    check_alpha(alpha)
    check_scale(scale, scale_name)
    check_offset(offset, offset_name)
    E = exp_range(bits)
    lo, hi = math.pow(alpha, -E), _pow(alpha, E)
    ok = _f32_finite(scale * lo + offset) and _f32_finite(scale * hi + offset)
    _check(ok, lambda: f"dnateq: alpha={num(alpha)}, {scale_name}={num(scale)}, "
                       f"{offset_name}={num(offset)} give a non-finite level at bits={bits} "
                       f"(S * alpha^E + beta overflows float32)")


def _pow(a: float, e: int) -> float:
    try:
        return math.pow(a, e)
    except OverflowError:
        return math.inf


def make_checked_tables(alpha, scale, offset, bits, rounding, scale_name, offset_name):
    check_format_params(alpha, scale, offset, bits, scale_name, offset_name)


def packed_field_bits(bits: int, signed: bool) -> int:
    return bits + 1 if signed else bits


def packed_row_bytes(K: int, bits: int, signed: bool) -> int:
    return 4 * ((K * packed_field_bits(bits, signed) + 31) // 32)


def packed_dims(s: Sequence[int]) -> Tuple[int, int]:
    if len(s) == 0:
        return 1, 1
    if len(s) == 1:
        return 1, s[0]
    return s[0], math.prod(s[1:])


def check_packed(packed: torch.Tensor, rows, K, bits, is_signed, name) -> None:
    _check(packed.dtype == torch.uint8, lambda: f"dnateq: {name} must be uint8 (from "
                                                f"exp_pack), got {st(packed.dtype)}")
    rb = packed_row_bytes(K, bits, is_signed)
    _check(packed.dim() == 2 and packed.shape[0] == rows and packed.shape[1] == rb,
           lambda: f"dnateq: {name} must have shape [{rows}, {rb}] for {rows} rows of {K} "
                   f"elements at bits={bits}{' signed' if is_signed else ' unsigned'}, got "
                   f"{shape(packed.shape)}")


def check_w_shape(w_shape, dims, what) -> None:
    _check(len(w_shape) == dims, lambda: f"dnateq: w_shape must have {dims} elements {what}, "
                                         f"got {shape(w_shape)}")
    for s in w_shape:
        _check(s >= 0, lambda: f"dnateq: w_shape must be non-negative, got {shape(w_shape)}")


def checked_bias(bias, n_out, ref, ref_name) -> None:
    if bias is None:
        return
    check_same_device(bias, "bias", ref, ref_name)
    _check(bias.dtype in _FLOATS, lambda: f"dnateq: bias must be float32, float16 or "
                                          f"bfloat16, got {st(bias.dtype)}")
    _check(bias.dim() == 1 and bias.shape[0] == n_out,
           lambda: f"dnateq: bias must have shape [{n_out}], got {shape(bias.shape)}")


def check_channel_params(w_scale, w_offset, n_out, alpha, bits, ref, ref_name) -> bool:
    hs, ho = w_scale is not None, w_offset is not None
    if not hs and not ho:
        return False
    _check(hs and ho, lambda: "dnateq: w_scale and w_offset must be given together "
                              "(per-channel weight parameters), got only "
                              f"{'w_scale' if hs else 'w_offset'}")
    for t, name in ((w_scale, "w_scale"), (w_offset, "w_offset")):
        check_same_device(t, name, ref, ref_name)
        _check(t.dtype == torch.float32, lambda: f"dnateq: {name} must be float32, got "
                                                 f"{st(t.dtype)}")
        _check(t.dim() == 1 and t.shape[0] == n_out,
               lambda: f"dnateq: {name} must have shape [{n_out}] (one per output channel), "
                       f"got {shape(t.shape)}")
    return True   # the values are checked by the real kernels


def check_count_args(a, w, alpha, sa, ba, sw, bw, bits, bias, counter_bits, w_terms, n_out,
                     w_scale, w_offset) -> None:
    check_codes(a, "a_codes")
    check_codes(w, "w_codes")
    check_same_device(a, "a_codes", w, "w_codes")
    check_format_params(alpha, sa, ba, bits, "sa", "ba")
    if not check_channel_params(w_scale, w_offset, n_out, alpha, bits, w, "w_codes"):
        check_format_params(alpha, sw, bw, bits, "sw", "bw")
    check_counter_bits(counter_bits)
    E = exp_range(bits)
    _check(math.isfinite(_pow(alpha, 2 * E)),
           lambda: f"dnateq: alpha={num(alpha)} overflows alpha^(2E) at bits={bits}")
    checked_bias(bias, n_out, w, "w_codes")
    if w_terms is not None:
        check_same_device(w_terms, "w_terms", w, "w_codes")
        _check(w_terms.dtype == torch.int32,
               lambda: f"dnateq: w_terms must be int32 (from dnateq.weight_terms), got "
                       f"{st(w_terms.dtype)}")
        _check(w_terms.dim() == 2 and w_terms.shape[0] == n_out
               and w_terms.shape[1] == (1 << bits),
               lambda: f"dnateq: w_terms must have shape [{n_out}, {1 << bits}], got "
                       f"{shape(w_terms.shape)}")


def check_lut_args(x, w_packed, rows, K, alpha, sa, ba, sw, bw, bits, w_signed, rounding,
                   bias, n_out, w_scale, w_offset) -> None:
    check_float_input(x, "x")
    check_same_device(x, "x", w_packed, "w_packed")
    parse_rounding(rounding)
    make_checked_tables(alpha, sa, ba, bits, rounding, "sa", "ba")
    if not check_channel_params(w_scale, w_offset, n_out, alpha, bits, x, "x"):
        make_checked_tables(alpha, sw, bw, bits, rounding, "sw", "bw")
    check_packed(w_packed, rows, K, bits, w_signed, "w_packed")
    checked_bias(bias, n_out, x, "x")


def check_dequantize_args(codes, alpha, scale, offset, bits, dtype) -> None:
    check_codes(codes, "codes")
    _check(dtype in _FLOATS, lambda: f"dnateq: dtype must be float32, float16 or bfloat16, "
                                     f"got {st(dtype)}")
    make_checked_tables(alpha, scale, offset, bits, "nearest", "scale", "offset")


def check_unpack_args(packed, bits, is_signed, s) -> Tuple[int, int]:
    check_bits(bits)
    for d in s:
        _check(d >= 0, lambda: f"dnateq: shape must be non-negative, got {shape(s)}")
    rows, K = packed_dims(s)
    check_packed(packed, rows, K, bits, is_signed, "packed")
    return rows, K


def check_linear_count_shapes(a, w) -> Tuple[int, int]:
    _check(w.dim() == 2, lambda: f"dnateq: w_codes must be 2-D [N, K], got shape "
                                 f"{shape(w.shape)}")
    _check(a.dim() >= 1, "dnateq: a_codes must have at least 1 dimension")
    N, K = w.shape[0], w.shape[1]
    _check(a.shape[-1] == K, lambda: f"dnateq: a_codes last dimension ({a.shape[-1]}) must "
                                     f"equal w_codes.shape[1] ({K})")
    return N, K


def check_linear_lut_shapes(x, w_shape) -> Tuple[int, int]:
    check_w_shape(w_shape, 2, "[N, K] for a linear weight")
    N, K = w_shape[0], w_shape[1]
    _check(x.dim() >= 1 and x.shape[-1] == K,
           lambda: f"dnateq: x last dimension ({x.shape[-1] if x.dim() else 0}) must equal "
                   f"w_shape[1] ({K})")
    return N, K
