"""Building the quantized layers from the fitted tables, and handing the result
back to the caller (a copy, or swapped into the caller's model)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch.nn as nn

from .._common import get_module, set_module
from ..nn.modules import ExpConv2d, ExpLinear
from .select import disable_fast_paths

__all__ = ["build_layer", "LayerCache", "deliver"]


def build_layer(float_layer: nn.Module, table: Dict[str, Any], bits: int, *,
                rounding: str = "nearest", mode: str = "lut", first_layer: bool = False
                ) -> nn.Module:
    """The :class:`dnateq.nn.ExpLinear` / :class:`dnateq.nn.ExpConv2d` of
    ``float_layer`` at ``n = bits`` with the parameters of ``table["rows"][bits]``
    (a ``dnateq_info["tables"]`` entry)."""
    r = table["rows"][bits]
    info = dict(rmae_w=r["rmae_w"], rmae_a=r["rmae_a"], rss_w=table["rss_w"],
                rss_a=table["rss_a"], start=table["start"], first_layer=first_layer)
    cls = ExpLinear if isinstance(float_layer, nn.Linear) else ExpConv2d
    return cls.from_float(float_layer, bits, (r["alpha"], r["sw"], r["bw"]),
                          (r["alpha"], r["sa"], r["ba"]), a_signed=table["a_signed"],
                          rounding=rounding, mode=mode, info=info)


class LayerCache:
    """Quantized layers built at most once per ``(layer, n)``.

    ``floats`` are the float layers, ``tables`` their fitted tables, ``first``
    the first layer in execution order. ``after_build`` callables run on every
    freshly built layer as ``fn(name, layer, float_layer)`` (the extension
    point of the passes that correct a built layer, e.g. bias correction)."""

    def __init__(self, floats: Dict[str, nn.Module], tables: Dict[str, Dict[str, Any]], *,
                 rounding: str, mode: str, first: Optional[str],
                 after_build: Sequence[Callable[[str, nn.Module, nn.Module], None]] = ()):
        self.floats, self.tables, self.first = floats, tables, first
        self.rounding, self.mode = rounding, mode
        self.after_build = list(after_build)
        self._cache: Dict[Tuple[str, int], nn.Module] = {}

    def __call__(self, name: str, bits: int) -> nn.Module:
        key = (name, int(bits))
        if key not in self._cache:
            layer = build_layer(self.floats[name], self.tables[name], int(bits),
                                rounding=self.rounding, mode=self.mode,
                                first_layer=(name == self.first))
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
