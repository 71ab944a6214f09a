"""Building the quantized layers from the fitted tables, and handing the result
back to the caller (a copy, or swapped into the caller's model)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._common import get_module, set_module
from ..nn.modules import ExpConv2d, ExpLinear
from .select import disable_fast_paths

__all__ = ["build_layer", "LayerCache", "deliver"]


def build_layer(float_layer: nn.Module, table: Dict[str, Any], bits: int, *,
                rounding: str = "nearest", mode: str = "lut", first_layer: bool = False,
                smooth: Optional[torch.Tensor] = None,
                mechanisms: Sequence[str] = ()) -> nn.Module:
    """The :class:`dnateq.nn.ExpLinear` / :class:`dnateq.nn.ExpConv2d` of
    ``float_layer`` at ``n = bits`` with the parameters of ``table["rows"][bits]``
    (a ``dnateq_info["tables"]`` entry): per-channel weight parameters when the
    row has ``w_scale``/``w_offset``, its bias correction ``delta`` added to the
    bias, and the smoothing vector ``smooth`` (the float layer's weight is
    already smoothed)."""
    r = table["rows"][bits]
    info = dict(rmae_w=r["rmae_w"], rmae_a=r["rmae_a"], rss_w=table["rss_w"],
                rss_a=table["rss_a"], start=table["start"], first_layer=first_layer)
    if mechanisms:
        info["mechanisms"] = list(mechanisms)
    cls = ExpLinear if isinstance(float_layer, nn.Linear) else ExpConv2d
    wp = ((r["alpha"], r["w_scale"], r["w_offset"]) if r.get("w_scale") is not None
          else (r["alpha"], r["sw"], r["bw"]))
    q = cls.from_float(float_layer, bits, wp, (r["alpha"], r["sa"], r["ba"]),
                       a_signed=table["a_signed"], rounding=rounding, mode=mode, info=info)
    if smooth is not None:
        q.set_smooth(smooth)
    d = r.get("delta")
    if d is not None:
        d = d.detach().float().to(q.w_packed.device)
        q.bias = d.clone() if q.bias is None else q.bias + d
    return q


class LayerCache:
    """Quantized layers built at most once per ``(layer, n)``.

    ``floats`` are the float layers, ``tables`` their fitted tables, ``first``
    the first layer in execution order. ``after_build`` callables run on every
    freshly built layer as ``fn(name, layer, float_layer)`` (the extension
    point of the passes that correct a built layer, e.g. bias correction)."""

    def __init__(self, floats: Dict[str, nn.Module], tables: Dict[str, Dict[str, Any]], *,
                 rounding: str, mode: str, first: Optional[str],
                 after_build: Sequence[Callable[[str, nn.Module, nn.Module], None]] = (),
                 smooth: Optional[Dict[str, torch.Tensor]] = None,
                 layer_passes: Optional[Dict[str, Sequence[str]]] = None):
        self.floats, self.tables, self.first = floats, tables, first
        self.smooth = smooth if smooth is not None else {}
        self.layer_passes = layer_passes if layer_passes is not None else {}
        self.rounding, self.mode = rounding, mode
        self.after_build = list(after_build)
        self._cache: Dict[Tuple[str, int], nn.Module] = {}

    def __call__(self, name: str, bits: int) -> nn.Module:
        key = (name, int(bits))
        if key not in self._cache:
            layer = build_layer(self.floats[name], self.tables[name], int(bits),
                                rounding=self.rounding, mode=self.mode,
                                first_layer=(name == self.first),
                                smooth=self.smooth.get(name),
                                mechanisms=self.layer_passes.get(name, ()))
            for fn in self.after_build:
                fn(name, layer, self.floats[name])
            self._cache[key] = layer
        return self._cache[key]


def deliver(work: nn.Module, model: nn.Module, inplace: bool, was_training: bool,
            mha_names: Sequence[str], names: Sequence[str], attr: str,
            info: Dict[str, Any], aliases: Optional[Dict[str, Sequence[str]]] = None) -> nn.Module:
    """The result of a quantizer that worked on ``work``, a copy of ``model``:
    ``work`` itself, or with ``inplace`` the replaced attention modules and
    quantized layers moved into ``model`` (under every name in ``aliases``).
    Either way the fused fast paths are off, the training flag is the caller's
    and the record is set as ``attr``."""
    disable_fast_paths(work)
    work.train(was_training)
    setattr(work, attr, info)
    if not inplace:
        return work
    for n in mha_names:
        set_module(model, n, get_module(work, n))
    aliases = aliases or {}
    for n in names:
        if not any(n.startswith(mn + ".") for mn in mha_names):
            for a in [n] + list(aliases.get(n, [])):
                set_module(model, a, get_module(work, n))
    disable_fast_paths(model)
    setattr(model, attr, info)
    return model
