"""Helpers shared by the analysis tools: the table base class, the layer
predicates and the model preparation (MultiheadAttention split)."""
from __future__ import annotations

import copy
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._table import cell as fmt, csv_text, markdown_table  # noqa: F401
from ..calibrate import _disable_fast_paths, _get_module, _set_module
from ..nn.modules import ExpConv2d, ExpLinear, ExpMultiheadAttention

#: Module types the analysis treats as DNA-TEQ quantized layers.
QUANTIZED_TYPES = (ExpLinear, ExpConv2d)
#: Float module types that dnateq quantizes (SPEC section 3).
FLOAT_TYPES = (nn.Linear, nn.Conv2d)


def check_positive_int(value: Any, name: str, fn: str, minimum: int = 1) -> int:
    try:
        iv = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"dnateq.analysis.{fn}: {name} must be an integer, got {value!r}") from None
    if iv != value or iv < minimum:
        raise ValueError(f"dnateq.analysis.{fn}: {name} must be an integer >= {minimum}, "
                         f"got {value!r}")
    return iv


def split_mha(model: nn.Module, names: Optional[Sequence[str]] = None) -> nn.Module:
    """``model`` itself when it has no ``nn.MultiheadAttention`` to split (among
    ``names`` when given), else a deep copy whose MHAs are replaced by their float
    equivalent with explicit Q/K/V/out Linears (as ``dnateq.quantize`` does, so
    that those projections are hookable and named alike)."""
    todo = [n for n, m in model.named_modules()
            if n and isinstance(m, nn.MultiheadAttention) and (names is None or n in names)]
    if not todo:
        return model
    work = copy.deepcopy(model)
    for n in todo:
        _set_module(work, n, ExpMultiheadAttention.from_float(_get_module(work, n)))
    _disable_fast_paths(work)
    for m in work.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False   # the nested fast path bypasses the modules
    return work


class eval_mode:
    """Context manager: the models in eval mode, their training flags restored."""

    def __init__(self, *models: nn.Module):
        self.models = models
        self.flags: List[Tuple[nn.Module, bool]] = []

    def __enter__(self):
        for model in self.models:
            for m in model.modules():
                self.flags.append((m, m.training))
            model.eval()
        return self

    def __exit__(self, *exc):
        for m, f in self.flags:
            m.training = f
        return False


def first_tensor(out: Any) -> Optional[torch.Tensor]:
    """The first tensor of a module output (a tensor, a tuple/list, a dict or an
    object with ``logits``), or None."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    t = getattr(out, "logits", None)
    return t if isinstance(t, torch.Tensor) else None


def layer_names(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    s = ", ".join(repr(n) for n in names[:limit])
    return s + (f", ... ({len(names)} in all)" if len(names) > limit else "")
