"""Python entry points of the dnateq operators (SPEC section 5).

Each function calls the registered ``torch.ops.dnateq`` operator, so it runs
on the tensor's device (CPU, or CUDA when built with it) and traces under
``torch.compile``. ``dnateq.reference`` holds the pure-PyTorch oracle with the
same signatures.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

_ops = torch.ops.dnateq


def exp_quantize(x: torch.Tensor, alpha: float, scale: float, offset: float, bits: int,
                 rounding: str = "nearest", check_finite: bool = True) -> torch.Tensor:
    """Quantize ``x`` (float32/16, bfloat16) to int8 exponential codes.

    Code layout: bit 7 = sign, bits 0..n-1 = biased exponent ``e + 2^(n-1)``
    (0 = exact zero). ``rounding`` is ``"nearest"`` (linear midpoints) or
    ``"log"`` (the paper's log-domain rounding). Non-finite input raises.
    """
    return _ops.exp_quantize(x, alpha, scale, offset, bits, rounding, check_finite)


def exp_dequantize(codes: torch.Tensor, alpha: float, scale: float, offset: float,
                   bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize int8 codes: ``x_hat = s * (S * alpha^e + beta)``, zero code -> 0."""
    return _ops.exp_dequantize(codes, alpha, scale, offset, bits, dtype)


def exp_pack(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack codes into ``uint8 [d0, 4*ceil(K*b/32)]`` with ``b = n+1`` (signed) or ``n``."""
    return _ops.exp_pack(codes, bits, signed)


def exp_unpack(packed: torch.Tensor, bits: int, signed: bool,
               shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`exp_pack`: int8 codes of the given ``shape``."""
    return _ops.exp_unpack(packed, bits, signed, list(shape))


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


def exp_linear_lut(x: torch.Tensor, w_packed: torch.Tensor, w_shape: Sequence[int],
                   alpha: float, sa: float, ba: float, sw: float, bw: float, bits: int,
                   a_signed: bool, w_signed: bool, rounding: str = "nearest",
                   bias: Optional[torch.Tensor] = None, *,
                   w_scale: Optional[torch.Tensor] = None,
                   w_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fast path: quantize ``x`` with (alpha, sa, ba), dequantize it and the packed
    weights through their level tables, and run a native matmul. Output dtype = x.dtype.
    ``w_scale``/``w_offset``: per-output-channel weight parameters (float32 ``[N]``)."""
    return _ops.exp_linear_lut(x, w_packed, list(w_shape), alpha, sa, ba, sw, bw, bits,
                               a_signed, w_signed, rounding, bias, *_channel(w_scale, w_offset))


def exp_conv2d_lut(x: torch.Tensor, w_packed: torch.Tensor, w_shape: Sequence[int],
                   alpha: float, sa: float, ba: float, sw: float, bw: float, bits: int,
                   a_signed: bool, w_signed: bool, rounding: str = "nearest",
                   bias: Optional[torch.Tensor] = None, stride=(1, 1), padding=(0, 0),
                   dilation=(1, 1), groups: int = 1, *,
                   w_scale: Optional[torch.Tensor] = None,
                   w_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fast path for conv2d on packed weights (see :func:`exp_linear_lut`)."""
    return _ops.exp_conv2d_lut(x, w_packed, list(w_shape), alpha, sa, ba, sw, bw, bits,
                               a_signed, w_signed, rounding, bias, _pair(stride),
                               _pair(padding), _pair(dilation), groups,
                               *_channel(w_scale, w_offset))


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


def exp_errors(x: torch.Tensor, alpha: Sequence[float], scale: Sequence[float],
               offset: Sequence[float], bits: int, rounding: str = "nearest") -> torch.Tensor:
    """Exact RMAE of many candidate parameter sets on one tensor (float64 ``[C]``).

    Sorts the magnitudes once, then each candidate costs ``O(2^n log N)``: the
    error landscape of a tensor (e.g. RMAE against alpha) in one call.
    """
    return _ops.exp_errors(x, [float(a) for a in alpha], [float(s) for s in scale],
                           [float(o) for o in offset], bits, rounding)


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


def weight_terms(w_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Precomputed weight terms for the count ops (SPEC section 4).

    Returns ``int32 [rows, 2^bits]``: entry ``[r, b]`` is the sum over the row's
    inputs of ``sign(w)`` where the weight's biased exponent is ``b`` (b >= 1;
    column 0 is 0). Rows are ``w_codes.reshape(w_codes.shape[0], -1)``.
    These are C2 (and, summed, C4) for an all-nonzero unsigned activation; the
    count ops subtract the contributions of zero activations at run time.
    """
    if w_codes.dtype != torch.int8:
        raise TypeError(f"dnateq: w_codes must be int8 codes, got {w_codes.dtype}")
    if not 2 <= int(bits) <= 7:
        raise ValueError(f"dnateq: bits must be in [2, 7], got {bits}")
    w = w_codes.reshape(w_codes.shape[0], -1)
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


def _pair(v) -> list:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) == 1:
        return [v[0], v[0]]
    return v
