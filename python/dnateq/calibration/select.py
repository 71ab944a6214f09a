"""Step 1 of calibration (SPEC section 3, items 1 and 7): which layers are
quantized, with ``nn.MultiheadAttention`` split into explicit Q/K/V/out
``nn.Linear``s so each projection is a layer of its own. Every quantizer
(``dnateq.quantize``, the uniform baselines, the analysis tools) uses this one
selection, so they cover the same layers."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from .._common import get_module, matches, set_module
from ..nn.modules import ExpConv2d, ExpLinear, ExpMultiheadAttention
from ..nn.uniform import UniformConv2d, UniformLinear

__all__ = ["select_layers", "split_attention", "disable_fast_paths", "QUANTIZED", "PROJECTIONS"]

#: Layer types that replace float ones (fused fast paths must not bypass them).
QUANTIZED = (ExpLinear, ExpConv2d, UniformLinear, UniformConv2d)
#: The projections of a split attention module.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def split_attention(work: nn.Module, names: Sequence[str]) -> None:
    """Replace the ``nn.MultiheadAttention`` modules ``names`` of ``work`` (in
    place) by their float equivalents with explicit projections
    (:class:`dnateq.nn.ExpMultiheadAttention`), and turn off the nested-tensor
    fast path of ``nn.TransformerEncoder`` (it bypasses the modules)."""
    for n in names:
        set_module(work, n, ExpMultiheadAttention.from_float(get_module(work, n)))
    for m in work.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False


def select_layers(work: nn.Module, layers: Optional[Sequence[str]] = None,
                  skip: Optional[Sequence[str]] = None, who: str = "dnateq.quantize"
                  ) -> Tuple[List[str], List[str], Dict[str, str]]:
    """Prepare ``work`` (modified in place) and list its quantizable layers.

    Selected ``nn.MultiheadAttention`` modules are replaced by
    :class:`dnateq.nn.ExpMultiheadAttention` (explicit Q/K/V/out ``nn.Linear``s,
    float) so each projection is its own layer. Returns ``(mha_names, cands,
    skipped)``: the replaced attention modules, the candidate layer names in
    ``named_modules`` order, and ``{name: reason}`` for the layers left float.
    """
    mha_names = [n for n, m in work.named_modules()
                 if isinstance(m, nn.MultiheadAttention) and n and not matches(n, skip)
                 and (layers is None or matches(n, layers)
                      or any(matches(f"{n}.{p}", layers) for p in PROJECTIONS))]
    split_attention(work, mha_names)
    skipped: Dict[str, str] = {}
    cands: List[str] = []
    kept_mha = [n for n, m in work.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for n, m in work.named_modules():
        if isinstance(m, QUANTIZED):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if any(n.startswith(k + ".") for k in kept_mha):
                skipped[n] = "inside a skipped nn.MultiheadAttention"
                continue
            if layers is not None and not matches(n, layers):
                continue
            if matches(n, skip):
                skipped[n] = "skipped by option"
                continue
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                skipped[n] = f"padding_mode={m.padding_mode!r} (only 'zeros' is quantized)"
                continue
            cands.append(n)
    if not cands:
        raise ValueError(f"{who}: the model has no quantizable layer (nn.Linear, "
                         "nn.Conv2d with zero padding, nn.MultiheadAttention)"
                         + (" matching `layers`/`skip`" if layers or skip else ""))
    return mha_names, cands, skipped


def disable_fast_paths(root: nn.Module) -> None:
    """PyTorch's fused Transformer fast paths read the layers' float weights
    directly, bypassing (or failing on) quantized modules: turn them off where a
    quantized module lives inside (per instance, documented flags)."""
    for m in root.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
        if isinstance(m, nn.TransformerEncoderLayer) and any(
                isinstance(c, QUANTIZED) for c in m.modules()):
            # only gates the fast path; the activation itself is m.activation
            m.activation_relu_or_gelu = 0
