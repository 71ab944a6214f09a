"""Step 1 of calibration (SPEC section 3, items 1 and 7): which layers are
quantized, with ``nn.MultiheadAttention`` split into explicit Q/K/V/out
``nn.Linear``s so each projection is a layer of its own. Every quantizer
(``dnateq.quantize``, the uniform baselines, the analysis tools) uses this one
selection, so they cover the same layers."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._common import get_module, matches, set_module
from ..nn.modules import ExpConv2d, ExpLinear, ExpMultiheadAttention
from ..nn.uniform import UniformConv2d, UniformLinear

__all__ = ["select_layers", "split_attention", "disable_fast_paths", "QUANTIZED", "PROJECTIONS",
           "select", "Selection", "is_conv1d", "conv1d_as_linear", "convert_conv1d", "module_aliases", "prepare_like"]

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


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is a ``transformers.pytorch_utils.Conv1D`` (GPT-2 style:
    ``y = x @ weight + bias`` with ``weight`` ``[in, out]``), without importing
    transformers."""
    t = type(m)
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in t.__mro__) and isinstance(getattr(m, "weight", None), torch.Tensor)


def conv1d_as_linear(m: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes exactly what the Conv1D ``m`` computes
    (its weight transposed), on the same device and dtype, float."""
    w = m.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device=w.device,
                    dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if m.bias is not None:
            lin.bias.copy_(m.bias.detach())
    lin.train(m.training)
    return lin


def convert_conv1d(work: nn.Module, names: Sequence[str]) -> None:
    """Replace the Conv1D modules ``names`` of ``work`` (in place, at every name
    that reaches them) by their :func:`conv1d_as_linear` equivalents."""
    aliases = module_aliases(work)
    for n in names:
        lin = conv1d_as_linear(get_module(work, n))
        for a in [n] + aliases.get(n, []):
            set_module(work, a, lin)


def module_aliases(root: nn.Module) -> Dict[str, List[str]]:
    """``{first name: [other names]}`` of every module instance reachable under
    more than one name (``m.a = m.b = layer``; ``named_modules`` lists only the
    first)."""
    first: Dict[int, str] = {}
    out: Dict[str, List[str]] = {}
    for n, m in root.named_modules(remove_duplicate=False):
        if id(m) in first:
            out.setdefault(first[id(m)], []).append(n)
        else:
            first[id(m)] = n
    return out


def tied_elsewhere(root: nn.Module, names: Sequence[str]) -> Dict[str, List[str]]:
    """``{layer: [other owners]}`` for the layers ``names`` whose weight or bias
    Parameter is also held by another module (tied input/output embeddings:
    ``lm_head.weight is wte.weight``). Quantizing such a layer would give it its
    own codes while the other holder keeps the float tensor, silently untying
    them, so :func:`select` leaves it in float and lists it as skipped."""
    owners: Dict[int, List[Tuple[int, str]]] = {}
    for mn, m in root.named_modules(remove_duplicate=False):
        for pn, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((id(m), f"{mn}.{pn}" if mn else pn))
    out: Dict[str, List[str]] = {}
    for n in names:
        m = get_module(root, n)
        others = sorted({name for p in m.parameters(recurse=False)
                         for mid, name in owners.get(id(p), []) if mid != id(m)})
        if others:
            out[n] = others
    return out


def prepare_like(model: nn.Module, mha_names: Sequence[str], conv1d_names: Sequence[str]
                 ) -> nn.Module:
    """A copy of ``model`` prepared as a calibration prepared it (the attention
    modules ``mha_names`` split, the Conv1D ``conv1d_names`` as Linears)."""
    work = copy.deepcopy(model)
    split_attention(work, [n for n in mha_names
                           if isinstance(get_module(work, n), nn.MultiheadAttention)])
    convert_conv1d(work, [n for n in conv1d_names if is_conv1d(get_module(work, n))])
    disable_fast_paths(work)
    return work


@dataclass
class Selection:
    """What :func:`select` prepared and found: ``mha`` (the split attention
    modules), ``conv1d`` (the Conv1D layers turned into Linears), ``names`` (the
    candidate layers in ``named_modules`` order), ``skipped`` ({name: reason})
    and ``aliases`` ({candidate: [its other names]} for a layer reachable under
    several names: it is quantized once and the one quantized module is set
    under every name, so the sharing is kept)."""
    mha: List[str]
    conv1d: List[str]
    names: List[str]
    skipped: Dict[str, str]
    aliases: Dict[str, List[str]] = field(default_factory=dict)


def select_layers(work: nn.Module, layers: Optional[Sequence[str]] = None,
                  skip: Optional[Sequence[str]] = None, who: str = "dnateq.quantize"
                  ) -> Tuple[List[str], List[str], Dict[str, str]]:
    """:func:`select` as ``(mha_names, candidates, skipped)``."""
    sel = select(work, layers, skip, who)
    return sel.mha, sel.names, sel.skipped


def select(work: nn.Module, layers: Optional[Sequence[str]] = None,
           skip: Optional[Sequence[str]] = None, who: str = "dnateq.quantize") -> Selection:
    """Prepare ``work`` (modified in place) and list its quantizable layers.

    Selected ``nn.MultiheadAttention`` modules are replaced by
    :class:`dnateq.nn.ExpMultiheadAttention` (explicit Q/K/V/out ``nn.Linear``s,
    float) so each projection is its own layer, and selected Hugging Face
    ``Conv1D`` layers by equivalent ``nn.Linear``s (:func:`conv1d_as_linear`;
    see :class:`Selection`).
    """
    mha_names = [n for n, m in work.named_modules()
                 if isinstance(m, nn.MultiheadAttention) and n and not matches(n, skip)
                 and (layers is None or matches(n, layers)
                      or any(matches(f"{n}.{p}", layers) for p in PROJECTIONS))]
    split_attention(work, mha_names)
    conv1d = [n for n, m in work.named_modules() if n and is_conv1d(m)
              and not matches(n, skip) and (layers is None or matches(n, layers))]
    convert_conv1d(work, conv1d)
    skipped: Dict[str, str] = {}
    cands: List[str] = []
    kept_mha = [n for n, m in work.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for n, m in work.named_modules():
        if isinstance(m, QUANTIZED):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)) or is_conv1d(m):
            if is_conv1d(m):   # left as it is: skipped, or not among `layers`
                if matches(n, skip):
                    skipped[n] = "skipped by option"
                continue
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
    for n, others in tied_elsewhere(work, cands).items():
        cands.remove(n)
        skipped[n] = (f"its parameters are tied to {', '.join(others)} (quantizing it "
                      "would untie them; untie them first to quantize it)")
    if not cands:
        raise ValueError(f"{who}: the model has no quantizable layer (nn.Linear, "
                         "nn.Conv2d with zero padding, nn.MultiheadAttention, "
                         "transformers Conv1D)"
                         + (" matching `layers`/`skip`" if layers or skip else ""))
    aliases = {n: a for n, a in module_aliases(work).items() if n in cands}
    return Selection(mha_names, conv1d, cands, skipped, aliases)


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
