"""Layer shapes of a real forward pass, for the hardware cost model.

:func:`trace_layers` runs ``model`` once on ``example_input`` (eval mode,
``torch.no_grad()``, the model's train/eval flags restored afterwards) with
forward hooks on every layer the accelerator runs:

- DNA-TEQ layers :class:`dnateq.nn.ExpLinear` / :class:`dnateq.nn.ExpConv2d`
  (their bits, signedness and parameters come from the module);
- float ``nn.Linear`` / ``nn.Conv2d`` (run as INT8 on both designs);
- float ``nn.MultiheadAttention``, whose packed projections never go through
  a module call: one hook on the attention module yields four Linear rows
  named ``<name>.q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` (the names
  :class:`dnateq.nn.ExpMultiheadAttention` gives them, so a float model and
  its quantized version line up).

Each call of a layer is one :class:`LayerShape` (a module called twice is
two rows: its weights are fetched twice). Per row the dot-product geometry:
``K`` inputs per output, ``N`` output channels, ``P`` output positions (batch
x spatial positions for a conv, all leading dimensions for a Linear), and,
from the real input, the zero counts that size the run-time correction of
unsigned DNA-TEQ layers (SPEC section 4): ``corr_updates`` is the sum over
outputs of ``min(z, K - z)``, ``z`` being the zero codes (exact zeros and
zero padding) in that output's window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._common import describe, to_device
from .._common import model_device as _device_of
from ..nn.modules import ExpConv2d, ExpLinear, ExpMultiheadAttention

__all__ = ["LayerShape", "trace_layers", "conv_pads"]


@dataclass
class LayerShape:
    """The geometry and quantization facts of one layer call (see the module doc)."""

    name: str
    kind: str                      # "Linear" or "Conv2d"
    module: str                    # class name of the module
    quantized: bool                # a DNA-TEQ layer (else INT8 on both designs)
    K: int                         # inputs per output (dot-product length)
    N: int                         # output channels / features
    P: int                         # output positions (incl. batch)
    in_elems: int                  # elements of the layer's input tensor
    out_elems: int                 # elements of its output (= N * P)
    weights: int                   # weight elements
    bias: int                      # bias elements (0 without bias)
    w_shape: List[int]
    in_shape: List[int]
    out_shape: List[int]
    bits: Optional[int] = None     # DNA-TEQ exponent bits n (None for float layers)
    a_signed: bool = True          # activation format has a sign bit
    w_signed: bool = True          # weight format has a sign bit
    input_negative: bool = False   # the traced input had a negative element
    zero_frac: float = 0.0         # zero codes per window position (padding included)
    corr_updates: int = 0          # sum over outputs of min(z, K - z)
    to_attention: bool = False     # output feeds an attention core (Q/K/V projection)
    call: int = 0                  # 0 for the first call of the module, 1, 2 ...
    geometry: Dict[str, Any] = field(default_factory=dict)   # stride, padding, ...
    repeat: int = 1                # identical calls this row stands for (decoder steps)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LayerShape":
        """The inverse of :meth:`to_dict` (unknown keys are an error naming them)."""
        names = set(cls.__dataclass_fields__)
        bad = [k for k in d if k not in names]
        if bad:
            raise ValueError(f"dnateq.hw: LayerShape.from_dict: unknown field(s) {bad}")
        return cls(**dict(d))


def conv_pads(module: nn.Module, kernel: Tuple[int, int], dilation: Tuple[int, int]
              ) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of a conv (``padding`` ints,
    ``"valid"``, or ``"same"`` with PyTorch's split: the odd element goes after)."""
    p = module.padding
    if isinstance(p, str):
        if p == "valid":
            return (0, 0, 0, 0)
        tot = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return (tot[0] // 2, tot[0] - tot[0] // 2, tot[1] // 2, tot[1] - tot[1] // 2)
    ph, pw = (p, p) if isinstance(p, int) else (int(p[0]), int(p[-1]))
    return (ph, ph, pw, pw)


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(t) for t in v)
    return (v[0], v[-1])


def _linear_zero_stats(x: torch.Tensor, K: int, N: int) -> Tuple[float, int]:
    z = (x.detach().reshape(-1, K) == 0).sum(dim=1).to(torch.int64)
    corr = int(torch.minimum(z, K - z).sum()) * N
    frac = float(z.sum()) / max(1, z.numel() * K)
    return frac, corr


def _conv_zero_stats(x: torch.Tensor, module: nn.Module, w_shape: List[int]) -> Tuple[float, int]:
    """Zero codes per output window, exactly: convolve the zero mask (padding
    counts as zero codes) with a ones kernel per group."""
    O, Cg, kh, kw = w_shape
    groups = int(module.groups)
    stride, dilation = _pair(module.stride), _pair(module.dilation)
    t, b, l, r = conv_pads(module, (kh, kw), dilation)
    mask = (x.detach() == 0).to(torch.float32)
    if t or b or l or r:
        mask = F.pad(mask, (l, r, t, b), value=1.0)
    ones = torch.ones(groups, Cg, kh, kw, dtype=torch.float32, device=mask.device)
    z = F.conv2d(mask, ones, None, stride, 0, dilation, groups)      # [B, G, Ho, Wo]
    z = z.round().to(torch.int64)
    K = Cg * kh * kw
    per_group_channels = O // groups
    corr = int(torch.minimum(z, K - z).sum()) * per_group_channels
    frac = float(z.sum()) / max(1, z.numel() * K)
    return frac, corr


def _first_tensor(x: Any) -> Optional[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(x, dict):
        for v in x.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def check_example_input(example_input: Any, who: str) -> None:
    """A tensor (``model(x)``), a non-empty tuple/list (``model(*x)``) or a dict
    (``model(**x)``) holding at least one tensor; else a ``TypeError`` / ``ValueError``."""
    if isinstance(example_input, torch.Tensor):
        return
    if isinstance(example_input, (tuple, list, dict)):
        if len(example_input) == 0:
            raise ValueError(f"{who}: example_input is an empty {type(example_input).__name__}; "
                             "pass a tensor, a tuple of positional arguments or a dict of "
                             "keyword arguments")
        if _first_tensor(example_input) is None:
            raise TypeError(f"{who}: example_input holds no tensor "
                            f"({describe(example_input)})")
        return
    raise TypeError(f"{who}: example_input must be a tensor, a tuple/list of positional "
                    f"arguments or a dict of keyword arguments, got "
                    f"{type(example_input).__name__}")


def _mha_rows(name: str, mha: nn.MultiheadAttention, args, kwargs) -> List[LayerShape]:
    """Four Linear rows for a float nn.MultiheadAttention call."""
    def arg(i, key):
        if len(args) > i:
            return args[i]
        return kwargs.get(key)
    q, k, v = arg(0, "query"), arg(1, "key"), arg(2, "value")
    E = int(mha.embed_dim)
    has_bias = mha.in_proj_bias is not None
    rows = []
    pre = f"{name}." if name else ""
    specs = [("q_proj", q, E), ("k_proj", k, int(mha.kdim)), ("v_proj", v, int(mha.vdim))]
    for sub, x, kin in specs:
        P = x.numel() // kin
        frac, corr = _linear_zero_stats(x, kin, E)
        rows.append(LayerShape(
            name=f"{pre}{sub}", kind="Linear", module="MultiheadAttention", quantized=False,
            K=kin, N=E, P=P, in_elems=int(x.numel()), out_elems=P * E, weights=E * kin,
            bias=E if has_bias else 0, w_shape=[E, kin], in_shape=list(x.shape),
            out_shape=list(x.shape[:-1]) + [E], input_negative=bool((x < 0).any()),
            zero_frac=frac, corr_updates=corr, to_attention=True))
    Pq = q.numel() // E
    ob = mha.out_proj.bias is not None
    rows.append(LayerShape(
        name=f"{pre}out_proj", kind="Linear", module="MultiheadAttention", quantized=False,
        K=E, N=E, P=Pq, in_elems=Pq * E, out_elems=Pq * E, weights=E * E,
        bias=E if ob else 0, w_shape=[E, E], in_shape=list(q.shape), out_shape=list(q.shape),
        geometry={"note": "input is the attention core's output (not traced)"}))
    return rows


def trace_layers(model: nn.Module, example_input: Any, who: str = "dnateq.hw"
                 ) -> Tuple[List[LayerShape], List[str]]:
    """Run ``model`` on ``example_input`` once and return ``(rows, notes)``: one
    :class:`LayerShape` per layer call in execution order, and notes (layers that
    did not run, attention cores not modelled)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: qmodel must be an nn.Module, got {type(model).__name__}")
    check_example_input(example_input, who)

    named = dict(model.named_modules())
    float_mha = {n for n, m in named.items() if isinstance(m, nn.MultiheadAttention)}
    exp_mha = {n for n, m in named.items() if isinstance(m, ExpMultiheadAttention)}

    def inside(n: str, parents) -> bool:
        return any(n.startswith(p + ".") for p in parents if p) or ("" in parents and n != "")

    targets: Dict[str, nn.Module] = {}
    for n, m in named.items():
        if isinstance(m, nn.MultiheadAttention):
            targets[n] = m
        elif isinstance(m, (ExpLinear, ExpConv2d, nn.Linear, nn.Conv2d)):
            if inside(n, float_mha):
                continue   # F.multi_head_attention_forward uses the weights directly
            targets[n] = m
    if not targets:
        raise ValueError(f"{who}: qmodel has no layer the accelerator runs (dnateq.nn.ExpLinear/"
                         f"ExpConv2d, nn.Linear, nn.Conv2d, nn.MultiheadAttention)")

    rows: List[LayerShape] = []
    calls: Dict[str, int] = {}

    def make_hook(name: str, mod: nn.Module):
        def hook(m, args, kwargs, out):
            c = calls.get(name, 0)
            calls[name] = c + 1
            if isinstance(m, nn.MultiheadAttention):
                new = _mha_rows(name, m, args, kwargs)
            else:
                x = args[0] if args else next(iter(kwargs.values()))
                y = out
                new = [_layer_row(name, m, x, y)]
            for r in new:
                r.call = c
                if c:
                    r.name = f"{r.name}[call {c + 1}]"
            rows.extend(new)
        return hook

    # Fused Transformer fast paths call the weights directly and bypass the
    # submodules' hooks: gate them off for this pass (documented per-instance
    # flags), restoring every value afterwards.
    saved_flags: List[Tuple[nn.Module, str, Any]] = []
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and hasattr(m, "use_nested_tensor"):
            saved_flags.append((m, "use_nested_tensor", m.use_nested_tensor))
            m.use_nested_tensor = False
        if isinstance(m, nn.TransformerEncoderLayer) and hasattr(m, "activation_relu_or_gelu"):
            saved_flags.append((m, "activation_relu_or_gelu", m.activation_relu_or_gelu))
            m.activation_relu_or_gelu = 0
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(make_hook(n, m), with_kwargs=True)
               for n, m in targets.items()]
    dev = _device_of(model, None)
    x = to_device(example_input, dev) if dev is not None else example_input
    try:
        model.eval()
        with torch.no_grad():
            try:
                if isinstance(x, torch.Tensor):
                    model(x)
                elif isinstance(x, dict):
                    model(**x)
                else:
                    model(*x)
            except Exception as e:
                raise RuntimeError(f"{who}: the model cannot take example_input "
                                   f"({describe(example_input)}): {type(e).__name__}: {e}"
                                   ) from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
        for m, attr, v in saved_flags:
            setattr(m, attr, v)

    if not rows:
        raise ValueError(f"{who}: example_input ran no layer the accelerator runs "
                         f"(no Linear/Conv2d/MultiheadAttention was called)")
    # Q/K/V projections of a split attention feed its core, not the next Linear.
    for r in rows:
        base = r.name.split("[call ")[0]
        parent, _, attr = base.rpartition(".")
        if parent in exp_mha and attr in ("q_proj", "k_proj", "v_proj"):
            r.to_attention = True
    notes: List[str] = []
    idle = [n for n in targets if n not in calls]
    if idle:
        notes.append("not executed by example_input (not costed): " + ", ".join(idle))
    if float_mha or exp_mha:
        notes.append("attention cores (Q.K^T, softmax, weights.V: activation x activation "
                     "products) are not modelled; only the Q/K/V/out projections are")
    return rows, notes


def _layer_row(name: str, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerShape:
    quantized = isinstance(m, (ExpLinear, ExpConv2d))
    if isinstance(m, (ExpConv2d, nn.Conv2d)):
        w_shape = list(m.w_shape) if quantized else list(m.weight.shape)
        O, Cg, kh, kw = w_shape
        K, N = Cg * kh * kw, O
        P = y.numel() // N
        frac, corr = _conv_zero_stats(x, m, w_shape)
        dil = _pair(m.dilation)
        geometry = dict(stride=list(_pair(m.stride)), padding=list(conv_pads(m, (kh, kw), dil)),
                        dilation=list(dil), groups=int(m.groups))
        kind = "Conv2d"
    else:
        w_shape = list(m.w_shape) if quantized else list(m.weight.shape)
        N, K = w_shape
        P = y.numel() // N
        frac, corr = _linear_zero_stats(x, K, N)
        geometry = {}
        kind = "Linear"
    bias = getattr(m, "bias", None)
    row = LayerShape(
        name=name, kind=kind, module=type(m).__name__, quantized=quantized, K=K, N=N, P=P,
        in_elems=int(x.numel()), out_elems=int(y.numel()), weights=int(math.prod(w_shape)),
        bias=0 if bias is None else int(bias.numel()), w_shape=w_shape, in_shape=list(x.shape),
        out_shape=list(y.shape), input_negative=bool((x < 0).any()), zero_frac=frac,
        corr_updates=corr, geometry=geometry)
    if quantized:
        row.bits = int(m.bits)
        row.a_signed = bool(m.a_signed)
        row.w_signed = bool(m.w_signed)
    else:
        row.w_signed = bool((m.weight < 0).any())
    return row
