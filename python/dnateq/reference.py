"""Pure-PyTorch reference ("oracle") of every dnateq operator.

Written from SPEC sections 1, 2, 4 and 5 alone, with the same signatures as
:mod:`dnateq.ops`. It favours being obviously correct over being fast: codes
come from counting thresholds, dot products from explicit signed histograms
of exponent pairs, packing from an explicit bit matrix. It imports nothing
from the compiled extension, so it also loads standalone (tests, tools).

Normative details reproduced here (SPEC section 1):

* thresholds and levels are computed in float64 and rounded once to float32;
* ``|x|`` is compared in float32 (float16/bfloat16 are widened first);
* biased exponent = ``1 + #{j : |x| >= t_j}``; ``x == 0`` (also ``-0.0``) is
  the zero code; code = int8 with bit 7 = sign;
* dequantized level = float64 ``S * alpha^e + beta`` rounded to float32, then
  cast to the requested dtype; the zero code gives 0 whatever its sign bit.

Per-output-channel weight parameters (SPEC section 9): ``w_scale`` and
``w_offset`` (float32 ``[N]``, given together) replace ``sw``/``bw`` for output
``j``; level ``S_j * alpha^e + beta_j`` is computed in float64 from the float32
values and rounded once to float32, and the count post-processing uses
``sa*S_j``, ``ba*S_j``, ``sa*beta_j``, ``ba*beta_j``.

Argument errors raise ``ValueError``/``TypeError`` whose message names the
argument, like the C++ ``TORCH_CHECK`` messages.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "thresholds", "levels", "levels_f64", "level_table", "decode_codes",
    "exp_range", "exp_bias", "alpha_max", "packed_field_bits", "packed_row_bytes",
    "pack_rows", "fit_scale_offset",
    "exp_quantize", "exp_dequantize", "exp_level_table", "exp_pack", "exp_unpack",
    "exp_linear_count", "exp_conv2d_count", "exp_linear_lut", "exp_conv2d_lut",
    "exp_fit", "exp_error", "exp_errors", "exp_fits", "count_terms", "dequantize_channels",
    "exp_lut_layout",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ROUNDINGS = ("log", "nearest")
_SEARCHES = ("golden", "paper")
ALPHA_MIN = 1.0 + 1e-4
# Elements per chunk of the broadcast comparisons/histograms (memory bound).
_CHUNK = 1 << 21


# ---------------------------------------------------------------------------
# Argument checks (messages name the argument, as csrc/checks.h does)
# ---------------------------------------------------------------------------

def _check_bits(bits, name: str = "bits") -> int:
    if isinstance(bits, bool) or int(bits) != bits or not 2 <= int(bits) <= 7:
        raise ValueError(f"dnateq: {name} must be in [2, 7], got {bits}")
    return int(bits)


def _check_alpha(alpha, name: str = "alpha") -> float:
    a = float(alpha)
    if not (math.isfinite(a) and a > 1.0):
        raise ValueError(f"dnateq: {name} must be a finite base > 1, got {alpha}")
    return a


def _check_scale(scale, name: str = "scale") -> float:
    s = float(scale)
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"dnateq: {name} must be finite and > 0, got {scale}")
    return s


def _check_offset(offset, name: str = "offset") -> float:
    b = float(offset)
    if not math.isfinite(b):
        raise ValueError(f"dnateq: {name} must be finite, got {offset}")
    return b


def _check_rounding(rounding) -> str:
    if rounding not in _ROUNDINGS:
        raise ValueError(f'dnateq: rounding must be "log" or "nearest", got "{rounding}"')
    return rounding


def _check_float_input(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dnateq: {name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dnateq: {name} must be float32, float16 or bfloat16, got {x.dtype}")


def _check_finite(xf: torch.Tensor, name: str) -> None:
    if xf.numel() and not bool(torch.isfinite(xf).all()):
        raise ValueError(f"dnateq: {name} contains non-finite values (NaN or Inf)")


def _check_codes(c: torch.Tensor, name: str) -> None:
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"dnateq: {name} must be a tensor, got {type(c).__name__}")
    if c.dtype != torch.int8:
        raise TypeError(f"dnateq: {name} must be int8 codes, got {c.dtype}")


def _check_params(alpha, scale, offset, bits, scale_name="scale", offset_name="offset"):
    bits = _check_bits(bits)
    alpha = _check_alpha(alpha)
    scale = _check_scale(scale, scale_name)
    offset = _check_offset(offset, offset_name)
    lv = levels(alpha, scale, offset, bits)
    if not bool(torch.isfinite(lv).all()):
        raise ValueError(
            f"dnateq: alpha={alpha}, {scale_name}={scale}, {offset_name}={offset} give a "
            f"non-finite level at bits={bits} (alpha^E overflows float32)")
    return alpha, scale, offset, bits


def _check_channel_params(w_scale, w_offset, n_out: int, alpha: float, bits: int,
                          device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Validates per-channel weight parameters; returns float64 CPU copies of
    (w_scale, w_offset) or None when both are None."""
    if w_scale is None and w_offset is None:
        return None
    if w_scale is None or w_offset is None:
        raise ValueError("dnateq: w_scale and w_offset must be given together (per-channel "
                         f"weight parameters), got only {'w_scale' if w_offset is None else 'w_offset'}")
    out = []
    for t, name in ((w_scale, "w_scale"), (w_offset, "w_offset")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dnateq: {name} must be a tensor, got {type(t).__name__}")
        if device is not None and t.device != device:
            raise ValueError(f"dnateq: {name} must be on the op's device {device}, got {t.device}")
        if t.dtype != torch.float32:
            raise TypeError(f"dnateq: {name} must be float32, got {t.dtype}")
        if list(t.shape) != [n_out]:
            raise ValueError(f"dnateq: {name} must have shape [{n_out}] (one per output "
                             f"channel), got {list(t.shape)}")
        out.append(t.detach().cpu().to(torch.float64))
    s, o = out
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError("dnateq: w_scale must be finite and > 0")
    if not bool(torch.isfinite(o).all()):
        raise ValueError("dnateq: w_offset must be finite")
    E = exp_range(bits)
    for e in (-E, E):
        lv = (s * math.pow(alpha, e) + o).to(torch.float32)
        if not bool(torch.isfinite(lv).all()):
            raise ValueError(f"dnateq: alpha={alpha}, w_scale, w_offset give a non-finite "
                             f"level at bits={bits} (S * alpha^E + beta overflows float32)")
    return s, o


def dequantize_channels(codes: torch.Tensor, alpha: float, w_scale: torch.Tensor,
                        w_offset: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values of weight codes ``[N, ...]`` with per-output-channel
    parameters: ``sign * float32(S_j * alpha^e + beta_j)`` for row ``j``, zero
    code -> 0 (the levels every op computes with). On ``codes``' device."""
    bits = _check_bits(bits)
    alpha = _check_alpha(alpha)
    n_out = codes.shape[0] if codes.dim() else 1
    s, o = _check_channel_params(w_scale, w_offset, n_out, alpha, bits, None)
    return _channel_levels(codes.detach().cpu(), alpha, s, o, bits).to(codes.device)


def _channel_levels(codes, alpha, s64, o64, bits):
    sign, biased, nz = decode_codes(codes, bits, "w_codes")
    pw = torch.tensor([0.0] + [math.pow(alpha, b - exp_bias(bits))
                               for b in range(1, 1 << bits)], dtype=torch.float64)
    shape = [-1] + [1] * (codes.dim() - 1)
    lv = (s64.reshape(shape) * pw[biased] + o64.reshape(shape)).to(torch.float32)
    val = torch.where(sign < 0, -lv, lv)
    return torch.where(nz, val, torch.zeros_like(val))


def _check_counter_bits(cb) -> Optional[int]:
    if cb is None:
        return None
    if not 2 <= int(cb) <= 32:
        raise ValueError(f"dnateq: counter_bits must be in [2, 32] or None, got {cb}")
    return int(cb)


def _pair(v, name: str) -> List[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(t) for t in v]
    if len(v) == 1:
        v = v * 2
    if len(v) != 2:
        raise ValueError(f"dnateq: {name} must have 2 elements, got {v}")
    return v


# ---------------------------------------------------------------------------
# Format tables (SPEC section 1)
# ---------------------------------------------------------------------------

def exp_range(bits: int) -> int:
    """E = 2^(n-1) - 1: exponents run over [-E, E]."""
    return (1 << (int(bits) - 1)) - 1


def exp_bias(bits: int) -> int:
    """Biased exponent = e + 2^(n-1); biased 0 is the zero code."""
    return 1 << (int(bits) - 1)


def alpha_max(bits: int) -> float:
    """alpha_max(n) = min(16, exp(40 / E)) (SPEC section 2)."""
    return min(16.0, math.exp(40.0 / exp_range(bits)))


def _threshold_f64(alpha: float, scale: float, offset: float, j: int, rounding: str) -> float:
    if rounding == "log":
        return offset + scale * math.pow(alpha, j + 0.5)
    return offset + scale * 0.5 * (math.pow(alpha, j) + math.pow(alpha, j + 1))


def thresholds(alpha: float, scale: float, offset: float, bits: int,
               rounding: str = "nearest") -> torch.Tensor:
    """The ``2^n - 2`` decision thresholds ``t_j``, ``j = -E .. E-1``, computed in
    float64 and rounded once to float32.

    ``"log"``: ``beta + S * alpha^(j + 1/2)``; ``"nearest"``: the linear midpoint
    of levels ``j`` and ``j + 1``.
    """
    _check_rounding(rounding)
    E = exp_range(bits)
    t = [_threshold_f64(float(alpha), float(scale), float(offset), j, rounding)
         for j in range(-E, E)]
    return torch.tensor(t, dtype=torch.float64).to(torch.float32)


def levels_f64(alpha: float, scale: float, offset: float, bits: int) -> torch.Tensor:
    """The ``2^n - 1`` levels ``S * alpha^e + beta``, ``e = -E .. E``, in float64."""
    E = exp_range(bits)
    return torch.tensor([float(scale) * math.pow(float(alpha), e) + float(offset)
                         for e in range(-E, E + 1)], dtype=torch.float64)


def levels(alpha: float, scale: float, offset: float, bits: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Levels for ``e = -E .. E`` computed in float64, rounded once to float32
    (then cast to ``dtype``; float64 gives the unrounded levels)."""
    lv = levels_f64(alpha, scale, offset, bits)
    if dtype == torch.float64:
        return lv
    return lv.to(torch.float32).to(dtype)


def level_table(alpha: float, scale: float, offset: float, bits: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Levels indexed by biased exponent ``0 .. 2^n - 1``; entry 0 (zero code) is 0."""
    lv = levels(alpha, scale, offset, bits, dtype)
    return torch.cat([torch.zeros(1, dtype=lv.dtype), lv])


def exp_level_table(alpha: float, scale: float, offset: float, bits: int) -> torch.Tensor:
    """Reference of ``dnateq.exp_level_table``: :func:`level_table` in float32,
    with the parameter checks of :func:`exp_dequantize`."""
    alpha, scale, offset, bits = _check_params(alpha, scale, offset, bits)
    return level_table(alpha, scale, offset, bits, torch.float32)


def decode_codes(codes: torch.Tensor, bits: int, name: str = "codes"
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split int8 codes into ``(sign, biased, nonzero)``.

    ``sign`` is int64 ``-1``/``+1`` (from bit 7), ``biased`` the int64 biased
    exponent (bits 0..6), ``nonzero`` is ``biased != 0``. Raises if any code has
    bits ``n..6`` set.
    """
    _check_codes(codes, name)
    u = codes.to(torch.int64) & 0xFF
    biased = u & 0x7F
    if biased.numel() and bool((biased >= (1 << bits)).any()):
        raise ValueError(f"dnateq: {name} has bits above bit {bits - 1} set "
                         f"(biased exponent >= 2^{bits}) for bits={bits}")
    sign = torch.where((u & 0x80) != 0, -1, 1).to(torch.int64)
    return sign, biased, biased != 0


def packed_field_bits(bits: int, signed: bool) -> int:
    """Packed bits per element: ``n + 1`` for signed tensors, ``n`` for unsigned."""
    return int(bits) + 1 if signed else int(bits)


def packed_row_bytes(K: int, bits: int, signed: bool) -> int:
    """Bytes of one packed row of ``K`` elements: ``4 * ceil(K * b / 32)``."""
    b = packed_field_bits(bits, signed)
    return 4 * ((int(K) * b + 31) // 32)


def pack_rows(shape: Sequence[int]) -> Tuple[int, int]:
    """``(rows, K)`` of a tensor shape for packing: 0-d -> (1, 1), 1-D -> one row,
    n-D -> ``(d0, d1*d2*...)``."""
    shape = [int(s) for s in shape]
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], int(math.prod(shape[1:]))


# ---------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------

def _biased_exponents(mag: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """``1 + #{j : mag >= t_j}`` for a flat float32 ``mag`` (int64)."""
    out = torch.empty(mag.numel(), dtype=torch.int64)
    n_thr = max(1, thr.numel())
    step = max(1, _CHUNK // n_thr)
    for s in range(0, mag.numel(), step):
        m = mag[s:s + step]
        out[s:s + step] = 1 + (m.unsqueeze(1) >= thr.unsqueeze(0)).sum(dim=1)
    return out


def exp_quantize(x: torch.Tensor, alpha: float, scale: float, offset: float, bits: int,
                 rounding: str = "nearest", check_finite: bool = True) -> torch.Tensor:
    """Reference of ``dnateq.exp_quantize``: int8 codes of ``x`` (same shape)."""
    _check_float_input(x, "x")
    _check_rounding(rounding)
    alpha, scale, offset, bits = _check_params(alpha, scale, offset, bits)
    xf = x.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    # SPEC: on CPU the non-finite check is always on; ``check_finite`` only lets
    # CUDA skip its reduction. The oracle runs on CPU, so it always checks.
    del check_finite
    _check_finite(xf, "x")
    thr = thresholds(alpha, scale, offset, bits, rounding)
    biased = _biased_exponents(xf.abs(), thr)
    biased = torch.where(xf == 0, torch.zeros_like(biased), biased)
    code = biased + torch.where(xf < 0, 128, 0)
    out = code.to(torch.uint8).view(torch.int8).reshape(x.shape)
    return out.to(x.device)


def exp_dequantize(codes: torch.Tensor, alpha: float, scale: float, offset: float,
                   bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference of ``dnateq.exp_dequantize``: ``s * (S * alpha^e + beta)``, zero
    code -> 0; levels rounded once to float32, then cast to ``dtype``."""
    alpha, scale, offset, bits = _check_params(alpha, scale, offset, bits)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dnateq: dtype must be a floating dtype (float32, float16, "
                        f"bfloat16), got {dtype}")
    sign, biased, nz = decode_codes(codes.detach().cpu(), bits, "codes")
    table = level_table(alpha, scale, offset, bits, torch.float32)
    mag = table[biased]
    val = torch.where(sign < 0, -mag, mag)
    val = torch.where(nz, val, torch.zeros_like(val))
    return val.to(dtype).to(codes.device)


# ---------------------------------------------------------------------------
# Pack / unpack
# ---------------------------------------------------------------------------

def exp_pack(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Reference of ``dnateq.exp_pack``: ``uint8 [rows, 4*ceil(K*b/32)]``.

    Fields of ``b`` bits (signed: sign at bit ``n``, biased exponent below;
    unsigned: biased exponent only) laid LSB-first into a little-endian
    bitstream per row; rows are padded to 4 bytes with zero bits.
    """
    _check_codes(codes, "codes")
    bits = _check_bits(bits)
    signed = bool(signed)
    c = codes.detach().cpu()
    sign, biased, _ = decode_codes(c, bits, "codes")
    if not signed and sign.numel() and bool((sign < 0).any()):
        raise ValueError("dnateq: codes has the sign bit set but signed=False "
                         "(unsigned tensors have no sign field)")
    rows, K = pack_rows(c.shape)
    b = packed_field_bits(bits, signed)
    row_bytes = packed_row_bytes(K, bits, signed)
    field = biased
    if signed:
        field = field | torch.where(sign < 0, 1 << bits, 0)
    field = field.reshape(rows, K)
    shifts = torch.arange(b, dtype=torch.int64)
    bitmat = ((field.unsqueeze(-1) >> shifts) & 1).reshape(rows, K * b)
    padded = torch.zeros(rows, row_bytes * 8, dtype=torch.int64)
    padded[:, :K * b] = bitmat
    weights = (1 << torch.arange(8, dtype=torch.int64))
    out = (padded.reshape(rows, row_bytes, 8) * weights).sum(-1).to(torch.uint8)
    return out.to(codes.device)


def exp_unpack(packed: torch.Tensor, bits: int, signed: bool,
               shape: Sequence[int]) -> torch.Tensor:
    """Reference of ``dnateq.exp_unpack``: inverse of :func:`exp_pack`."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"dnateq: packed must be a tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"dnateq: packed must be uint8, got {packed.dtype}")
    bits = _check_bits(bits)
    signed = bool(signed)
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise ValueError(f"dnateq: shape must be non-negative, got {shape}")
    rows, K = pack_rows(shape)
    b = packed_field_bits(bits, signed)
    row_bytes = packed_row_bytes(K, bits, signed)
    if list(packed.shape) != [rows, row_bytes]:
        raise ValueError(f"dnateq: packed must have shape [{rows}, {row_bytes}] for shape="
                         f"{shape}, bits={bits}, signed={signed}, got {list(packed.shape)}")
    p = packed.detach().cpu().to(torch.int64)
    bitmat = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int64)) & 1)
    bitmat = bitmat.reshape(rows, row_bytes * 8)[:, :K * b].reshape(rows, K, b)
    field = (bitmat << torch.arange(b, dtype=torch.int64)).sum(-1)
    mag = field & ((1 << bits) - 1)
    code = mag
    if signed:
        code = code | torch.where(((field >> bits) & 1) != 0, 0x80, 0)
    return code.to(torch.uint8).view(torch.int8).reshape(shape).to(packed.device)


# ---------------------------------------------------------------------------
# The LUT fast path's offline weight layout (SPEC section 9; csrc/lut/fast_layout.h)
# ---------------------------------------------------------------------------

LAYOUT_MAGIC = 0x4C515444   # "DTQL"
LAYOUT_VERSION = 1
LAYOUT_HEADER_BYTES = 64


def _layout_fingerprint(packed: torch.Tensor) -> int:
    """FNV-1a over 16 sampled 8-byte words of the packed bytes (and their count)."""
    p = packed.detach().cpu().contiguous().reshape(-1)
    n = p.numel()
    m64 = (1 << 64) - 1
    h = 1469598103934665603 ^ n
    if n >= 8:
        raw = bytes(p.numpy().tobytes())
        for i in range(16):
            off = (n - 8) * i // 15
            v = int.from_bytes(raw[off:off + 8], "little")
            h = ((h ^ v) * 1099511628211) & m64
    else:
        for v in p.tolist():
            h = ((h ^ v) * 1099511628211) & m64
    return h


def exp_lut_layout(w_packed: torch.Tensor, w_shape: Sequence[int], bits: int,
                   signed: bool) -> torch.Tensor:
    """Reference of ``dnateq.exp_lut_layout``: the versioned offline layout of a
    packed weight, byte for byte (64-byte header, then the rows).

    ``bits <= 5`` (kind 1): groups of 32 fields, 16 bytes of low nibbles
    (byte j holds fields j and j+16), then one 32-bit plane per field bit above 3.
    ``bits >= 6`` (kind 2): one byte per field (biased exponent, sign at bit 7) in
    groups of 64, field ``16r + 4l + i`` stored at ``16l + 4r + i``.
    """
    bits = _check_bits(bits)
    signed = bool(signed)
    shape = [int(s) for s in w_shape]
    rows, K = pack_rows(shape)
    codes = exp_unpack(w_packed, bits, signed, shape).reshape(rows, K).cpu()
    u = codes.view(torch.uint8).to(torch.int64)
    mag = u & 0x7F
    sgn = (u >> 7) & 1
    b = packed_field_bits(bits, signed)
    field = mag | (sgn << bits) if signed else mag
    if bits <= 5:
        kind, group = 1, 32
        G = -(-K // 32)
        f = torch.zeros(rows, G * 32, dtype=torch.int64)
        f[:, :K] = field
        f = f.reshape(rows, G, 32)
        nib = (f[:, :, :16] & 15) | ((f[:, :, 16:] & 15) << 4)
        parts = [nib]
        for p in range(max(b - 4, 0)):
            bit = (f >> (4 + p)) & 1                       # [rows, G, 32]
            word = (bit << torch.arange(32, dtype=torch.int64)).sum(-1)   # [rows, G]
            parts.append(torch.stack([(word >> (8 * i)) & 255 for i in range(4)], -1))
        data = torch.cat(parts, -1).reshape(rows, -1)
    else:
        kind, group = 2, 64
        G = -(-K // 64)
        f = torch.zeros(rows, G * 64, dtype=torch.int64)
        f[:, :K] = mag | (sgn << 7)
        # position 16l + 4r + i holds field 16r + 4l + i
        f = f.reshape(rows, G, 4, 4, 4).transpose(2, 3)
        data = f.reshape(rows, -1)
    row_bytes = data.shape[1] if rows else (-(-K // group) * (16 + 4 * max(b - 4, 0))
                                            if kind == 1 else -(-K // 64) * 64)
    head = bytearray(LAYOUT_HEADER_BYTES)
    import struct
    struct.pack_into("<IIqqIIIIqQ", head, 0, LAYOUT_MAGIC, LAYOUT_VERSION, rows, K, bits,
                     int(signed), kind, group, row_bytes, _layout_fingerprint(w_packed))
    out = torch.cat([torch.frombuffer(head, dtype=torch.uint8),
                     data.to(torch.uint8).reshape(-1)])
    return out.to(w_packed.device)


# ---------------------------------------------------------------------------
# Exponential-domain dot products (SPEC section 4)
# ---------------------------------------------------------------------------

def count_terms(a_codes: torch.Tensor, w_codes: torch.Tensor, bits: int,
                counter_bits: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact counts of Eq. 8 for ``a [M, K]`` and ``w [N, K]``.

    Returns int64 ``C1 [M, N, 4E+1]`` (index ``k + 2E``), ``C2 [M, N, 2E+1]``
    (``e_w + E``), ``C3 [M, N, 2E+1]`` (``e_a + E``) and ``C4 [M, N]``, each
    clamped to ``[-2^(b-1), 2^(b-1) - 1]`` when ``counter_bits = b`` is given.
    """
    bits = _check_bits(bits)
    E = exp_range(bits)
    sa, ba_, nza = decode_codes(a_codes, bits, "a_codes")
    sw, bw_, nzw = decode_codes(w_codes, bits, "w_codes")
    M, K = a_codes.shape
    N = w_codes.shape[0]
    bias = exp_bias(bits)
    # signed indicator (0 for zero codes) and exponent of every element
    sga = torch.where(nza, sa, 0)
    sgw = torch.where(nzw, sw, 0)
    ea = torch.where(nza, ba_ - bias, 0)
    ew = torch.where(nzw, bw_ - bias, 0)
    C1 = torch.zeros(M, N, 4 * E + 1, dtype=torch.int64)
    C2 = torch.zeros(M, N, 2 * E + 1, dtype=torch.int64)
    C3 = torch.zeros(M, N, 2 * E + 1, dtype=torch.int64)
    C4 = torch.zeros(M, N, dtype=torch.int64)
    step = max(1, _CHUNK // max(1, N * K))
    for s in range(0, M, step):
        e = min(M, s + step)
        m = e - s
        sig = sga[s:e, None, :] * sgw[None, :, :]                    # [m, N, K]
        idx1 = (ea[s:e, None, :] + ew[None, :, :] + 2 * E).expand(m, N, K)
        idx2 = (ew[None, :, :] + E).expand(m, N, K)
        idx3 = (ea[s:e, None, :] + E).expand(m, N, K)
        C1[s:e].scatter_add_(2, idx1, sig)
        C2[s:e].scatter_add_(2, idx2, sig)
        C3[s:e].scatter_add_(2, idx3, sig)
        C4[s:e] = sig.sum(-1)
    if counter_bits is not None:
        lo, hi = -(1 << (counter_bits - 1)), (1 << (counter_bits - 1)) - 1
        C1, C2, C3, C4 = (c.clamp(lo, hi) for c in (C1, C2, C3, C4))
    return C1, C2, C3, C4


def _post_process(C1, C2, C3, C4, alpha, sa, ba, sw, bw, bits) -> torch.Tensor:
    """``y`` of Eq. 8 in float64 (before bias)."""
    E = exp_range(bits)
    p1 = torch.tensor([math.pow(alpha, k) for k in range(-2 * E, 2 * E + 1)],
                      dtype=torch.float64)
    p2 = torch.tensor([math.pow(alpha, k) for k in range(-E, E + 1)], dtype=torch.float64)
    return (sa * sw * (C1.double() * p1).sum(-1) + ba * sw * (C2.double() * p2).sum(-1)
            + sa * bw * (C3.double() * p2).sum(-1) + ba * bw * C4.double())


def _count_2d(a2, w2, alpha, sa, ba, sw, bw, bits, counter_bits) -> torch.Tensor:
    C = count_terms(a2, w2, bits, counter_bits)
    return _post_process(*C, alpha, sa, ba, sw, bw, bits)


def _check_count_args(a_codes, w_codes, alpha, sa, ba, sw, bw, bits, counter_bits,
                      w_scale=None, w_offset=None):
    """With per-channel parameters, sw/bw are returned as float64 [N] tensors."""
    _check_codes(a_codes, "a_codes")
    _check_codes(w_codes, "w_codes")
    alpha, sa, ba, bits = _check_params(alpha, sa, ba, bits, "sa", "ba")
    n_out = w_codes.shape[0] if w_codes.dim() else 0
    wc = _check_channel_params(w_scale, w_offset, n_out, alpha, bits, w_codes.device)
    if wc is None:
        _, sw, bw, _ = _check_params(alpha, sw, bw, bits, "sw", "bw")
    else:
        sw, bw = wc
    counter_bits = _check_counter_bits(counter_bits)
    return alpha, sa, ba, sw, bw, bits, counter_bits


def _check_bias(bias, n_out):
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"dnateq: bias must be a floating tensor, got "
                        f"{getattr(bias, 'dtype', type(bias).__name__)}")
    if list(bias.shape) != [n_out]:
        raise ValueError(f"dnateq: bias must have shape [{n_out}], got {list(bias.shape)}")
    b = bias.cpu().to(torch.float64)   # not detached: the bias gradient is exact
    if not bool(torch.isfinite(b.detach()).all()):
        raise ValueError("dnateq: bias contains non-finite values (NaN or Inf)")
    return b


def _check_w_terms(w_terms, rows, bits):
    if w_terms is None:
        return
    if not isinstance(w_terms, torch.Tensor) or w_terms.dtype != torch.int32:
        raise TypeError(f"dnateq: w_terms must be an int32 tensor, got "
                        f"{getattr(w_terms, 'dtype', type(w_terms).__name__)}")
    if list(w_terms.shape) != [rows, 1 << bits]:
        raise ValueError(f"dnateq: w_terms must have shape [{rows}, {1 << bits}], got "
                         f"{list(w_terms.shape)}")


def exp_linear_count(a_codes: torch.Tensor, w_codes: torch.Tensor, alpha: float,
                     sa: float, ba: float, sw: float, bw: float, bits: int,
                     bias: Optional[torch.Tensor] = None,
                     counter_bits: Optional[int] = None,
                     w_terms: Optional[torch.Tensor] = None,
                     w_scale: Optional[torch.Tensor] = None,
                     w_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of ``dnateq.exp_linear_count``: ``a [*, K] x w [N, K] -> float32 [*, N]``.

    Always counts directly; ``w_terms`` is only validated (the result of the
    real op must equal the direct count).
    """
    alpha, sa, ba, sw, bw, bits, counter_bits = _check_count_args(
        a_codes, w_codes, alpha, sa, ba, sw, bw, bits, counter_bits, w_scale, w_offset)
    if w_codes.dim() != 2:
        raise ValueError(f"dnateq: w_codes must be 2-D [N, K], got {list(w_codes.shape)}")
    if a_codes.dim() < 1 or a_codes.shape[-1] != w_codes.shape[1]:
        raise ValueError(f"dnateq: a_codes must be [*, K] with K = w_codes.shape[1] = "
                         f"{w_codes.shape[1]}, got {list(a_codes.shape)}")
    N, K = w_codes.shape
    b64 = _check_bias(bias, N)
    _check_w_terms(w_terms, N, bits)
    M = math.prod(a_codes.shape[:-1])
    a2 = a_codes.detach().cpu().reshape(M, K)
    y = _count_2d(a2, w_codes.detach().cpu(), alpha, sa, ba, sw, bw, bits, counter_bits)
    if b64 is not None:
        y = y + b64
    return y.to(torch.float32).reshape(*a_codes.shape[:-1], N).to(a_codes.device)


def _conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_conv_geometry(x_shape, w_shape, stride, padding, dilation, groups,
                         x_name, w_name="w_shape"):
    """Validates a conv's shapes and returns its output size ``(OH, OW)``."""
    if groups < 1:
        raise ValueError(f"dnateq: groups must be >= 1, got {groups}")
    if min(stride) < 1:
        raise ValueError(f"dnateq: stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"dnateq: padding must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"dnateq: dilation must be >= 1, got {dilation}")
    _, C, H, W = x_shape
    O, Cg, kh, kw = w_shape
    if C % groups or O % groups or Cg * groups != C:
        raise ValueError(f"dnateq: {w_name} {list(w_shape)} does not match {x_name} channels "
                         f"{C} with groups={groups}")
    OH = _conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    OW = _conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    if OH < 1 or OW < 1:
        raise ValueError(f"dnateq: {x_name} spatial size {H}x{W} (padding {padding}) is too "
                         f"small for the dilated kernel {kh}x{kw} (dilation {dilation})")
    return OH, OW


def exp_conv2d_count(a_codes: torch.Tensor, w_codes: torch.Tensor, alpha: float,
                     sa: float, ba: float, sw: float, bw: float, bits: int,
                     bias: Optional[torch.Tensor] = None, stride=(1, 1), padding=(0, 0),
                     dilation=(1, 1), groups: int = 1,
                     counter_bits: Optional[int] = None,
                     w_terms: Optional[torch.Tensor] = None,
                     w_scale: Optional[torch.Tensor] = None,
                     w_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of ``dnateq.exp_conv2d_count``; padded positions are zero codes.

    Unfolds the codes (as exact small floats) with ``F.unfold`` and runs the
    linear count per group.
    """
    alpha, sa, ba, sw, bw, bits, counter_bits = _check_count_args(
        a_codes, w_codes, alpha, sa, ba, sw, bw, bits, counter_bits, w_scale, w_offset)
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    groups = int(groups)
    if a_codes.dim() != 4:
        raise ValueError(f"dnateq: a_codes must be 4-D [N, C, H, W], got {list(a_codes.shape)}")
    if w_codes.dim() != 4:
        raise ValueError(f"dnateq: w_codes must be 4-D [O, C/groups, kh, kw], got "
                         f"{list(w_codes.shape)}")
    OH, OW = _check_conv_geometry(a_codes.shape, list(w_codes.shape), stride, padding,
                                  dilation, groups, "a_codes", "w_codes")
    Nb, C, H, W = a_codes.shape
    O, Cg, kh, kw = w_codes.shape
    b64 = _check_bias(bias, O)
    _check_w_terms(w_terms, O, bits)
    a = a_codes.detach().cpu()
    w = w_codes.detach().cpu()
    # validate code bits before going through float
    decode_codes(a, bits, "a_codes")
    decode_codes(w, bits, "w_codes")
    # int8 values are exact in float32, and padded zeros are zero codes
    cols = F.unfold(a.to(torch.float32), (kh, kw), dilation=dilation, padding=padding,
                    stride=stride)                                    # [Nb, C*kh*kw, L]
    L = cols.shape[-1]
    cols = cols.to(torch.int8)
    Kg = Cg * kh * kw
    Og = O // groups
    y = torch.zeros(Nb, L, O, dtype=torch.float64)
    for g in range(groups):
        ag = cols[:, g * Kg:(g + 1) * Kg, :].transpose(1, 2).reshape(Nb * L, Kg)
        wg = w[g * Og:(g + 1) * Og].reshape(Og, Kg)
        swg, bwg = ((sw[g * Og:(g + 1) * Og], bw[g * Og:(g + 1) * Og])
                    if isinstance(sw, torch.Tensor) else (sw, bw))
        y[:, :, g * Og:(g + 1) * Og] = _count_2d(
            ag, wg, alpha, sa, ba, swg, bwg, bits, counter_bits).reshape(Nb, L, Og)
    if b64 is not None:
        y = y + b64
    y = y.transpose(1, 2).reshape(Nb, O, OH, OW)
    return y.to(torch.float32).contiguous().to(a_codes.device)


# ---------------------------------------------------------------------------
# LUT (fast path) references = fake quantization + native float32 op
# ---------------------------------------------------------------------------

def _fake_quant_act(x, alpha, sa, ba, bits, rounding):
    codes = exp_quantize(x, alpha, sa, ba, bits, rounding)
    return exp_dequantize(codes, alpha, sa, ba, bits, torch.float32)


def _lut_weights(w_packed, w_shape, alpha, sw, bw, bits, w_signed, wc=None):
    if not isinstance(w_packed, torch.Tensor) or w_packed.dtype != torch.uint8:
        raise TypeError(f"dnateq: w_packed must be a uint8 tensor, got "
                        f"{getattr(w_packed, 'dtype', type(w_packed).__name__)}")
    try:
        w_codes = exp_unpack(w_packed, bits, w_signed, w_shape)
    except ValueError as e:
        raise ValueError(str(e).replace("packed", "w_packed", 1)) from None
    if wc is not None:
        return _channel_levels(w_codes.cpu(), alpha, wc[0], wc[1], bits)
    return exp_dequantize(w_codes, alpha, sw, bw, bits, torch.float32)


def exp_linear_lut(x: torch.Tensor, w_packed: torch.Tensor, w_shape: Sequence[int],
                   alpha: float, sa: float, ba: float, sw: float, bw: float, bits: int,
                   a_signed: bool, w_signed: bool, rounding: str = "nearest",
                   bias: Optional[torch.Tensor] = None,
                   w_scale: Optional[torch.Tensor] = None,
                   w_offset: Optional[torch.Tensor] = None,
                   w_layout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of ``dnateq.exp_linear_lut``: fake-quantize ``x``, dequantize the
    unpacked weights, ``F.linear`` in float32, cast to ``x.dtype``. ``w_layout``
    (the CPU fast path's weight layout) does not change the result and is not read;
    neither is the deprecated ``a_signed`` (docs/FORMAT.md)."""
    _check_float_input(x, "x")
    _check_rounding(rounding)
    alpha, sa, ba, bits = _check_params(alpha, sa, ba, bits, "sa", "ba")
    w_shape = [int(s) for s in w_shape]
    wc = _check_channel_params(w_scale, w_offset, w_shape[0] if w_shape else 0, alpha,
                               bits, x.device)
    if wc is None:
        _, sw, bw, _ = _check_params(alpha, sw, bw, bits, "sw", "bw")
    if len(w_shape) != 2:
        raise ValueError(f"dnateq: w_shape must be [N, K], got {w_shape}")
    N, K = w_shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"dnateq: x must be [*, K] with K = w_shape[1] = {K}, got "
                         f"{list(x.shape)}")
    b32 = _check_bias(bias, N)
    w_hat = _lut_weights(w_packed, w_shape, alpha, sw, bw, bits, w_signed, wc)
    a_hat = _fake_quant_act(x, alpha, sa, ba, bits, rounding).cpu()
    y = F.linear(a_hat, w_hat.cpu(), None if b32 is None else b32.to(torch.float32))
    return y.to(x.dtype).to(x.device)


def exp_conv2d_lut(x: torch.Tensor, w_packed: torch.Tensor, w_shape: Sequence[int],
                   alpha: float, sa: float, ba: float, sw: float, bw: float, bits: int,
                   a_signed: bool, w_signed: bool, rounding: str = "nearest",
                   bias: Optional[torch.Tensor] = None, stride=(1, 1), padding=(0, 0),
                   dilation=(1, 1), groups: int = 1,
                   w_scale: Optional[torch.Tensor] = None,
                   w_offset: Optional[torch.Tensor] = None,
                   w_layout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of ``dnateq.exp_conv2d_lut`` (fake quantization + ``F.conv2d``)."""
    _check_float_input(x, "x")
    _check_rounding(rounding)
    alpha, sa, ba, bits = _check_params(alpha, sa, ba, bits, "sa", "ba")
    w_shape = [int(s) for s in w_shape]
    wc = _check_channel_params(w_scale, w_offset, w_shape[0] if w_shape else 0, alpha,
                               bits, x.device)
    if wc is None:
        _, sw, bw, _ = _check_params(alpha, sw, bw, bits, "sw", "bw")
    if len(w_shape) != 4:
        raise ValueError(f"dnateq: w_shape must be [O, C/groups, kh, kw], got {w_shape}")
    if x.dim() != 4:
        raise ValueError(f"dnateq: x must be 4-D [N, C, H, W], got {list(x.shape)}")
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    _check_conv_geometry(x.shape, w_shape, stride, padding, dilation, int(groups), "x")
    b32 = _check_bias(bias, w_shape[0])
    w_hat = _lut_weights(w_packed, w_shape, alpha, sw, bw, bits, w_signed, wc)
    a_hat = _fake_quant_act(x, alpha, sa, ba, bits, rounding).cpu()
    if w_hat.numel() == 0:   # no output channels or empty dot products: the bias
        ho, wo = (_conv_out_size(x.shape[2 + d], w_shape[2 + d], stride[d], padding[d],
                                 dilation[d]) for d in range(2))
        y = torch.zeros(x.shape[0], w_shape[0], ho, wo)
        if b32 is not None:
            y = y + b32.to(torch.float32).view(1, -1, 1, 1)
        return y.to(x.dtype).to(x.device)
    y = F.conv2d(a_hat, w_hat.cpu(), None if b32 is None else b32.to(torch.float32),
                 stride, padding, dilation, int(groups))
    return y.to(x.dtype).to(x.device)


# ---------------------------------------------------------------------------
# Error and fit (SPEC section 2)
# ---------------------------------------------------------------------------

def _rmae_sorted(m_sorted: torch.Tensor, total: float, alpha, scale, offset, bits,
                 rounding) -> float:
    """RMAE of quantizing the sorted nonzero float32 magnitudes ``m_sorted``
    (``total`` = sum of all |x| in float64). ``x_hat`` is the dequantized value,
    i.e. the level rounded once to float32, as in :func:`exp_error`."""
    if total == 0.0 or m_sorted.numel() == 0:
        return 0.0
    thr = thresholds(alpha, scale, offset, bits, rounding)
    biased = _biased_exponents(m_sorted, thr)  # 1 + #{j : m >= t_j}
    lv = level_table(alpha, scale, offset, bits, torch.float32).to(torch.float64)
    err = (m_sorted.to(torch.float64) - lv[biased]).abs().sum().item()
    return err / total


def exp_error(x: torch.Tensor, alpha: float, scale: float, offset: float, bits: int,
              rounding: str = "nearest") -> float:
    """Reference of ``dnateq.exp_error``: brute force ``sum|x - x_hat| / sum|x|`` in
    float64, where ``x_hat`` is exactly what :func:`exp_dequantize` returns for the
    codes of ``x`` (levels rounded once to float32); 0 for an all-zero or empty ``x``."""
    _check_float_input(x, "x")
    _check_rounding(rounding)
    alpha, scale, offset, bits = _check_params(alpha, scale, offset, bits)
    xf = x.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    _check_finite(xf, "x")
    codes = exp_quantize(xf, alpha, scale, offset, bits, rounding)
    x_hat = exp_dequantize(codes, alpha, scale, offset, bits, torch.float32).to(torch.float64)
    x64 = xf.to(torch.float64)
    den = x64.abs().sum().item()
    if den == 0.0:
        return 0.0
    return (x64 - x_hat).abs().sum().item() / den


def exp_errors(x: torch.Tensor, alpha: Sequence[float], scale: Sequence[float],
               offset: Sequence[float], bits: int, rounding: str = "nearest") -> torch.Tensor:
    """Reference of ``dnateq.exp_errors``: :func:`exp_error` of every candidate
    ``(alpha[i], scale[i], offset[i])``, as float64 ``[C]``."""
    alpha, scale, offset = list(alpha), list(scale), list(offset)
    if not len(alpha) == len(scale) == len(offset):
        raise ValueError(f"dnateq: alpha, scale and offset must have the same length, got "
                         f"{len(alpha)}, {len(scale)}, {len(offset)}")
    _check_float_input(x, "x")
    _check_rounding(rounding)
    _check_bits(bits)
    for a, s, o in zip(alpha, scale, offset):
        _check_params(a, s, o, bits)
    return torch.tensor([exp_error(x, a, s, o, bits, rounding)
                         for a, s, o in zip(alpha, scale, offset)], dtype=torch.float64)


def exp_fits(x: torch.Tensor, bits: Sequence[int], search: str = "golden",
             rounding: str = "nearest", alpha: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Reference of ``dnateq.exp_fits``: :func:`exp_fit` per bit width, as float64
    ``[len(bits), 4]`` rows ``(alpha, scale, offset, rmae)``."""
    bits = list(bits)
    if not bits:
        raise ValueError("dnateq: bits must list at least one bit width")
    alphas = [None] * len(bits) if alpha is None else list(alpha)
    if len(alphas) != len(bits):
        raise ValueError(f"dnateq: alpha must have one value per bit width, got {len(alphas)} "
                         f"values for {len(bits)} bit widths")
    return torch.tensor([exp_fit(x, b, search, rounding, a) for b, a in zip(bits, alphas)],
                        dtype=torch.float64).reshape(len(bits), 4)


def fit_scale_offset(lo: float, hi: float, alpha: float, bits: int) -> Tuple[float, float]:
    """``S = (hi - lo) / (alpha^E - alpha^-E)``, ``beta = lo - S * alpha^-E`` (float64)."""
    E = exp_range(bits)
    aE = math.pow(alpha, E)
    amE = math.pow(alpha, -E)
    S = (hi - lo) / (aE - amE)
    return S, lo - S * amE


def _paper_search(err, lo, hi, E, amin, amax) -> Tuple[float, float]:
    """Algorithm 1: start at ``(hi/lo)^(1/(2E))`` (clamped), step ``(alpha0 - 1)/10``
    towards the better neighbour while the error strictly falls."""
    a0 = math.pow(hi / lo, 1.0 / (2 * E))
    a0 = min(max(a0, amin), amax)
    delta = (a0 - 1.0) / 10.0
    e0 = err(a0)
    ap, am = min(a0 + delta, amax), max(a0 - delta, amin)
    ep = err(ap) if ap != a0 else e0
    em = err(am) if am != a0 else e0
    if ep < e0 and ep <= em:
        direction, cur, ecur = 1.0, ap, ep
    elif em < e0:
        direction, cur, ecur = -1.0, am, em
    else:
        return a0, e0
    while True:
        nxt = min(max(cur + direction * delta, amin), amax)
        if nxt == cur:
            break
        en = err(nxt)
        if en < ecur:
            cur, ecur = nxt, en
        else:
            break
    return cur, ecur


def _golden_search(err, amin, amax, grid: int = 48, iters: int = 60) -> Tuple[float, float]:
    """Coarse grid on ``log alpha`` followed by golden-section search in the
    bracket around the best grid point."""
    ulo, uhi = math.log(amin), math.log(amax)
    us = [ulo + (uhi - ulo) * i / (grid - 1) for i in range(grid)]
    es = [err(math.exp(u)) for u in us]
    i = min(range(grid), key=lambda t: es[t])
    best_a, best_e = math.exp(us[i]), es[i]
    a, b = us[max(0, i - 1)], us[min(grid - 1, i + 1)]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = err(math.exp(c)), err(math.exp(d))
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = err(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = err(math.exp(d))
    for u, e in ((c, fc), (d, fd)):
        if e < best_e:
            best_a, best_e = math.exp(u), e
    return best_a, best_e


def exp_fit(x: torch.Tensor, bits: int, search: str = "golden", rounding: str = "nearest",
            alpha: Optional[float] = None) -> Tuple[float, float, float, float]:
    """Reference of ``dnateq.exp_fit``: ``(alpha, scale, offset, rmae)``.

    Degenerate tensors exactly as SPEC section 2: all-zero/empty ->
    ``(2, 1, 0, 0)`` (alpha as given, if given); one distinct nonzero magnitude ->
    ``S = lo``, ``beta = 0``, ``alpha`` as given else 2. ``"golden"`` also evaluates the paper's answer and
    keeps the best, so it is never worse than ``"paper"``.
    """
    _check_float_input(x, "x")
    bits = _check_bits(bits)
    _check_rounding(rounding)
    if search not in _SEARCHES:
        raise ValueError(f'dnateq: search must be "golden" or "paper", got "{search}"')
    if alpha is not None:
        alpha = _check_alpha(alpha)
    xf = x.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    _check_finite(xf, "x")
    m = xf.abs()
    m = m[m != 0]
    if m.numel() == 0:
        # SPEC: alpha = 2, S = 1, beta = 0, RMAE = 0. A given alpha is kept, as
        # in the one-magnitude case, so that a layer's two tensors share it.
        return (2.0 if alpha is None else alpha), 1.0, 0.0, 0.0
    m_sorted = torch.sort(m).values
    lo, hi = float(m_sorted[0]), float(m_sorted[-1])
    total = m_sorted.to(torch.float64).sum().item()
    E = exp_range(bits)
    if hi == lo:
        a = 2.0 if alpha is None else alpha
        S, beta = lo, 0.0
        return a, S, beta, _rmae_sorted(m_sorted, total, a, S, beta, bits, rounding)

    def err(a: float) -> float:
        S, beta = fit_scale_offset(lo, hi, a, bits)
        return _rmae_sorted(m_sorted, total, a, S, beta, bits, rounding)

    if alpha is not None:
        a = alpha
    else:
        amin, amax = ALPHA_MIN, alpha_max(bits)
        a, e = _paper_search(err, lo, hi, E, amin, amax)
        if search == "golden":
            ag, eg = _golden_search(err, amin, amax)
            if eg < e:
                a = ag
    S, beta = fit_scale_offset(lo, hi, a, bits)
    return a, S, beta, err(a)
