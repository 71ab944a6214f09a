"""Quantized modules: ``ExpLinear``, ``ExpConv2d`` and the float
``ExpMultiheadAttention`` whose Q/K/V/out projections are plain ``nn.Linear``s
(SPEC sections 4 and 6).

A quantized layer stores its weights as packed exponential codes (``uint8``
buffer ``w_packed`` plus ``w_shape``), the precomputed weight terms C2/C4
(``int32`` buffer ``w_terms``, SPEC section 4), the bias in float, and static
parameters: one base ``alpha`` shared by weights and activations, ``(sw, bw)``
for the weights, ``(sa, ba)`` for the activations, and ``bits`` (``n``).

``mode`` selects the execution path (all three agree, SPEC section 4):

- ``"lut"`` (default): ``dnateq.exp_linear_lut`` / ``exp_conv2d_lut`` — quantize
  the input, dequantize through level tables, native matmul/conv.
- ``"count"``: ``dnateq.exp_linear_count`` / ``exp_conv2d_count`` — the exact
  integer counting of Eq. 8 (the accelerator emulation); ``counter_bits``
  emulates saturating counters. Unsigned layers pass ``w_terms``.
- ``"fake"``: the pure-PyTorch oracle (:mod:`dnateq.reference`).

Per-output-channel weight parameters (SPEC section 9, docs/FORMAT.md):
``w_params=(alpha, S, beta)`` with ``S`` and ``beta`` tensors (or sequences) of
one value per output channel quantizes row ``j`` with ``(alpha, S[j], beta[j])``
and keeps them as float32 buffers ``w_scale``/``w_offset`` (``None`` for a
per-tensor layer); ``sw``/``bw`` then hold their means, for display only (the
operators ignore them).

Smoothing (SPEC section 9): the optional float32 buffer ``smooth`` (one factor
per input channel: ``[in_features]``, or ``[in_channels]`` for a conv; ``None``
= none) divides the input before it is quantized, ``x / smooth``, in every
mode. The pass that multiplies the weight's input columns by it and decides
where to fold it lives in the calibration (it is not done here).

The floating buffers (``bias``, ``w_scale``, ``w_offset``, ``smooth``) stay
float32 whatever ``.double()``/``.half()`` does to the model.

Gradients (for fine-tuning with the quantized layers in place): every mode
gives the input a straight-through estimate (the activation quantizer treated
as the identity: ``dL/dx = dL/dy @ W_hat``, the transposed conv for convs, with
``W_hat = dequantized_weight()``) and the bias (a float buffer; call
``layer.bias.requires_grad_()``) its exact gradient. The weights are codes and
stay frozen. See :mod:`dnateq.ops` ("Autograd").

A layer is *unsigned* (``a_signed=False``) when its calibration trace had no
negative input (post-ReLU); a negative input at run time is still computed
exactly (the operators detect it and count directly).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .. import reference as _ref

MODES = ("count", "lut", "fake")
ROUNDINGS = ("nearest", "log")

__all__ = ["ExpLinear", "ExpConv2d", "ExpMultiheadAttention", "MODES"]


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"dnateq: mode must be one of {MODES}, got {mode!r}")
    return mode


def _channel_vector(v, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v,
                        dtype=torch.float32).cpu()
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"dnateq: {name} must have {n} values (one per output channel), got "
                         f"shape {list(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"dnateq: {name} must be finite")
    return t.clone()


def _w_params(p, n_out: int):
    """(alpha, S, beta, w_scale, w_offset): per-tensor (scalars; tensors None) or
    per-channel (S, beta given as [n_out] vectors; the scalars are their means)."""
    try:
        vals = tuple(p)
    except TypeError:
        raise TypeError(f"dnateq: w_params must be a tuple (alpha, scale, offset), got {p!r}") from None
    if len(vals) == 3 and any(isinstance(v, (torch.Tensor, list, tuple)) and
                              torch.as_tensor(v).dim() > 0 for v in vals[1:]):
        alpha = _params3((vals[0], 1.0, 0.0), "w_params")[0]
        S = _channel_vector(vals[1], n_out, "w_params scale")
        B = _channel_vector(vals[2], n_out, "w_params offset")
        if not bool((S > 0).all()):
            raise ValueError("dnateq: w_params scale must be > 0 for every output channel")
        return alpha, float(S.double().mean()), float(B.double().mean()), S, B
    alpha, sw, bw = _params3(p, "w_params")
    return alpha, sw, bw, None, None


def _params3(p, name: str) -> Tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in p)
    except TypeError:
        raise TypeError(f"dnateq: {name} must be a tuple (alpha, scale, offset), got {p!r}") from None
    if len(vals) != 3:
        raise ValueError(f"dnateq: {name} must be (alpha, scale, offset), got {p!r}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"dnateq: {name} must be finite, got {vals}")
    if vals[0] <= 1.0:
        raise ValueError(f"dnateq: {name} alpha must be > 1, got {vals[0]}")
    if vals[1] <= 0.0:
        raise ValueError(f"dnateq: {name} scale must be > 0, got {vals[1]}")
    return vals


def _lut_dispatch(x: torch.Tensor, bias: Optional[torch.Tensor]):
    """Context for a "lut" op call: when no gradient can be recorded (no_grad, or
    neither x nor the bias requires one), call the op below the Autograd key,
    skipping the Python autograd kernel of ``torch.library.register_autograd``
    (about 15-20 us a call, the size of a batch-1 ResNet-20 conv's work).
    Under torch.compile the op is traced as is."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad))):
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


# The overloads the eager "lut" forward calls (ops is imported, so _C is loaded):
# their bound C++ callables where this torch exposes them (``OpOverload._op``,
# which ``OpOverload.__call__`` only forwards to: one Python frame less a call).
_LINEAR_LUT = torch.ops.dnateq.exp_linear_lut.default
_CONV2D_LUT = torch.ops.dnateq.exp_conv2d_lut.default
_LINEAR_LUT = getattr(_LINEAR_LUT, "_op", _LINEAR_LUT)
_CONV2D_LUT = getattr(_CONV2D_LUT, "_op", _CONV2D_LUT)

# Input dtypes the LUT ops take as they are (their output has the input's dtype).
_LUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _version(t: torch.Tensor) -> Optional[int]:
    """t's version counter (None for inference tensors, which keep none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _eager_lut_ok(x, buffers: Dict[str, Optional[torch.Tensor]]) -> bool:
    """Whether a "lut" forward may take the eager inference path (``_ExpBase._eager_lut``):
    a plain tensor of a dtype the op takes, no gradient to record (x, the bias and
    the smoothing vector), and not traced by torch.compile (which must see the
    public op, its fake and its autograd)."""
    if type(x) is not torch.Tensor or x.dtype not in _LUT_DTYPES:
        return False
    if torch.is_grad_enabled():
        if x.requires_grad:
            return False
        for name in ("bias", "smooth"):
            t = buffers[name]
            if t is not None and t.requires_grad:
                return False
    return not torch.compiler.is_compiling()


class _ExpBase(nn.Module):
    """Shared state and helpers of the quantized layers."""

    _kind = "?"

    # ``mode`` is checked whenever it is set, also after construction (a typo
    # must not silently run another path).
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _check_mode(value)

    def _init_common(self, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                     w_params, a_params, a_signed: bool, rounding: str, mode: str,
                     search: str = "golden", info: Optional[Dict[str, Any]] = None) -> None:
        bits = int(bits)
        if not 2 <= bits <= 7:
            raise ValueError(f"dnateq: bits must be in [2, 7], got {bits}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"dnateq: rounding must be one of {ROUNDINGS}, got {rounding!r}")
        w = weight.detach().float()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("dnateq: the layer's weight has non-finite values")
        w_scale = w_offset = None
        if w_params is None:
            alpha, sw, bw, _ = ops.exp_fit(w, bits, search, rounding)
        else:
            alpha, sw, bw, w_scale, w_offset = _w_params(w_params, w.shape[0])
        if a_params is None:
            raise ValueError("dnateq: a_params (activation parameters) are required; "
                             "use dnateq.quantize(model, loader) to calibrate them")
        a_params = tuple(a_params)
        if len(a_params) == 2:
            a_params = (alpha,) + a_params
        aa, sa, ba = _params3(a_params, "a_params")
        if abs(aa - alpha) > 1e-12 * alpha:
            raise ValueError(f"dnateq: weights and activations must share alpha, got "
                             f"{alpha} (w_params) and {aa} (a_params)")
        self.bits = bits
        self.alpha, self.sw, self.bw, self.sa, self.ba = (float(alpha), float(sw), float(bw),
                                                           float(sa), float(ba))
        self.a_signed = bool(a_signed)
        self.w_signed = bool((w < 0).any())
        self.rounding = rounding
        self.mode = _check_mode(mode)
        self.counter_bits: Optional[int] = None
        self.w_shape = list(w.shape)
        if w_scale is None:
            codes = ops.exp_quantize(w, self.alpha, self.sw, self.bw, bits, rounding)
        else:   # row j with its own (S_j, beta_j), the float32 values the ops read
            wc = w.cpu()
            codes = torch.stack([ops.exp_quantize(wc[j], self.alpha, float(w_scale[j]),
                                                  float(w_offset[j]), bits, rounding)
                                 for j in range(w.shape[0])]).to(w.device)
        self.register_buffer("w_packed", ops.exp_pack(codes, bits, self.w_signed))
        self.register_buffer("w_terms", ops.weight_terms(codes, bits))
        # The CPU fast path's offline layout of w_packed (SPEC section 9), rebuilt
        # whenever w_packed changes (see _lut_layout).
        self.register_buffer("w_layout", None)
        self._layout_key = None
        self._refresh_layout()
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("w_scale", None if w_scale is None else w_scale.to(w.device))
        self.register_buffer("w_offset", None if w_offset is None else w_offset.to(w.device))
        self.register_buffer("smooth", None)
        # Calibration facts for dnateq.report (errors, RSS, starting tensor).
        self.info: Dict[str, Any] = dict(info or {})

    # -- helpers ---------------------------------------------------------------
    @property
    def weight_count(self) -> int:
        return int(math.prod(self.w_shape))

    def w_codes(self) -> torch.Tensor:
        """The unpacked int8 weight codes."""
        return ops.exp_unpack(self.w_packed, self.bits, self.w_signed, self.w_shape)

    @property
    def per_channel(self) -> bool:
        """Whether the weights carry per-output-channel parameters (w_scale/w_offset)."""
        return self.w_scale is not None

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weights the layer computes with (with smoothing, these
        multiply ``x / smooth``)."""
        if self.per_channel:
            return _ref.dequantize_channels(self.w_codes(), self.alpha, self.w_scale,
                                            self.w_offset, self.bits)
        return ops.exp_dequantize(self.w_codes(), self.alpha, self.sw, self.bw, self.bits)

    def set_smooth(self, smooth: Optional[torch.Tensor]) -> None:
        """Set (or clear with None) the per-input-channel smoothing vector: the layer
        computes with ``x / smooth``. The weights are not changed here."""
        if smooth is None:
            self.smooth = None
            return
        n = self._smooth_len()
        t = _channel_vector(smooth, n, "smooth")
        if not bool((t > 0).all()):
            raise ValueError("dnateq: smooth must be > 0 for every input channel")
        self.smooth = t.to(self.w_packed.device)

    def _smooth_len(self) -> int:
        return self.w_shape[1]

    def _smoothed(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.smooth is None:
            return x
        shape = [1] * x.dim()
        shape[dim] = -1
        return x.float() / self.smooth.reshape(shape)

    def _channel_kwargs(self) -> Dict[str, Any]:
        return {"w_scale": self.w_scale, "w_offset": self.w_offset}

    def _apply(self, fn, *args, **kwargs):
        # .double()/.half() etc. cast floating buffers; the operators read them as
        # float32, so cast ours back (devices still follow fn).
        super()._apply(fn, *args, **kwargs)
        for name in ("bias", "w_scale", "w_offset", "smooth"):
            t = self._buffers.get(name)
            if t is not None and t.dtype != torch.float32:
                self._buffers[name] = t.float()
        return self

    def params(self) -> Dict[str, Any]:
        return dict(bits=self.bits, alpha=self.alpha, sw=self.sw, bw=self.bw, sa=self.sa,
                    ba=self.ba, a_signed=self.a_signed, w_signed=self.w_signed,
                    rounding=self.rounding, w_shape=list(self.w_shape),
                    per_channel=self.per_channel, smooth=self.smooth is not None)

    def _refresh_layout(self) -> None:
        """(Re)build ``w_layout`` from ``w_packed`` (CPU weights only; None elsewhere)."""
        wp = self.w_packed
        if wp is None or wp.device.type != "cpu":
            self.w_layout = None
        else:
            self.w_layout = ops.exp_lut_layout(wp, self.w_shape, self.bits, self.w_signed)
        self._layout_key = self._layout_state()

    def _layout_state(self):
        """What the layout was built from: the w_packed and w_layout objects (held, so
        an identity cannot be reused), their data pointers and version counters
        (in-place writes: load_state_dict, copy_)."""
        b = self._buffers   # not nn.Module.__getattr__: this runs on every "lut" call
        wp, lay = b["w_packed"], b["w_layout"]
        return (wp, _version(wp), wp.data_ptr(),
                lay, None if lay is None else _version(lay), None if lay is None else lay.data_ptr())

    def _layout_current(self) -> bool:
        """Whether w_packed and w_layout are the tensors, unchanged, the layout was built
        from: the per-call check of the eager "lut" path, compared field by field so
        that the common case costs a few attribute reads."""
        key = self.__dict__["_layout_key"]
        b = self._buffers
        wp, lay = b["w_packed"], b["w_layout"]
        return (key is not None and key[0] is wp and key[3] is lay
                and key[1] == _version(wp) and key[2] == wp.data_ptr()
                and (lay is None or (key[4] == _version(lay) and key[5] == lay.data_ptr())))

    def _lut_layout(self) -> Optional[torch.Tensor]:
        """The layout for a "lut" forward: rebuilt first when w_packed or the layout
        changed since it was built (assignment, load_state_dict, .to())."""
        if torch.compiler.is_compiling():
            return self.w_layout
        return self._fresh_layout()

    def _fresh_layout(self) -> Optional[torch.Tensor]:
        """w_layout, rebuilt first if stale (eager code only: it reads version counters)."""
        if not self._layout_current():
            self._refresh_layout()
        return self._buffers["w_layout"]

    def _eager_lut(self, op, x: torch.Tensor, dim: int, geometry: tuple) -> torch.Tensor:
        """The "lut" forward of inference (``_eager_lut_ok``): the operator's
        ``.default`` overload called positionally below the Autograd key, with the
        arguments read from ``__dict__`` / ``_buffers``. The result is the one of the
        public path (same kernel, same arguments); what it skips is Python: the
        wrapper's argument conversion, ``nn.Module.__getattr__`` per buffer, the
        overload resolution and the autograd kernel (about 10-25 us a call, as much
        as a batch-1 ResNet-20 conv's work)."""
        d = self.__dict__
        b = d["_buffers"]
        dt = x.dtype
        smooth = b["smooth"]
        if smooth is not None:
            shape = [1] * x.dim()
            shape[dim] = -1
            x = x.float() / smooth.reshape(shape)
        lay = self._fresh_layout()   # (not compiling: _eager_lut_ok checked)
        args = (x, b["w_packed"], d["w_shape"], d["alpha"], d["sa"], d["ba"], d["sw"], d["bw"],
                d["bits"], d["a_signed"], d["w_signed"], d["rounding"], b["bias"], *geometry,
                b["w_scale"], b["w_offset"], lay)
        if torch.is_inference_mode_enabled():   # no autograd key to skip (the guard costs ~1 us)
            y = op(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                y = op(*args)
        return y if y.dtype == dt else y.to(dt)

    def resident_weight_bytes(self) -> int:
        """Bytes of the weight state the layer keeps resident: packed codes, the
        fast-path layout, the count path's weight terms and the bias (no float
        copy of the weights is kept)."""
        ts = [self.w_packed, self.w_layout, self.w_terms, self.bias]
        ts += [getattr(self, k, None) for k in ("w_scale", "w_offset", "smooth")]
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

    def get_extra_state(self):
        return {"params": self.params(), "mode": self.mode, "counter_bits": self.counter_bits,
                "info": dict(self.info)}

    def set_extra_state(self, state) -> None:
        p = state["params"]
        self.bits, self.alpha, self.sw, self.bw = int(p["bits"]), p["alpha"], p["sw"], p["bw"]
        self.sa, self.ba = p["sa"], p["ba"]
        self.a_signed, self.w_signed = bool(p["a_signed"]), bool(p["w_signed"])
        self.rounding, self.w_shape = p["rounding"], list(p["w_shape"])
        self.mode = _check_mode(state.get("mode", "lut"))
        self.counter_bits = state.get("counter_bits")
        self.info = dict(state.get("info", {}))

    def _prep_input(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.dtype]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"dnateq: {type(self).__name__} expects a floating-point tensor, "
                            f"got {getattr(x, 'dtype', type(x).__name__)}")
        dt = x.dtype
        if dt not in (torch.float32, torch.float16, torch.bfloat16):
            x = x.float()
        return x, dt

    def _count_terms(self):
        return None if self.a_signed else self.w_terms

    def extra_repr(self) -> str:
        extra = ""
        if self.per_channel:
            extra += (f", per_channel=True (S_w {float(self.w_scale.min()):.4g}.."
                      f"{float(self.w_scale.max()):.4g})")
        if self.smooth is not None:
            extra += ", smooth=True"
        return (f"w_shape={self.w_shape}, bits={self.bits}, alpha={self.alpha:.6g}, "
                f"a_signed={self.a_signed}, w_signed={self.w_signed}, "
                f"rounding={self.rounding!r}, mode={self.mode!r}" + extra)


class ExpLinear(_ExpBase):
    """A DNA-TEQ quantized ``nn.Linear`` (see the module docstring)."""

    _kind = "Linear"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                 w_params=None, a_params=None, a_signed: bool = True,
                 rounding: str = "nearest", mode: str = "lut", search: str = "golden",
                 info: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"dnateq: ExpLinear weight must be 2-D, got {list(weight.shape)}")
        self._init_common(weight, bias, bits, w_params, a_params, a_signed, rounding, mode,
                          search, info)
        self.out_features, self.in_features = self.w_shape

    @classmethod
    def from_float(cls, module: nn.Linear, bits: int, w_params=None, a_params=None,
                   a_signed: bool = True, rounding: str = "nearest", mode: str = "lut",
                   search: str = "golden", info: Optional[Dict[str, Any]] = None) -> "ExpLinear":
        """Quantize ``module``'s weights with ``w_params = (alpha, S, beta)`` (fitted with
        ``exp_fit`` when None) and use static activation parameters ``a_params``
        (``(alpha, S, beta)`` with the same alpha, or ``(S, beta)``)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"dnateq: ExpLinear.from_float expects nn.Linear, got "
                            f"{type(module).__name__}")
        return cls(module.weight, module.bias, bits, w_params, a_params, a_signed, rounding,
                   mode, search, info).to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.__dict__["_mode"] == "lut" and _eager_lut_ok(x, self._buffers):
            if x.dim() == 0 or x.shape[-1] != self.in_features:
                raise ValueError(f"dnateq: ExpLinear expects input [*, {self.in_features}], "
                                 f"got {list(x.shape)}")
            return self._eager_lut(_LINEAR_LUT, x, -1, ())
        x, dt = self._prep_input(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"dnateq: ExpLinear expects input [*, {self.in_features}], "
                             f"got {list(x.shape)}")
        x = self._smoothed(x, -1)
        mode = self.mode
        pc = self._channel_kwargs()
        if mode == "lut":
            lay = self._lut_layout()
            with _lut_dispatch(x, self.bias):
                y = ops.exp_linear_lut(x, self.w_packed, self.w_shape, self.alpha, self.sa,
                                       self.ba, self.sw, self.bw, self.bits, self.a_signed,
                                       self.w_signed, self.rounding, self.bias, w_layout=lay,
                                       **pc)
        elif mode == "count":
            a = ops.exp_quantize(x, self.alpha, self.sa, self.ba, self.bits, self.rounding)
            y = ops.exp_linear_count(a, self.w_codes(), self.alpha, self.sa, self.ba, self.sw,
                                     self.bw, self.bits, self.bias, self.counter_bits,
                                     self._count_terms(), **pc)
            y = ops.straight_through(y, x, self.dequantized_weight)
        else:
            y = _ref.exp_linear_lut(x, self.w_packed, self.w_shape, self.alpha, self.sa,
                                    self.ba, self.sw, self.bw, self.bits, self.a_signed,
                                    self.w_signed, self.rounding, self.bias, **pc)
            y = ops.straight_through(y, x, self.dequantized_weight)
        return y.to(dt)


def _same_pads(k: Sequence[int], d: Sequence[int]):
    """(before, after) for each spatial dim for padding='same' (PyTorch's split:
    the extra element goes after)."""
    out = []
    for ki, di in zip(k, d):
        total = di * (ki - 1)
        out.append((total // 2, total - total // 2))
    return out


class ExpConv2d(_ExpBase):
    """A DNA-TEQ quantized ``nn.Conv2d`` (zero padding only; ``padding="same"`` with
    even kernels pads the input asymmetrically first, zeros being zero codes)."""

    _kind = "Conv2d"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                 w_params=None, a_params=None, a_signed: bool = True,
                 rounding: str = "nearest", mode: str = "lut", stride=1, padding=0,
                 dilation=1, groups: int = 1, search: str = "golden",
                 info: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"dnateq: ExpConv2d weight must be 4-D, got {list(weight.shape)}")
        self._init_common(weight, bias, bits, w_params, a_params, a_signed, rounding, mode,
                          search, info)
        self.stride = _pair2(stride)
        self.dilation = _pair2(dilation)
        self.groups = int(groups)
        self.out_channels = self.w_shape[0]
        self.in_channels = self.w_shape[1] * self.groups
        self.kernel_size = tuple(self.w_shape[2:])
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"dnateq: padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("dnateq: padding='same' needs stride 1")
            self.padding = padding
        else:
            self.padding = _pair2(padding)

    @classmethod
    def from_float(cls, module: nn.Conv2d, bits: int, w_params=None, a_params=None,
                   a_signed: bool = True, rounding: str = "nearest", mode: str = "lut",
                   search: str = "golden", info: Optional[Dict[str, Any]] = None) -> "ExpConv2d":
        """See :meth:`ExpLinear.from_float`. Convs with ``padding_mode != "zeros"`` are
        refused (``dnateq.quantize`` leaves them in float)."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"dnateq: ExpConv2d.from_float expects nn.Conv2d, got "
                            f"{type(module).__name__}")
        if module.padding_mode != "zeros":
            raise ValueError(f"dnateq: cannot quantize a Conv2d with padding_mode="
                             f"{module.padding_mode!r} (only 'zeros')")
        return cls(module.weight, module.bias, bits, w_params, a_params, a_signed, rounding,
                   mode, module.stride, module.padding, module.dilation, module.groups,
                   search, info).to(module.weight.device)

    def _geometry(self, x: torch.Tensor):
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return x, (0, 0)
            (t, b), (l, r) = _same_pads(self.kernel_size, self.dilation)
            if t == b and l == r:
                return x, (t, l)
            return F.pad(x, (l, r, t, b)), (0, 0)
        return x, self.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.__dict__
        if d["_mode"] == "lut" and _eager_lut_ok(x, self._buffers):
            if x.dim() != 4 or x.shape[1] != d["in_channels"]:
                raise ValueError(f"dnateq: ExpConv2d expects input [N, {self.in_channels}, "
                                 f"H, W], got {list(x.shape)}")
            x, pad = self._geometry(x) if isinstance(d["padding"], str) else (x, d["padding"])
            return self._eager_lut(_CONV2D_LUT, x, 1, (d["stride"], pad, d["dilation"],
                                                       d["groups"]))
        x, dt = self._prep_input(x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"dnateq: ExpConv2d expects input [N, {self.in_channels}, H, W], "
                             f"got {list(x.shape)}")
        x = self._smoothed(x, 1)
        x, pad = self._geometry(x)
        mode = self.mode
        pc = self._channel_kwargs()
        if mode == "lut":
            lay = self._lut_layout()
            with _lut_dispatch(x, self.bias):
                y = ops.exp_conv2d_lut(x, self.w_packed, self.w_shape, self.alpha, self.sa,
                                       self.ba, self.sw, self.bw, self.bits, self.a_signed,
                                       self.w_signed, self.rounding, self.bias, self.stride,
                                       pad, self.dilation, self.groups, w_layout=lay, **pc)
        elif mode == "count":
            a = ops.exp_quantize(x, self.alpha, self.sa, self.ba, self.bits, self.rounding)
            y = ops.exp_conv2d_count(a, self.w_codes(), self.alpha, self.sa, self.ba, self.sw,
                                     self.bw, self.bits, self.bias, self.stride, pad,
                                     self.dilation, self.groups, self.counter_bits,
                                     self._count_terms(), **pc)
            y = ops.straight_through(y, x, self.dequantized_weight,
                                     (self.stride, pad, self.dilation, self.groups))
        else:
            y = _ref.exp_conv2d_lut(x, self.w_packed, self.w_shape, self.alpha, self.sa,
                                    self.ba, self.sw, self.bw, self.bits, self.a_signed,
                                    self.w_signed, self.rounding, self.bias, self.stride, pad,
                                    self.dilation, self.groups, **pc)
            y = ops.straight_through(y, x, self.dequantized_weight,
                                     (self.stride, pad, self.dilation, self.groups))
        return y.to(dt)

    def _smooth_len(self) -> int:
        return self.in_channels

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}")


def _pair2(v) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(t) for t in v)
    return v if len(v) == 2 else (v[0], v[0])


class ExpMultiheadAttention(nn.Module):
    """A float ``nn.MultiheadAttention`` with explicit ``q_proj``, ``k_proj``,
    ``v_proj`` and ``out_proj`` ``nn.Linear`` submodules (SPEC section 3, item 7).

    ``from_float(mha)`` splits the packed in-projection; the result computes the
    same function as the original (the attention core follows
    ``F.multi_head_attention_forward``), and ``dnateq.quantize`` then quantizes
    the four Linears like any other. The module never takes PyTorch's fused
    fast paths (``in_proj_weight`` is None).
    """

    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError("dnateq: embed_dim must be divisible by num_heads")
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "ExpMultiheadAttention":
        """The float equivalent of ``mha`` with separate projections (weights copied)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"dnateq: expects nn.MultiheadAttention, got {type(mha).__name__}")
        E = mha.embed_dim
        p = mha.out_proj.weight
        new = cls(E, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn,
                  kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
                  device=p.device, dtype=p.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            new.q_proj.weight.copy_(wq)
            new.k_proj.weight.copy_(wk)
            new.v_proj.weight.copy_(wv)
            if mha.in_proj_bias is not None:
                bq, bk, bv = mha.in_proj_bias.chunk(3)
                new.q_proj.bias.copy_(bq)
                new.k_proj.bias.copy_(bk)
                new.v_proj.bias.copy_(bv)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
            if mha.bias_k is not None:
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, w = self._mha(query, key, value, key_padding_mask, need_weights, attn_mask,
                           average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), w
        return out, w

    def _mha(self, query, key, value, key_padding_mask, need_weights, attn_mask,
             average_attn_weights, is_causal):
        # Follows torch.nn.functional.multi_head_attention_forward, with the
        # projections done by the (possibly quantized) submodules.
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask,
                                        num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                          other_name="", target_type=query.dtype,
                                          check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, "
                                 f"but got {embed_dim}")
        head_dim = self.head_dim
        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        src_len = k.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, "
                                       f"but should be {(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but "
                                       f"should be {(bsz * num_heads, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zs = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zs, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zs, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, "
                                     f"but got {key_padding_mask.shape}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len)
                                .expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            _B, _Nt, E = q.shape
            q_scaled = q * math.sqrt(1.0 / float(E))
            if attn_mask is not None:
                w = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                w = torch.bmm(q_scaled, k.transpose(-2, -1))
            w = F.softmax(w, dim=-1)
            if dropout_p > 0.0:
                w = F.dropout(w, p=dropout_p)
            out = torch.bmm(w, v)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out)
            out = out.view(tgt_len, bsz, out.size(1))
            w = w.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                w = w.mean(dim=1)
            if not is_batched:
                out, w = out.squeeze(1), w.squeeze(0)
            return out, w
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.reshape(bsz, num_heads, tgt_len, head_dim)
        k = k.reshape(bsz, num_heads, src_len, head_dim)
        v = v.reshape(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out)
        out = out.view(tgt_len, bsz, out.size(1))
        if not is_batched:
            out = out.squeeze(1)
        return out, None
