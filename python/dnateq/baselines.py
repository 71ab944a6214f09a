"""Uniform integer quantization: the baseline of the paper's Tables III and IV.

``dnateq.baselines.uniform_quantize(model, loader, bits=...)`` quantizes the
same layers :func:`dnateq.quantize` would (one shared layer selection,
attention split into Q/K/V/out) with symmetric per-tensor INT-b weights and
unsigned/asymmetric per-tensor INT-b activations whose ranges come from the
same kind of trace (SPEC section 7). ``bits`` counts the whole stored
element, sign included.

Two honest ways to compare with a DNA-TEQ model ``q`` (:func:`bits_of`):

- ``bits_of(q, "paper")``: uniform gets ``n`` bits where DNA-TEQ has ``n``
  exponent bits (the paper's comparison; DNA-TEQ stores one more, the sign);
- ``bits_of(q, "storage")``: uniform gets DNA-TEQ's storage bits per tensor,
  ``n + 1`` for signed tensors and ``n`` for unsigned (post-ReLU) activations.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ._common import get_module as _get_module
from ._common import set_module as _set_module
from .calibration import deliver, trace_layers
from .calibration.select import select
from .calibration.call import ModelCall
from .nn.modules import ExpConv2d, ExpLinear
from .nn.uniform import UniformConv2d, UniformLinear, _check_bits

__all__ = ["uniform_quantize", "bits_of", "summary", "CONVENTIONS"]

CONVENTIONS = ("paper", "storage")

BitsSpec = Union[int, Tuple[int, int]]

_WHO = "dnateq.baselines.uniform_quantize"


def bits_of(qmodel: nn.Module, convention: str = "paper") -> Dict[str, BitsSpec]:
    """Per-layer bits of a DNA-TEQ model for a uniform baseline with the same
    bit choice: ``"paper"`` gives ``{name: n}``; ``"storage"`` gives
    ``{name: (w_bits, a_bits)}`` with ``n + 1`` for signed tensors."""
    if convention not in CONVENTIONS:
        raise ValueError(f"dnateq.baselines.bits_of: convention must be one of {CONVENTIONS}, "
                         f"got {convention!r}")
    out: Dict[str, BitsSpec] = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, (ExpLinear, ExpConv2d)):
            if convention == "paper":
                out[name] = int(m.bits)
            else:
                out[name] = (int(m.bits) + int(m.w_signed), int(m.bits) + int(m.a_signed))
    if not out:
        raise ValueError("dnateq.baselines.bits_of: qmodel has no dnateq quantized layer "
                         "(use dnateq.quantize first)")
    return out


def _layer_bits(spec: Any, name: str) -> Tuple[int, int]:
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"{_WHO}: bits for layer '{name}' must be an int or a pair "
                             f"(w_bits, a_bits), got {spec!r}")
        return (_check_bits(spec[0], f"bits['{name}'][0] (w_bits)"),
                _check_bits(spec[1], f"bits['{name}'][1] (a_bits)"))
    b = _check_bits(spec, "bits" if name == "*" else f"bits['{name}']")
    return b, b


def uniform_quantize(model: nn.Module, loader: Iterable, bits: Union[BitsSpec,
                     Mapping[str, BitsSpec]] = 8, *, activations: bool = True,
                     calib_batches: int = 8, layers: Optional[Sequence[str]] = None,
                     skip: Optional[Sequence[str]] = None, inplace: bool = False,
                     progress: bool = True, seed: int = 0, forward=None, mask=None) -> nn.Module:
    """Quantize ``model`` uniformly: symmetric per-tensor INT-b weights and
    per-tensor INT-b activations (unsigned for post-ReLU inputs, else
    asymmetric with a zero point), ranges traced on ``calib_batches`` loader
    batches.

    Args:
        model: a float ``nn.Module`` (the same layers as :func:`dnateq.quantize`
            are quantizable; attention is split into Q/K/V/out).
        loader: batches as for :func:`dnateq.quantize` (tensors, tuples, dicts).
        bits: total bits per element (sign included), 2..16: an int for every
            layer, a pair ``(w_bits, a_bits)``, or a dict ``{layer name: int or
            pair}`` — e.g. :func:`bits_of` of a DNA-TEQ model; layers absent from
            the dict stay float (listed in ``dnateq_baseline["skipped"]``).
        activations: quantize the layers' inputs too (default); ``False`` gives
            weight-only quantization.
        calib_batches, layers, skip, inplace, progress, seed, forward, mask: as
            in :func:`dnateq.quantize` (dict batches are passed as
            ``model(**batch)``; a layer shared under several names is quantized
            once and stays shared).

    Returns:
        The quantized model (a deep copy unless ``inplace``) with
        ``model.dnateq_baseline = {"kind": "uniform", "bits": {name: (w, a)},
        "skipped": {...}}``. The caller's model is unchanged when an error is
        raised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHO}: model must be an nn.Module, got {type(model).__name__}")
    if int(calib_batches) < 1:
        raise ValueError(f"{_WHO}: calib_batches must be >= 1, got {calib_batches}")
    per_layer: Optional[Dict[str, Tuple[int, int]]] = None
    if isinstance(bits, Mapping):
        if not bits:
            raise ValueError(f"{_WHO}: bits is an empty dict")
        per_layer = {str(k): _layer_bits(v, str(k)) for k, v in bits.items()}
        default = None
    else:
        default = _layer_bits(bits, "*")

    call = ModelCall(forward, mask, who=_WHO)
    work = copy.deepcopy(model)
    was_training = model.training
    work.eval()
    sel = select(work, layers, skip, who=_WHO)
    mha_names, cands, skipped = sel.mha, sel.names, sel.skipped
    if per_layer is not None:
        unknown = sorted(set(per_layer) - set(cands))
        if unknown:
            raise ValueError(f"{_WHO}: bits names layers that are not quantizable layers of "
                             f"the model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        for n in cands:
            if n not in per_layer:
                skipped[n] = "no bits given"
        cands = [n for n in cands if n in per_layer]
    # Only the range is needed: a small sample keeps tracing cheap.
    tr = trace_layers(work, cands, loader, calib_batches=calib_batches, sample_size=16,
                      seed=seed, progress=progress, who=_WHO, label="uniform", call=call)
    done = []
    chosen: Dict[str, Tuple[int, int]] = {}
    for n in cands:
        t = tr.traces[n]
        if t.calls == 0:
            skipped[n] = "not executed during calibration"
            continue
        wb, ab = per_layer[n] if per_layer is not None else default
        mod = _get_module(work, n)
        cls = UniformLinear if isinstance(mod, nn.Linear) else UniformConv2d
        q = cls.from_float(mod, wb, ab if activations else None,
                           (t.vmin, t.vmax) if activations else None)
        for a in [n] + sel.aliases.get(n, []):
            _set_module(work, a, q)
        chosen[n] = (wb, ab if activations else None)
        done.append(n)
    if not done:
        raise ValueError(f"{_WHO}: no quantizable layer was executed by the model on the "
                         "calibration batches")
    info = dict(kind="uniform", bits=chosen, skipped=skipped, activations=bool(activations),
                calib_batches=int(calib_batches))
    return deliver(work, model, inplace, was_training, mha_names, done, "dnateq_baseline", info,
                   aliases=sel.aliases)


def summary(model: nn.Module) -> Dict[str, Any]:
    """Weight-count-weighted average weight bits (sign included) and byte
    counts of the uniform layers of ``model`` (bytes at ``w_bits`` per weight,
    rounded up per layer)."""
    rows = [(n, m) for n, m in model.named_modules()
            if isinstance(m, (UniformLinear, UniformConv2d))]
    if not rows:
        raise ValueError("dnateq.baselines.summary: the model has no uniform quantized layer "
                         "(use dnateq.baselines.uniform_quantize first)")
    nw = sum(m.weight_count for _, m in rows)
    avg = sum(m.w_bits * m.weight_count for _, m in rows) / nw
    return dict(layers=len(rows), weights=nw, avg_bits=avg, storage_bits=avg,
                bytes_int8=nw, bytes_packed=sum(math.ceil(m.w_bits * m.weight_count / 8)
                                                for _, m in rows),
                bits={n: (m.w_bits, m.a_bits) for n, m in rows})
