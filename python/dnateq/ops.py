"""Python entry points of the dnateq operators (SPEC section 5), one section
per operator family (as csrc/<family>/), each wrapper with its fake kernel
right under it.

Each function calls the registered ``torch.ops.dnateq`` operator, so it runs
on the tensor's device (CPU, or CUDA when built with it) and traces under
``torch.compile``. ``dnateq.reference`` holds the pure-PyTorch oracle with the
same signatures.

Fake (meta) kernels give output shapes and dtypes without computing, so that
``torch.compile`` / ``torch.export`` trace modules that call the operators.
Each first runs the same argument checks as the op's C++ front
(csrc/<family>/front.h), in the same order and with the same messages
(:mod:`dnateq._checks`, the transcription of ``csrc/checks.h``, pinned to it by
tests/test_fake_checks.py), so a bad call fails at trace time with the message
the eager call gives. Checks that need the values (code ranges, non-finite
input or bias, per-channel parameter values) run in the real kernels only.
The calibration ops ``exp_fit`` and ``exp_error`` return Python floats that
depend on the data: they cannot be traced and say so.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from . import _checks as C

_ops = torch.ops.dnateq

# The public operators, re-exported as ``dnateq.<name>`` (dnateq/__init__.py
# imports this list, so a new operator is added here and nowhere else).
__all__ = [
    "exp_quantize", "exp_dequantize", "exp_level_table",      # quantize
    "exp_pack", "exp_unpack",                                  # pack
    "exp_linear_count", "exp_conv2d_count", "weight_terms",    # count
    "exp_linear_lut", "exp_conv2d_lut", "exp_lut_layout",      # lut
    "exp_fit", "exp_error", "exp_errors", "exp_fits",          # fit
]


def _fake(name):
    """Registers the decorated function as the fake kernel of ``dnateq::name``."""
    return torch.library.register_fake("dnateq::" + name)


# ---------------------------------------------------------------------------
# quantize family (csrc/quantize/)
# ---------------------------------------------------------------------------


def exp_quantize(x: torch.Tensor, alpha: float, scale: float, offset: float, bits: int,
                 rounding: str = "nearest", check_finite: bool = True) -> torch.Tensor:
    """Quantize ``x`` (float32/16, bfloat16) to int8 exponential codes.

    Code layout: bit 7 = sign, bits 0..n-1 = biased exponent ``e + 2^(n-1)``
    (0 = exact zero). ``rounding`` is ``"nearest"`` (linear midpoints) or
    ``"log"`` (the paper's log-domain rounding). Non-finite input raises.
    """
    return _ops.exp_quantize(x, alpha, scale, offset, bits, rounding, check_finite)


@_fake("exp_quantize")
def _exp_quantize_fake(x, alpha, scale, offset, bits, rounding="nearest", check_finite=True):
    C.check_float_input(x, "x")
    C.parse_rounding(rounding)
    C.make_checked_tables(alpha, scale, offset, bits, rounding, "scale", "offset")
    return torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format)


def exp_dequantize(codes: torch.Tensor, alpha: float, scale: float, offset: float,
                   bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize int8 codes: ``x_hat = s * (S * alpha^e + beta)``, zero code -> 0."""
    return _ops.exp_dequantize(codes, alpha, scale, offset, bits, dtype)


@_fake("exp_dequantize")
def _exp_dequantize_fake(codes, alpha, scale, offset, bits, dtype=torch.float32):
    C.check_dequantize_args(codes, alpha, scale, offset, bits, dtype)
    return torch.empty_like(codes, dtype=dtype, memory_format=torch.contiguous_format)


def exp_level_table(alpha: float, scale: float, offset: float, bits: int) -> torch.Tensor:
    """The level table of one tensor's format, float32 ``[2^bits]`` on the CPU:
    entry ``b`` is the level of biased exponent ``b``, ``S * alpha^(b - 2^(n-1)) + beta``
    computed in float64 and rounded once to float32 (SPEC section 1), entry 0
    the zero code's 0. It is the table every kernel builds, so
    ``sign * table[code & 0x7F]`` is :func:`exp_dequantize` (the contents of
    an accelerator's level LUT). Parameters are checked as by
    :func:`exp_dequantize`."""
    return _ops.exp_level_table(alpha, scale, offset, bits)


@_fake("exp_level_table")
def _exp_level_table_fake(alpha, scale, offset, bits):
    C.make_checked_tables(alpha, scale, offset, bits, "nearest", "scale", "offset")
    return torch.empty(1 << bits, dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------------------
# pack family (csrc/pack/)
# ---------------------------------------------------------------------------


def exp_pack(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack codes into ``uint8 [d0, 4*ceil(K*b/32)]`` with ``b = n+1`` (signed) or ``n``."""
    return _ops.exp_pack(codes, bits, signed)


@_fake("exp_pack")
def _exp_pack_fake(codes, bits, signed):
    C.check_codes(codes, "codes")
    C.check_bits(bits)
    rows, k = C.packed_dims(codes.shape)
    return codes.new_empty((rows, C.packed_row_bytes(k, bits, signed)), dtype=torch.uint8)


def exp_unpack(packed: torch.Tensor, bits: int, signed: bool,
               shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`exp_pack`: int8 codes of the given ``shape``."""
    return _ops.exp_unpack(packed, bits, signed, list(shape))


@_fake("exp_unpack")
def _exp_unpack_fake(packed, bits, signed, shape):
    C.check_unpack_args(packed, bits, signed, shape)
    return packed.new_empty(shape, dtype=torch.int8)


# ---------------------------------------------------------------------------
# count family (csrc/count/)
# ---------------------------------------------------------------------------


def exp_linear_count(a_codes: torch.Tensor, w_codes: torch.Tensor, alpha: float,
                     sa: float, ba: float, sw: float, bw: float, bits: int,
                     bias: Optional[torch.Tensor] = None,
                     counter_bits: Optional[int] = None,
                     w_terms: Optional[torch.Tensor] = None, *,
                     w_scale: Optional[torch.Tensor] = None,
                     w_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Count-based exponential dot product (Eq. 8): ``a [*, K] x w [N, K] -> float32 [*, N]``.

    ``counter_bits`` emulates saturating counters of that width (each final
    count is clamped). ``w_terms`` (see :func:`weight_terms`) lets unsigned
    activations reuse the precomputed weight terms C2/C4; the result is the
    same as the direct count. ``w_scale``/``w_offset`` (float32 ``[N]``, given
    together) are per-output-channel weight parameters that replace ``sw``/``bw``
    (SPEC section 9; docs/FORMAT.md).
    """
    return _ops.exp_linear_count(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias,
                                 counter_bits, w_terms, *_channel(w_scale, w_offset))


@_fake("exp_linear_count")
def _exp_linear_count_fake(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                           w_terms=None, w_scale=None, w_offset=None):
    n, _ = C.check_linear_count_shapes(a_codes, w_codes)
    C.check_count_args(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                       w_terms, n, w_scale, w_offset)
    return a_codes.new_empty((*a_codes.shape[:-1], n), dtype=torch.float32)


def exp_conv2d_count(a_codes: torch.Tensor, w_codes: torch.Tensor, alpha: float,
                     sa: float, ba: float, sw: float, bw: float, bits: int,
                     bias: Optional[torch.Tensor] = None, stride=(1, 1), padding=(0, 0),
                     dilation=(1, 1), groups: int = 1,
                     counter_bits: Optional[int] = None,
                     w_terms: Optional[torch.Tensor] = None, *,
                     w_scale: Optional[torch.Tensor] = None,
                     w_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Count-based exponential conv2d on codes; padded positions are zero codes.
    ``w_scale``/``w_offset``: per-output-channel weight parameters (float32 ``[O]``)."""
    return _ops.exp_conv2d_count(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias,
                                 _pair(stride), _pair(padding), _pair(dilation), groups,
                                 counter_bits, w_terms, *_channel(w_scale, w_offset))


@_fake("exp_conv2d_count")
def _exp_conv2d_count_fake(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, stride, padding,
                           dilation, groups, counter_bits, w_terms=None, w_scale=None,
                           w_offset=None):
    ho, wo = C.check_conv_geometry(a_codes.shape, w_codes.shape, stride, padding, dilation,
                                   groups, "a_codes", "w_codes")
    o = w_codes.shape[0]
    C.check_count_args(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                       w_terms, o, w_scale, w_offset)
    return a_codes.new_empty((a_codes.shape[0], o, ho, wo), dtype=torch.float32)


# ---------------------------------------------------------------------------
# LUT family (csrc/lut/)
# ---------------------------------------------------------------------------


def exp_linear_lut(x: torch.Tensor, w_packed: torch.Tensor, w_shape: Sequence[int],
                   alpha: float, sa: float, ba: float, sw: float, bw: float, bits: int,
                   a_signed: bool, w_signed: bool, rounding: str = "nearest",
                   bias: Optional[torch.Tensor] = None, *,
                   w_scale: Optional[torch.Tensor] = None,
                   w_offset: Optional[torch.Tensor] = None,
                   w_layout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fast path: quantize ``x`` with (alpha, sa, ba), dequantize it and the packed
    weights through their level tables, and run a native matmul. Output dtype = x.dtype.
    ``w_scale``/``w_offset``: per-output-channel weight parameters (float32 ``[N]``).

    ``w_layout`` (from :func:`exp_lut_layout`, optional) lets the CPU run its
    register-table GEMV kernels for up to 8 rows of ``x``; it must belong to
    ``w_packed`` (checked), and the result is the same with or without it.

    ``a_signed`` is deprecated: accepted and ignored, since each code of the
    quantized input carries its own sign (docs/FORMAT.md, "Deprecated operator
    arguments"). It keeps its position; pass ``True``."""
    return _ops.exp_linear_lut(x, w_packed, list(w_shape), alpha, sa, ba, sw, bw, bits,
                               a_signed, w_signed, rounding, bias,
                               **_lut_extra(w_scale, w_offset, w_layout))


@_fake("exp_linear_lut")
def _exp_linear_lut_fake(x, w_packed, w_shape, alpha, sa, ba, sw, bw, bits, a_signed, w_signed,
                         rounding, bias, w_scale=None, w_offset=None, w_layout=None):
    n, k = C.check_linear_lut_shapes(x, w_shape)
    C.check_lut_args(x, w_packed, n, k, alpha, sa, ba, sw, bw, bits, w_signed, rounding, bias,
                     n, w_scale, w_offset)
    return x.new_empty((*x.shape[:-1], n))


def exp_conv2d_lut(x: torch.Tensor, w_packed: torch.Tensor, w_shape: Sequence[int],
                   alpha: float, sa: float, ba: float, sw: float, bw: float, bits: int,
                   a_signed: bool, w_signed: bool, rounding: str = "nearest",
                   bias: Optional[torch.Tensor] = None, stride=(1, 1), padding=(0, 0),
                   dilation=(1, 1), groups: int = 1, *,
                   w_scale: Optional[torch.Tensor] = None,
                   w_offset: Optional[torch.Tensor] = None,
                   w_layout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fast path for conv2d on packed weights (see :func:`exp_linear_lut`;
    ``a_signed`` is deprecated there too: accepted and ignored)."""
    return _ops.exp_conv2d_lut(x, w_packed, list(w_shape), alpha, sa, ba, sw, bw, bits,
                               a_signed, w_signed, rounding, bias, _pair(stride),
                               _pair(padding), _pair(dilation), groups,
                               **_lut_extra(w_scale, w_offset, w_layout))


@_fake("exp_conv2d_lut")
def _exp_conv2d_lut_fake(x, w_packed, w_shape, alpha, sa, ba, sw, bw, bits, a_signed, w_signed,
                         rounding, bias, stride, padding, dilation, groups, w_scale=None,
                         w_offset=None, w_layout=None):
    C.check_w_shape(w_shape, 4, "[O, C/groups, kh, kw] for a conv weight")
    ho, wo = C.check_conv_geometry(x.shape, w_shape, stride, padding, dilation, groups, "x",
                                   "w_shape")
    o, k = w_shape[0], w_shape[1] * w_shape[2] * w_shape[3]
    C.check_lut_args(x, w_packed, o, k, alpha, sa, ba, sw, bw, bits, w_signed, rounding, bias,
                     o, w_scale, w_offset)
    return x.new_empty((x.shape[0], o, ho, wo))


def exp_lut_layout(w_packed: torch.Tensor, w_shape: Sequence[int], bits: int,
                   signed: bool) -> torch.Tensor:
    """The offline weight layout of the LUT fast path (SPEC section 9), built from
    ``exp_pack``'s rows: a versioned ``uint8`` 1-D tensor for the ``w_layout``
    argument of :func:`exp_linear_lut` / :func:`exp_conv2d_lut`. ``w_packed``
    stays the interchange format; rebuild the layout from it, never the reverse.
    CPU only."""
    if isinstance(w_packed, torch.Tensor) and w_packed.device.type != "cpu":
        raise RuntimeError(f"dnateq: exp_lut_layout is the CPU fast path's layout; build it "
                           f"from w_packed on the CPU (got a tensor on {w_packed.device})")
    return _ops.exp_lut_layout(w_packed, list(w_shape), bits, signed)


@_fake("exp_lut_layout")
def _exp_lut_layout_fake(w_packed, w_shape, bits, signed):
    C.check_bits(bits)
    rows, K = C.packed_dims(w_shape)
    C.check_packed(w_packed, rows, K, bits, signed, "w_packed")
    b = bits + 1 if signed else bits
    if bits <= 5:
        row_bytes = -(-K // 32) * (16 + 4 * max(b - 4, 0))
    else:
        row_bytes = -(-K // 64) * 64
    return w_packed.new_empty((64 + rows * row_bytes,), dtype=torch.uint8)


LAYOUT_VERSION = 1


def cpu_isa(isa: Optional[str] = None) -> str:
    """The CPU kernel family the operators use: ``"avx512"``, ``"avx2"`` or
    ``"portable"``. ``isa`` forces one (an error if the CPU lacks it; ``"auto"``
    returns to the best). The environment variable ``DNATEQ_CPU_ISA`` sets the
    starting choice."""
    return _ops._cpu_isa(isa or "")


def last_lut_path() -> str:
    """Which kernels the last CPU ``exp_linear_lut`` / ``exp_conv2d_lut`` call ran:
    ``"avx512"`` (layout GEMV), ``"avx2"`` / ``"portable"`` (packed-row GEMV) or
    ``"gemm"`` (decode then native matmul/conv)."""
    return _ops._lut_path()


def last_quantize_path() -> str:
    """Which encoder the last CPU quantization (``exp_quantize``, or a LUT
    operator's activations) ran on its first block: ``"avx512_word_cell5"`` /
    ``"avx512_word_cell4"`` (16-bit key search, its first 5 / 4 steps one table
    lookup), ``"avx512_word"``, ``"avx512_float"``, ``"avx2_compare"``,
    ``"bucket"`` or ``"counting"``."""
    return _ops._quantize_path()



# ---------------------------------------------------------------------------
# fit family (csrc/fit/)
# ---------------------------------------------------------------------------


def exp_fit(x: torch.Tensor, bits: int, search: str = "golden", rounding: str = "nearest",
            alpha: Optional[float] = None) -> Tuple[float, float, float, float]:
    """Fit ``(alpha, scale, offset, rmae)`` to one tensor (SPEC section 2).

    ``search`` is ``"golden"`` (default; never worse than ``"paper"``) or
    ``"paper"`` (Algorithm 1). With ``alpha`` given only S and beta are fitted.
    """
    return tuple(_ops.exp_fit(x, bits, search, rounding, alpha))


def exp_error(x: torch.Tensor, alpha: float, scale: float, offset: float, bits: int,
              rounding: str = "nearest") -> float:
    """Exact RMAE ``sum|x - x_hat| / sum|x|`` of quantizing ``x`` (0 for all-zero x)."""
    return _ops.exp_error(x, alpha, scale, offset, bits, rounding)



def _data_dependent(name):
    def fake(*args, **kwargs):
        raise RuntimeError(
            f"dnateq: {name} returns data-dependent Python floats and cannot be traced "
            f"by torch.compile/export; call it eagerly (calibration is offline)")
    return fake


_fake("exp_fit")(_data_dependent("exp_fit"))
_fake("exp_error")(_data_dependent("exp_error"))


def exp_errors(x: torch.Tensor, alpha: Sequence[float], scale: Sequence[float],
               offset: Sequence[float], bits: int, rounding: str = "nearest") -> torch.Tensor:
    """Exact RMAE of many candidate parameter sets on one tensor (float64 ``[C]``).

    Sorts the magnitudes once, then each candidate costs ``O(2^n log N)``: the
    error landscape of a tensor (e.g. RMAE against alpha) in one call.
    """
    return _ops.exp_errors(x, [float(a) for a in alpha], [float(s) for s in scale],
                           [float(o) for o in offset], bits, rounding)


@_fake("exp_errors")
def _exp_errors_fake(x, alpha, scale, offset, bits, rounding="nearest"):
    C._check(len(alpha) == len(scale) == len(offset),
             lambda: f"dnateq: alpha, scale and offset must have the same length, got "
                     f"{len(alpha)}, {len(scale)}, {len(offset)}")
    C.parse_rounding(rounding)
    for a, s, o in zip(alpha, scale, offset):
        C.make_checked_tables(a, s, o, bits, rounding, "scale", "offset")
    C.check_float_input(x, "x")
    return x.new_empty((len(alpha),), dtype=torch.float64, device="cpu")


def exp_fits(x: torch.Tensor, bits: Sequence[int], search: str = "golden",
             rounding: str = "nearest", alpha: Optional[Sequence[float]] = None) -> torch.Tensor:
    """:func:`exp_fit` for several bit widths at once: the magnitudes are sorted
    once. Returns float64 ``[len(bits), 4]``, row ``i`` = ``(alpha, scale,
    offset, rmae)`` of ``exp_fit(x, bits[i], search, rounding, alpha[i])``,
    bit-identical to it. ``alpha`` (one value per bit width) fits only S and
    beta. Runs on the CPU (a CUDA ``x`` is copied, as ``exp_fit`` does).
    """
    return _ops.exp_fits(x.cpu() if x.is_cuda else x, [int(b) for b in bits], search, rounding,
                         None if alpha is None else [float(a) for a in alpha])


@_fake("exp_fits")
def _exp_fits_fake(x, bits, search="golden", rounding="nearest", alpha=None):
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


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def weight_terms(w_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Precomputed weight terms for the count ops (SPEC section 4).

    Returns ``int32 [rows, 2^bits]``: entry ``[r, b]`` is the sum over the row's
    inputs of ``sign(w)`` where the weight's biased exponent is ``b`` (b >= 1;
    column 0 is 0). Rows are ``w_codes.reshape(w_codes.shape[0], -1)`` (a 0-d
    tensor is one row of one element; zero rows or zero inputs are fine).
    These are C2 (and, summed, C4) for an all-nonzero unsigned activation; the
    count ops subtract the contributions of zero activations at run time.
    """
    if w_codes.dtype != torch.int8:
        raise TypeError(f"dnateq: w_codes must be int8 codes, got {w_codes.dtype}")
    if not 2 <= int(bits) <= 7:
        raise ValueError(f"dnateq: bits must be in [2, 7], got {bits}")
    if w_codes.dim() == 0:   # one row of one element, as in the packed layout
        rows, k = 1, 1
    else:
        rows, k = w_codes.shape[0], math.prod(w_codes.shape[1:])
    w = w_codes.reshape(rows, k)
    u = w.to(torch.int16) & 0xFF
    mag = (u & 0x7F).to(torch.int64)
    if bool((mag >= (1 << bits)).any()):
        raise ValueError(f"dnateq: w_codes has bits above bit {bits - 1} set for bits={bits}")
    sign = torch.where((u & 0x80) != 0, -1, 1).to(torch.int32)
    sign = torch.where(mag == 0, 0, sign)
    out = torch.zeros(w.shape[0], 1 << bits, dtype=torch.int32, device=w.device)
    out.scatter_add_(1, mag, sign)
    out[:, 0] = 0
    return out


def _channel(w_scale, w_offset) -> tuple:
    """The appended per-channel arguments, left out when both are None (the
    schema defaults): the per-tensor call is the one of before, which an
    extension built before them still accepts."""
    if w_scale is None and w_offset is None:
        return ()
    return (w_scale, w_offset)


def _lut_extra(w_scale, w_offset, w_layout) -> dict:
    """The appended arguments of the LUT ops that are given (as keywords), so a
    call with none of them is the one of before."""
    extra = dict(zip(("w_scale", "w_offset"), _channel(w_scale, w_offset)))
    if w_layout is not None:
        extra["w_layout"] = w_layout
    return extra


def _pair(v) -> list:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) == 1:
        return [v[0], v[0]]
    return v


# ---------------------------------------------------------------------------
# Autograd (issue 14 item 4)
# ---------------------------------------------------------------------------
#
# The LUT and count ops are differentiable for fine-tuning with the quantized
# layers in place:
#
# - bias: the exact gradient (the output is bias + something independent of it).
# - x (LUT ops): a straight-through estimator. The activation quantizer is
#   treated as the identity, so dL/dx = dL/dy @ W_hat for a linear and the
#   transposed convolution with W_hat for a conv, where W_hat is the dequantized
#   weight the op computes with (the one ``dequantized_weight()`` returns). The
#   true derivative of a step function is zero almost everywhere, so this is an
#   estimator by design: torch.autograd.gradcheck applies to the bias, and the
#   x gradient equals that of F.linear / F.conv2d on W_hat.
# - codes (count ops): integers, no gradient. The modules apply the same
#   straight-through estimator around their quantize-then-count path.
# - weights: w_packed/w_codes are integer codes and the parameters are Python
#   floats, so the weights are frozen; asking for a gradient of a per-channel
#   parameter tensor (w_scale / w_offset) raises.
#
# Registered with torch.library.register_autograd, so it also holds under
# torch.compile and torch.export (the backward calls registered ops and
# native ones only).

def dequantized_weight(w_packed: torch.Tensor, w_shape: Sequence[int], alpha: float,
                       sw: float, bw: float, bits: int, w_signed: bool,
                       w_scale: Optional[torch.Tensor] = None,
                       w_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float32 weight ``W_hat`` a LUT op computes with (per-tensor ``sw``/``bw``,
    or per-output-channel ``w_scale``/``w_offset`` when given)."""
    codes = exp_unpack(w_packed, bits, w_signed, w_shape)
    if w_scale is None and w_offset is None:
        return exp_dequantize(codes, alpha, sw, bw, bits)
    from .reference import dequantize_channels   # the levels every op computes with
    return dequantize_channels(codes, alpha, w_scale.detach(), w_offset.detach(), bits)


def _no_param_grads(name: str, inputs, first: int) -> None:
    for t in inputs[first:]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(f"dnateq: {name} has no gradient for its weight parameters "
                               "(w_scale / w_offset / layouts are frozen); detach them")


def _bias_grad(grad: torch.Tensor, bias: Optional[torch.Tensor], dims) -> Optional[torch.Tensor]:
    if bias is None or not bias.requires_grad:
        return None
    return grad.float().sum(dim=dims).to(bias.dtype)


def _setup_lut(ctx, inputs, output, conv: bool) -> None:
    x, w_packed, w_shape, alpha, sa, ba, sw, bw, bits, a_signed, w_signed = inputs[:11]
    bias = inputs[12]
    name = "exp_conv2d_lut" if conv else "exp_linear_lut"
    _no_param_grads(name, inputs, 17 if conv else 13)
    extra = inputs[17:19] if conv else inputs[13:15]
    w_scale = extra[0] if len(extra) > 0 else None
    w_offset = extra[1] if len(extra) > 1 else None
    ctx.n_inputs = len(inputs)
    ctx.need_x = x.requires_grad
    ctx.x_shape, ctx.x_dtype = tuple(x.shape), x.dtype
    ctx.bias = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.wargs = (w_shape, alpha, sw, bw, bits, w_signed)
    ctx.geometry = tuple(inputs[13:17]) if conv else None
    ctx.save_for_backward(w_packed if ctx.need_x else None,
                          w_scale if ctx.need_x else None, w_offset if ctx.need_x else None)


def _lut_backward(ctx, grad):
    grads = [None] * ctx.n_inputs
    w_packed, w_scale, w_offset = ctx.saved_tensors
    conv = ctx.geometry is not None
    if ctx.need_x:
        w_shape, alpha, sw, bw, bits, w_signed = ctx.wargs
        w_hat = dequantized_weight(w_packed, w_shape, alpha, sw, bw, bits, w_signed,
                                   w_scale, w_offset)
        g = grad.float()
        if conv:
            stride, padding, dilation, groups = ctx.geometry
            gx = torch.nn.grad.conv2d_input(list(ctx.x_shape), w_hat, g, list(stride),
                                            list(padding), list(dilation), groups)
        else:
            gx = (g.reshape(-1, g.shape[-1]) @ w_hat).reshape(ctx.x_shape)
        grads[0] = gx.to(ctx.x_dtype)
    if ctx.bias:
        dims = (0, 2, 3) if conv else tuple(range(grad.dim() - 1))
        grads[12] = grad.float().sum(dim=dims).to(ctx.bias_dtype)
    return tuple(grads)


def _setup_count(ctx, inputs, output, conv: bool) -> None:
    bias = inputs[8]
    name = "exp_conv2d_count" if conv else "exp_linear_count"
    _no_param_grads(name, inputs, 15 if conv else 11)
    ctx.n_inputs = len(inputs)
    ctx.conv = conv
    ctx.bias = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _count_backward(ctx, grad):
    grads = [None] * ctx.n_inputs
    if ctx.bias:
        dims = (0, 2, 3) if ctx.conv else tuple(range(grad.dim() - 1))
        grads[8] = grad.float().sum(dim=dims).to(ctx.bias_dtype)
    return tuple(grads)


torch.library.register_autograd(
    "dnateq::exp_linear_lut", _lut_backward,
    setup_context=lambda ctx, inputs, output: _setup_lut(ctx, inputs, output, False))
torch.library.register_autograd(
    "dnateq::exp_conv2d_lut", _lut_backward,
    setup_context=lambda ctx, inputs, output: _setup_lut(ctx, inputs, output, True))
torch.library.register_autograd(
    "dnateq::exp_linear_count", _count_backward,
    setup_context=lambda ctx, inputs, output: _setup_count(ctx, inputs, output, False))
torch.library.register_autograd(
    "dnateq::exp_conv2d_count", _count_backward,
    setup_context=lambda ctx, inputs, output: _setup_count(ctx, inputs, output, True))


class _StraightThrough(torch.autograd.Function):
    """``y`` forward; backward passes ``dL/dy`` on to ``y`` (bias gradients) and the
    straight-through ``dL/dx`` through ``W_hat`` to ``x``: the modules' count and
    fake paths, whose input goes through the (non-differentiable) quantizer."""

    @staticmethod
    def forward(ctx, y, x, w_hat, geometry):
        ctx.save_for_backward(w_hat)
        ctx.geometry, ctx.x_shape, ctx.x_dtype = geometry, tuple(x.shape), x.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (w_hat,) = ctx.saved_tensors
        g = grad.float()
        if ctx.geometry is None:
            gx = (g.reshape(-1, g.shape[-1]) @ w_hat).reshape(ctx.x_shape)
        else:
            stride, padding, dilation, groups = ctx.geometry
            gx = torch.nn.grad.conv2d_input(list(ctx.x_shape), w_hat, g, list(stride),
                                            list(padding), list(dilation), groups)
        return grad, gx.to(ctx.x_dtype), None, None


def straight_through(y: torch.Tensor, x: torch.Tensor, w_hat, geometry=None) -> torch.Tensor:
    """Attach the straight-through gradient of ``x`` (through ``w_hat()``, called only
    when a gradient is recorded) to ``y``; identity when no gradient is needed."""
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
        return y
    return _StraightThrough.apply(y, x, w_hat(), geometry)
