"""Per-layer output error of a quantized model against its float model (the
32/8/4-bit comparison of seed 002: the largest and the mean absolute difference
of each layer's output), for DNA-TEQ and any other quantized model whose layers
keep the float model's module names (e.g. a uniform INT-n baseline)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._common import matches as _matches
from .._common import model_device as _model_device
from .._common import progress as _progress
from ..calibration.call import ModelCall
from ..nn.modules import ExpMultiheadAttention
from ._common import (FLOAT_TYPES, QUANTIZED_TYPES, check_positive_int, csv_text, eval_mode,
                      first_tensor, markdown_table, split_mha)

__all__ = ["layer_output_errors", "LayerErrors"]

OUTPUT_ROW = "(model output)"
_COLUMNS = ["layer", "kind", "float_kind", "bits", "max_abs", "mean_abs", "ref_max_abs",
            "ref_mean_abs", "rel_mean", "elements"]


class LayerErrors:
    """The result of :func:`layer_output_errors`.

    ``rows``: one dict per compared layer, in the float model's execution order
    (the model output last, as ``"(model output)"``, unless ``isolated``):
    ``layer``, ``kind`` (the quantized model's module type), ``float_kind``,
    ``bits`` (what the module declares: ``bits`` — DNA-TEQ's exponent bits
    ``n`` — else ``w_bits`` — a uniform baseline's weight bits, sign included;
    None for float modules), ``max_abs`` and
    ``mean_abs`` (of ``|y_q - y_float|``), ``ref_max_abs`` and ``ref_mean_abs``
    (of ``|y_float|``, for scale), ``rel_mean`` (``mean_abs / ref_mean_abs``)
    and ``elements`` (output elements compared). ``notes``: layers left out and
    why. ``isolated``: the comparison mode."""

    def __init__(self, rows: List[Dict[str, Any]], notes: List[str], isolated: bool):
        self.rows, self.notes, self.isolated = rows, notes, isolated

    def __getitem__(self, layer: str) -> Dict[str, Any]:
        for r in self.rows:
            if r["layer"] == layer:
                return r
        raise KeyError(layer)

    def to_dict(self) -> Dict[str, Any]:
        return {"layers": [dict(r) for r in self.rows], "notes": list(self.notes),
                "isolated": self.isolated}

    def to_csv(self) -> str:
        return csv_text(_COLUMNS, ([r[c] for c in _COLUMNS] for r in self.rows))

    def to_markdown(self) -> str:
        mode = ("isolated: each quantized layer takes the float layer's input"
                if self.isolated else
                "end to end: both models run on the same inputs, errors accumulate")
        out = [markdown_table(_COLUMNS, ([r[c] for c in _COLUMNS] for r in self.rows)), "",
               f"- mode: {mode}"]
        out += [f"- note: {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def __repr__(self) -> str:
        return self.to_markdown()

    def plot(self, *, figsize: Optional[Tuple[float, float]] = None):
        """Max and mean absolute error per layer (log scale), one bar pair per
        layer. Returns the matplotlib Figure."""
        import numpy as np
        from matplotlib.figure import Figure

        names = [r["layer"] for r in self.rows]
        fig = Figure(figsize=figsize or (max(6.0, 0.35 * len(names) + 2), 4.0))
        ax = fig.subplots()
        x = np.arange(len(names))
        ax.bar(x - 0.2, [r["max_abs"] for r in self.rows], 0.4, label="max |y_q - y|")
        ax.bar(x + 0.2, [r["mean_abs"] for r in self.rows], 0.4, label="mean |y_q - y|")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("absolute output difference")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def _declared_bits(m: nn.Module) -> Optional[int]:
    # DNA-TEQ layers declare ``bits`` (n, exponent bits); the uniform baselines
    # ``w_bits`` (whole stored weight, sign included).
    for attr in ("bits", "w_bits"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _is_compared(name: str, q: nn.Module, f: nn.Module, layers) -> bool:
    if layers is not None:
        return _matches(name, layers)
    # A quantized layer, any replaced module (a baseline's own type), or a float
    # layer kept as is (compared with itself it gives zero, which is the point).
    return (isinstance(q, QUANTIZED_TYPES) or type(q) is not type(f)
            or isinstance(f, FLOAT_TYPES))


def _batches(inputs: Any, max_batches: Optional[int]) -> Iterable[Any]:
    # A tensor or a dict is one batch; anything else is an iterable of batches
    # (so a single (input, target) batch is passed as [batch]).
    if isinstance(inputs, (torch.Tensor, dict)):
        return [inputs]
    try:
        it = iter(inputs)
    except TypeError:
        raise TypeError("dnateq.analysis.layer_output_errors: inputs must be a tensor, a dict "
                        f"batch or an iterable of batches, got {type(inputs).__name__}") from None
    if max_batches is None:
        return it
    return (b for _, b in zip(range(max_batches), it))


def layer_output_errors(qmodel: nn.Module, float_model: nn.Module, inputs: Any, *,
                        layers: Optional[Sequence[str]] = None,
                        isolated: bool = False,
                        max_batches: Optional[int] = None,
                        progress: bool = False,
                        forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> LayerErrors:
    """Per layer, the largest and the mean absolute difference between the output
    of ``qmodel``'s layer and that of ``float_model``'s layer of the same name,
    on the same inputs (forward hooks on both models).

    Args:
        qmodel: a quantized model: :func:`dnateq.quantize`'s result, or any model
            whose quantized layers keep the float model's module names (e.g.
            ``dnateq.baselines.uniform_quantize``'s).
        float_model: the float reference. Its ``nn.MultiheadAttention`` modules
            are split on a copy where ``qmodel`` has an
            :class:`~dnateq.nn.ExpMultiheadAttention`, so the Q/K/V/out
            projections are compared too.
        inputs: one input tensor, one dict batch, or an iterable of loader
            batches (a list of tensors, of ``(input, target)`` tuples, a
            DataLoader); each batch is passed as in ``dnateq.quantize`` (a
            tensor as the input, a tuple's first item, a dict as
            ``model(**batch)``). Results accumulate over all batches (the max
            over all, the mean over all elements).
        forward: ``forward(model, batch)`` calls both models instead (as in
            ``dnateq.quantize``).
        layers: module names, prefixes or ``fnmatch`` patterns to compare. By
            default: every module name present in both models where the
            quantized model's module is a dnateq quantized layer, or its type
            differs from the float one (a baseline's fake-quantized layer), or
            the float module is an ``nn.Linear``/``nn.Conv2d``.
        isolated: ``False`` (default): both models run end to end and errors
            accumulate through the network, as in seed 002, plus a row for the
            model output. ``True``: each quantized layer is called on the float
            layer's own input, which isolates its own error.
        max_batches: stop after this many batches of an iterable.
        progress: a tqdm bar over the batches.

    Both models run in eval mode under ``torch.no_grad()`` (their training flags
    are restored). Layers that ran in only one model, a different number of
    times, or with outputs of different shapes are left out (see ``notes``).
    """
    fn = "layer_output_errors"
    for arg, m in (("qmodel", qmodel), ("float_model", float_model)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"dnateq.analysis.{fn}: {arg} must be an nn.Module, got "
                            f"{type(m).__name__}")
    if max_batches is not None:
        max_batches = check_positive_int(max_batches, "max_batches", fn)
    q_named = dict(qmodel.named_modules())
    split = [n for n, m in q_named.items() if isinstance(m, ExpMultiheadAttention)]
    fmodel = split_mha(float_model, split) if split else float_model
    f_named = dict(fmodel.named_modules())
    names = [n for n in f_named if n and n in q_named
             and _is_compared(n, q_named[n], f_named[n], layers)]
    if not names:
        raise ValueError(f"dnateq.analysis.{fn}: qmodel and float_model have no layer in "
                         "common to compare (layers are matched by module name"
                         + (", and filtered by `layers`" if layers is not None else "") + ")")

    notes: List[str] = []
    acc: Dict[str, Dict[str, float]] = {}
    order: List[str] = []
    state = {"side": None, "busy": False}
    outs: Dict[str, Dict[str, List[torch.Tensor]]] = {"f": {}, "q": {}}
    bad: Dict[str, str] = {}

    def record(name: str, y: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> None:
        if y is None or ref is None:
            bad.setdefault(name, "output has no tensor")
            return
        if y.shape != ref.shape:
            bad.setdefault(name, f"output shapes differ ({list(y.shape)} vs {list(ref.shape)})")
            return
        d = (y.detach().double() - ref.detach().double().to(y.device)).abs()
        r = ref.detach().double().abs()
        a = acc.setdefault(name, dict(max_abs=0.0, sum_abs=0.0, ref_max=0.0, ref_sum=0.0, n=0))
        if d.numel():
            a["max_abs"] = max(a["max_abs"], float(d.max()))
            a["ref_max"] = max(a["ref_max"], float(r.max()))
        a["sum_abs"] += float(d.sum())
        a["ref_sum"] += float(r.sum())
        a["n"] += d.numel()

    handles = []
    if isolated:
        def make_iso(name, qmod):
            def hook(mod, args, kwargs, out):
                if state["busy"]:
                    return   # qmodel is float_model: the call below re-enters
                if name not in order:
                    order.append(name)
                state["busy"] = True
                try:
                    y = qmod(*args, **kwargs)
                finally:
                    state["busy"] = False
                record(name, first_tensor(y), first_tensor(out))
            return hook
        for n in names:
            handles.append(f_named[n].register_forward_hook(make_iso(n, q_named[n]),
                                                            with_kwargs=True))
    else:
        # Float outputs are kept for one batch; each quantized output is compared
        # as soon as it is produced (the k-th call against the k-th float call).
        calls: Dict[str, int] = {}

        def make_rec(name, side):
            def hook(mod, args, out):
                if state["side"] != side:
                    return   # the same module object may sit in both models
                t = first_tensor(out)
                t = None if t is None else t.detach()
                if side == "f":
                    if name not in order:
                        order.append(name)
                    outs["f"].setdefault(name, []).append(t)
                    return
                k = calls.get(name, 0)
                calls[name] = k + 1
                fl = outs["f"].get(name, [])
                if k < len(fl):
                    record(name, t, fl[k])
                    fl[k] = None
            return hook
        for n in names:
            handles.append(f_named[n].register_forward_hook(make_rec(n, "f")))
            handles.append(q_named[n].register_forward_hook(make_rec(n, "q")))

    fdev, qdev = _model_device(fmodel), _model_device(qmodel)
    call = ModelCall(forward, who=f"dnateq.analysis.{fn}")
    seen = 0
    try:
        with eval_mode(qmodel, fmodel), torch.no_grad():
            for batch in _progress(_batches(inputs, max_batches), progress,
                                   desc="dnateq: layer errors"):
                state["side"] = "f"
                fy = call(fmodel, call.prepare(batch, fdev, f"batch {seen}"))
                if not isolated:
                    state["side"] = "q"
                    qy = call(qmodel, call.prepare(batch, qdev, f"batch {seen}"))
                    state["side"] = None
                    for n in names:
                        nf, nq = len(outs["f"].pop(n, [])), calls.pop(n, 0)
                        if nf != nq:
                            bad.setdefault(n, f"called {nf} time(s) in float_model but {nq} "
                                              "in qmodel")
                    record(OUTPUT_ROW, first_tensor(qy), first_tensor(fy))
                seen += 1
    finally:
        state["side"] = None
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError(f"dnateq.analysis.{fn}: inputs yielded no batch")

    ran = [n for n in order if n in acc and n not in bad]
    if not isolated and OUTPUT_ROW in acc and OUTPUT_ROW not in bad:
        ran.append(OUTPUT_ROW)
    for n, why in bad.items():
        notes.append(f"{n}: left out, {why}")
    idle = [n for n in names if n not in acc and n not in bad]
    if idle:
        notes.append("not executed in both models: " + ", ".join(idle[:12])
                     + (f", ... ({len(idle)} in all)" if len(idle) > 12 else ""))
    if not [n for n in ran if n != OUTPUT_ROW]:
        raise ValueError(f"dnateq.analysis.{fn}: no common layer of qmodel and float_model ran "
                         "on the inputs" + (f" ({notes[0]})" if notes else ""))
    rows = []
    for n in ran:
        a = acc[n]
        if n == OUTPUT_ROW:
            kind, fkind, bits = "model", "model", None
        else:
            kind, fkind = type(q_named[n]).__name__, type(f_named[n]).__name__
            bits = _declared_bits(q_named[n])
        mean = a["sum_abs"] / a["n"] if a["n"] else 0.0
        ref_mean = a["ref_sum"] / a["n"] if a["n"] else 0.0
        rows.append(dict(layer=n, kind=kind, float_kind=fkind, bits=bits, max_abs=a["max_abs"],
                         mean_abs=mean, ref_max_abs=a["ref_max"], ref_mean_abs=ref_mean,
                         rel_mean=mean / ref_mean if ref_mean > 0 else
                         (0.0 if mean == 0 else math.inf),
                         elements=int(a["n"])))
    return LayerErrors(rows, notes, bool(isolated))
