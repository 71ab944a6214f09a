"""Helpers shared by the analysis tools: the table base class, the layer
predicates and the model preparation (MultiheadAttention split)."""
from __future__ import annotations

import copy
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch.nn as nn

from .._table import cell as fmt, csv_text, markdown_table  # noqa: F401
from .._common import first_tensor  # noqa: F401  (re-exported for the analysis tools)
from ..calibration.select import disable_fast_paths, split_attention
from ..nn.modules import ExpConv2d, ExpLinear

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
    split_attention(work, todo)
    disable_fast_paths(work)
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


def layer_names(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    s = ", ".join(repr(n) for n in names[:limit])
    return s + (f", ... ({len(names)} in all)" if len(names) > limit else "")
