"""Uniform (integer) fake-quantized layers: the baseline DNA-TEQ is compared with.

``UniformLinear`` / ``UniformConv2d`` hold their weights as symmetric
per-tensor INT-``w_bits`` integers (``round(w / s)`` clamped to
``±(2^(w_bits-1) - 1)``, ``s = max|w| / (2^(w_bits-1) - 1)``) and quantize their
input per tensor at ``a_bits``: unsigned ``[0, max]`` when calibration saw no
negative input (post-ReLU), else asymmetric ``[min, max]`` with a zero point
(SPEC section 7). ``bits`` always count the whole stored element, sign
included. The arithmetic is float emulation (``F.linear`` / ``F.conv2d`` on the
dequantized values), which is exactly what an integer pipeline with these
scales computes up to float rounding.

Built by :func:`dnateq.baselines.uniform_quantize`; ``from_float`` builds one
layer from a float layer and the activation range.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UniformLinear", "UniformConv2d", "MIN_BITS", "MAX_BITS", "weight_levels",
           "activation_params"]

MIN_BITS, MAX_BITS = 2, 16


def _check_bits(bits: Any, name: str) -> int:
    try:
        if isinstance(bits, bool):
            raise TypeError
        b = operator.index(bits)   # ints and numpy integers, not floats or strings
    except TypeError:
        raise TypeError(f"dnateq.baselines: {name} must be an int in [{MIN_BITS}, {MAX_BITS}], "
                        f"got {bits!r}") from None
    if not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"dnateq.baselines: {name} must be in [{MIN_BITS}, {MAX_BITS}] "
                         f"(total bits per element, sign included), got {b}")
    return b


def weight_levels(w_bits: int) -> int:
    """Largest integer magnitude of a symmetric INT-``w_bits`` weight."""
    return (1 << (w_bits - 1)) - 1


def activation_params(vmin: float, vmax: float, a_bits: int) -> Tuple[float, int, bool]:
    """``(scale, zero_point, signed)`` of a per-tensor activation quantizer for a
    traced range: unsigned when ``vmin >= 0`` (zero point 0, ``2^a_bits`` levels
    from 0), else asymmetric over ``[min(vmin, 0), max(vmax, 0)]`` so that zero
    stays exact."""
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise ValueError(f"dnateq.baselines: activation range must be finite, got "
                         f"[{vmin}, {vmax}]")
    top = (1 << a_bits) - 1
    signed = vmin < 0
    lo, hi = min(vmin, 0.0), max(vmax, 0.0)
    span = hi - lo
    if span <= 0:
        return 1.0, 0, signed
    scale = span / top
    zp = int(min(max(round(-lo / scale), 0), top))
    return float(scale), zp, signed


class _UniformBase(nn.Module):
    _kind = "?"

    def _init_common(self, weight: torch.Tensor, bias: Optional[torch.Tensor], w_bits: int,
                     a_bits: Optional[int], a_range: Optional[Tuple[float, float]]) -> None:
        self.w_bits = _check_bits(w_bits, "w_bits")
        self.a_bits = None if a_bits is None else _check_bits(a_bits, "a_bits")
        w = weight.detach().float()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("dnateq.baselines: the layer's weight has non-finite values")
        q = weight_levels(self.w_bits)
        amax = float(w.abs().max()) if w.numel() else 0.0
        self.w_scale = amax / q if amax > 0 else 1.0
        dt = torch.int8 if self.w_bits <= 8 else torch.int16
        self.register_buffer("w_int", torch.clamp(torch.round(w / self.w_scale), -q, q).to(dt))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.w_signed = bool((w < 0).any())
        if self.a_bits is not None:
            if a_range is None:
                raise ValueError("dnateq.baselines: a_range (traced min, max) is required when "
                                 "a_bits is given")
            self.a_scale, self.a_zero, self.a_signed = activation_params(
                float(a_range[0]), float(a_range[1]), self.a_bits)
        else:
            self.a_scale, self.a_zero, self.a_signed = 1.0, 0, True

    @property
    def weight_count(self) -> int:
        return int(self.w_int.numel())

    @property
    def w_shape(self):
        return list(self.w_int.shape)

    def dequantized_weight(self) -> torch.Tensor:
        return self.w_int.float() * self.w_scale

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the static activation parameters."""
        if self.a_bits is None:
            return x
        top = (1 << self.a_bits) - 1
        q = torch.clamp(torch.round(x / self.a_scale) + self.a_zero, 0, top)
        return (q - self.a_zero) * self.a_scale

    def _prep(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"dnateq.baselines: {type(self).__name__} expects a floating-point "
                            f"tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        dt = x.dtype
        xq = self.quantize_input(x.float())
        w = self.dequantized_weight().to(xq.device)
        b = None if self.bias is None else self.bias.to(xq.device)
        return xq, w, b, dt

    def params(self) -> Dict[str, Any]:
        return dict(w_bits=self.w_bits, a_bits=self.a_bits, w_scale=self.w_scale,
                    a_scale=self.a_scale, a_zero=self.a_zero, a_signed=self.a_signed,
                    w_signed=self.w_signed)

    def get_extra_state(self):
        return {"params": self.params()}

    def set_extra_state(self, state) -> None:
        p = state["params"]
        self.w_bits, self.a_bits, self.w_scale = int(p["w_bits"]), p["a_bits"], p["w_scale"]
        self.a_scale, self.a_zero, self.a_signed = p["a_scale"], p["a_zero"], p["a_signed"]
        self.w_signed = p["w_signed"]

    def extra_repr(self) -> str:
        return (f"w_shape={self.w_shape}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"a_signed={self.a_signed}")


class UniformLinear(_UniformBase):
    """``nn.Linear`` with INT-``w_bits`` weights and INT-``a_bits`` inputs (fake-quantized)."""

    _kind = "linear"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], w_bits: int,
                 a_bits: Optional[int] = None, a_range: Optional[Tuple[float, float]] = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"dnateq.baselines: UniformLinear weight must be 2-D, got "
                             f"{list(weight.shape)}")
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self._init_common(weight, bias, w_bits, a_bits, a_range)

    @classmethod
    def from_float(cls, module: nn.Linear, w_bits: int, a_bits: Optional[int] = None,
                   a_range: Optional[Tuple[float, float]] = None) -> "UniformLinear":
        return cls(module.weight, module.bias, w_bits, a_bits, a_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, w, b, dt = self._prep(x)
        return F.linear(xq, w, b).to(dt)


class UniformConv2d(_UniformBase):
    """``nn.Conv2d`` (zero padding) with INT-``w_bits`` weights and INT-``a_bits`` inputs."""

    _kind = "conv2d"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], w_bits: int,
                 a_bits: Optional[int] = None, a_range: Optional[Tuple[float, float]] = None,
                 stride=1, padding=0, dilation=1, groups: int = 1):
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"dnateq.baselines: UniformConv2d weight must be 4-D, got "
                             f"{list(weight.shape)}")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._init_common(weight, bias, w_bits, a_bits, a_range)

    @classmethod
    def from_float(cls, module: nn.Conv2d, w_bits: int, a_bits: Optional[int] = None,
                   a_range: Optional[Tuple[float, float]] = None) -> "UniformConv2d":
        if module.padding_mode != "zeros":
            raise ValueError(f"dnateq.baselines: only padding_mode='zeros' is supported, got "
                             f"{module.padding_mode!r}")
        return cls(module.weight, module.bias, w_bits, a_bits, a_range, module.stride,
                   module.padding, module.dilation, module.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, w, b, dt = self._prep(x)
        # Zero padding after quantization equals quantizing a padded input: the
        # quantizer maps 0 to 0 exactly (the zero point is an integer).
        return F.conv2d(xq, w, b, self.stride, self.padding, self.dilation,
                        self.groups).to(dt)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}")
