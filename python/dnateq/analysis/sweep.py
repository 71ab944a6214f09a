"""Threshold sensitivity sweep (the paper's Fig. 8): for each ``Thr_w``, the
per-layer bit choice of ``dnateq.quantize``'s rule, the average bits and the
quality loss.

The per-layer tables (RMAE of W and A, and the parameters, for every ``n``) do
not depend on the threshold, so they are computed once: one
``dnateq.quantize`` run records them in ``qmodel.dnateq_info["tables"]``; each
threshold is then a table look-up (the rule of SPEC section 3, item 4), a swap
of cached quantized modules and one evaluation — as in ``quantize``'s own loop.
``method="requantize"`` instead calls ``dnateq.quantize`` once per threshold
(slower; same answer, kept as a cross-check).
"""
from __future__ import annotations

import inspect
import math
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch.nn as nn

from .._common import get_module, model_device
from .._common import progress as _progress
from ..calibration import LayerCache, LayerSearch, Quality, quantize
from ..calibration.call import ModelCall
from ..calibration.pipeline import heldout_inputs
from ..calibration.select import prepare_like
from ..calibration.trace import Traces, plan_batches
from ._common import QUANTIZED_TYPES, csv_text, markdown_table

__all__ = ["threshold_sweep", "ThresholdSweep", "DEFAULT_THRESHOLDS"]

#: Thr_w = 1 %, 2 %, ..., 30 % (the range of ``dnateq.quantize``'s loop and of Fig. 8).
DEFAULT_THRESHOLDS = tuple(round(0.01 * i, 10) for i in range(1, 31))
_QUANTIZE_DEFAULTS = {k: p.default for k, p in inspect.signature(quantize).parameters.items()
                      if p.default is not inspect.Parameter.empty}
# Options the sweep sets itself.
_REFUSED = ("threshold_step", "max_threshold", "inplace", "eval_fn", "progress")


class ThresholdSweep:
    """The result of :func:`threshold_sweep`.

    ``rows``: one dict per threshold, ascending: ``threshold`` (``Thr_w``),
    ``bits`` (``{layer: n}``), ``avg_bits`` (``n`` weighted by weight count,
    the paper's convention), ``storage_bits`` (with the sign bit of signed
    weights), ``quality``, ``loss`` (``base_quality - quality``), ``passed``
    (``loss <= max_loss``) and ``evaluated`` (False where the bit choice equals
    an earlier one's and its quality was reused).
    ``base_quality``: the float model's quality; ``metric``: ``"eval_fn"`` or
    ``"proxy"``; ``layers``: the quantized layers in execution order;
    ``selected``: the threshold ``dnateq.quantize`` would keep with the same
    options (the last one before the first failing, None if the first fails).
    """

    def __init__(self, rows: List[Dict[str, Any]], base_quality: float, metric: str,
                 max_loss: float, layers: List[str], options: Dict[str, Any]):
        self.rows, self.base_quality, self.metric = rows, base_quality, metric
        self.max_loss, self.layers, self.options = max_loss, layers, options
        self.selected: Optional[float] = None
        for r in rows:
            if not r["passed"]:
                break
            self.selected = r["threshold"]

    def to_dict(self) -> Dict[str, Any]:
        return {"rows": [dict(r, bits=dict(r["bits"])) for r in self.rows],
                "base_quality": self.base_quality, "metric": self.metric,
                "max_loss": self.max_loss, "layers": list(self.layers),
                "selected": self.selected, "options": dict(self.options)}

    def to_csv(self) -> str:
        """One line per threshold; one ``bits:<layer>`` column per layer."""
        headers = (["threshold", "avg_bits", "storage_bits", "quality", "loss", "passed"]
                   + [f"bits:{n}" for n in self.layers])
        return csv_text(headers, ([r["threshold"], r["avg_bits"], r["storage_bits"],
                                   r["quality"], r["loss"], r["passed"]]
                                  + [r["bits"].get(n) for n in self.layers] for r in self.rows))

    def to_markdown(self) -> str:
        def hist(bits: Dict[str, int]) -> str:
            counts: Dict[int, int] = {}
            for b in bits.values():
                counts[b] = counts.get(b, 0) + 1
            return " ".join(f"{b}b:{c}" for b, c in sorted(counts.items()))
        table = markdown_table(
            ["Thr_w", "avg bits", "storage bits", "quality", "loss", "passed", "layers per n"],
            ([f"{100 * r['threshold']:.3g}%", r["avg_bits"], r["storage_bits"], r["quality"],
              r["loss"], r["passed"], hist(r["bits"])] for r in self.rows))
        sel = "none (the first threshold fails)" if self.selected is None else \
            f"{100 * self.selected:.3g}%"
        return (table + f"\n\n- float quality ({self.metric}): {self.base_quality:.4g}; "
                f"max_loss {self.max_loss:g}; dnateq.quantize would keep Thr_w = {sel}\n")

    def __repr__(self) -> str:
        return self.to_markdown()

    def plot(self, *, figsize: Optional[Tuple[float, float]] = None):
        """Fig. 8: quality loss (left axis) and average bits (right axis, with
        the storage bits dashed) against ``Thr_w`` in percent. Returns the
        matplotlib Figure (two axes)."""
        from matplotlib.figure import Figure

        thr = [100 * r["threshold"] for r in self.rows]
        fig = Figure(figsize=figsize or (6.5, 4.6))
        ax = fig.subplots()
        ax.plot(thr, [r["loss"] for r in self.rows], "o-", color="tab:red", label="quality loss")
        ax.axhline(self.max_loss, color="tab:red", ls=":", lw=1, label=f"max_loss {self.max_loss:g}")
        ax.set_xlabel("Thr_w (%)")
        ax.set_ylabel(f"quality loss ({self.metric})", color="tab:red")
        ax2 = ax.twinx()
        ax2.plot(thr, [r["avg_bits"] for r in self.rows], "s-", color="tab:blue",
                 label="average bits (n)")
        ax2.plot(thr, [r["storage_bits"] for r in self.rows], "s--", color="tab:blue",
                 alpha=0.5, label="storage bits")
        ax2.set_ylabel("bits per weight", color="tab:blue")
        ax2.set_ylim(0, 8.5)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        # Below the plot: inside, it would hide curves whose shape depends on the model.
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", ncol=2,
                  bbox_to_anchor=(0.5, -0.16))
        fig.tight_layout()
        return fig


def _check_thresholds(thresholds) -> List[float]:
    fn = "dnateq.analysis.threshold_sweep"
    if isinstance(thresholds, (int, float)):
        thresholds = [thresholds]
    try:
        ts = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: thresholds must be a sequence of numbers, got "
                        f"{thresholds!r}") from None
    if not ts:
        raise ValueError(f"{fn}: thresholds is empty")
    bad = [t for t in ts if not (math.isfinite(t) and t > 0)]
    if bad:
        raise ValueError(f"{fn}: thresholds must be finite and > 0 (fractions: 0.05 = 5 %), "
                         f"got {bad}")
    return sorted(set(ts))


def threshold_sweep(model: nn.Module, loader: Iterable,
                    eval_fn: Optional[Callable[[nn.Module], float]] = None,
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                    method: str = "tables", progress: bool = True,
                    **quantize_options) -> ThresholdSweep:
    """The quality loss and bit choice of DNA-TEQ at each ``Thr_w`` in
    ``thresholds`` (the paper's Fig. 8).

    Args:
        model: the float model (left untouched).
        loader: calibration batches, as for :func:`dnateq.quantize`. The first
            ``calib_batches`` (plus ``eval_batches`` for the proxy) batches are
            read once and kept, so a one-shot iterator works and every threshold
            sees the same data.
        eval_fn: ``eval_fn(model) -> float``, higher is better; None: the proxy
            of ``dnateq.quantize`` (top-1 agreement with the float model, in
            percent, on the held-out batches).
        thresholds: the ``Thr_w`` values, as fractions (default 1 %..30 % in
            steps of 1 %); sorted ascending.
        method: ``"tables"`` (default): the per-layer tables are computed once
            (one ``dnateq.quantize`` run) and each threshold is a look-up plus
            one evaluation; ``"requantize"``: one full ``dnateq.quantize`` per
            threshold with ``threshold_step = max_threshold = Thr_w`` (a
            cross-check; same result).
        progress: tqdm bars.
        **quantize_options: options of :func:`dnateq.quantize` (``bits``,
            ``search``, ``rounding``, ``first_layer_divisor``,
            ``act_threshold_scale``, ``rss_normalize``, ``calib_batches``,
            ``eval_batches``, ``sample_size``, ``layers``, ``skip``, ``mode``,
            ``seed``; ``max_loss`` only sets the ``passed`` column). Not
            ``threshold_step``, ``max_threshold``, ``inplace``.

    Returns:
        :class:`ThresholdSweep` (``rows``, ``to_markdown()``, ``plot()``, ...).
        The bit choice is non-increasing in ``Thr_w`` layer by layer (a higher
        threshold admits every ``n`` a lower one did).
    """
    fn = "dnateq.analysis.threshold_sweep"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"{fn}: eval_fn must be callable (model -> float) or None")
    if method not in ("tables", "requantize"):
        raise ValueError(f"{fn}: method must be 'tables' or 'requantize', got {method!r}")
    ts = _check_thresholds(thresholds)
    for k in quantize_options:
        if k in _REFUSED:
            raise ValueError(f"{fn}: {k} is set by the sweep (thresholds come from "
                             "`thresholds`, eval_fn and progress are its own arguments)")
        if k not in _QUANTIZE_DEFAULTS:
            raise TypeError(f"{fn}: unknown dnateq.quantize option {k!r}")
    if any(isinstance(m, QUANTIZED_TYPES) for m in model.modules()):
        raise ValueError(f"{fn}: model is already quantized; pass the float model")
    opts = dict(quantize_options)
    max_loss = float(opts.pop("max_loss", _QUANTIZE_DEFAULTS["max_loss"]))
    if not (math.isfinite(max_loss) and max_loss >= 0):
        raise ValueError(f"{fn}: max_loss must be finite and >= 0, got {max_loss}")
    calib = int(opts.get("calib_batches", _QUANTIZE_DEFAULTS["calib_batches"]))
    n_eval = int(opts.get("eval_batches", _QUANTIZE_DEFAULTS["eval_batches"]))
    if calib < 1 or n_eval < 1:
        raise ValueError(f"{fn}: calib_batches and eval_batches must be >= 1")

    # Read the batches once (bounded: calibration plus held-out ones).
    need = calib + (n_eval if eval_fn is None else 0)
    try:
        batches = [b for _, b in zip(range(need), iter(loader))]
    except TypeError:
        raise TypeError(f"{fn}: loader must be an iterable of batches, got "
                        f"{type(loader).__name__}") from None
    if not batches:
        raise ValueError(f"{fn}: the loader yielded no batch")
    options = dict(opts, max_loss=max_loss, method=method, thresholds=list(ts))
    if method == "requantize":
        return _sweep_requantize(model, batches, eval_fn, ts, max_loss, progress, opts, options)

    # One calibration: the tables. A constant eval_fn makes its own threshold
    # loop free (one look-up, no real evaluation).
    # The same split as quantize's: the held-out batches are never traced.
    n_cal, note = plan_batches(len(batches), calib, n_eval if eval_fn is None else 0)
    q = quantize(model, batches[:n_cal], eval_fn=lambda m: 0.0, threshold_step=ts[0],
                 max_threshold=ts[0], progress=progress, **dict(dict(method="paper"), **dict(opts, calib_batches=n_cal)))
    info = q.dnateq_info
    del q
    order: List[str] = list(info["order"])
    tables, qopt = info["tables"], info["options"]
    bits = list(qopt["bits"])
    eval_mode_name = "lut" if qopt["mode"] == "count" else qopt["mode"]

    work = prepare_like(model, info["mha_replaced"], info.get("conv1d_replaced", []))
    work.eval()
    build = LayerCache({n: get_module(work, n) for n in order}, tables,
                       rounding=qopt["rounding"], mode=eval_mode_name, first=order[0])
    call = ModelCall(opts.get("forward"), opts.get("mask"), who=fn)
    held: List[Any] = []
    if eval_fn is None:
        device = model_device(work)
        extra = [call.prepare(b, device, f"loader batch {n_cal + i}")
                 for i, b in enumerate(batches[n_cal:n_cal + n_eval])]
        kept = [call.prepare(b, device, f"loader batch {i}")
                for i, b in enumerate(batches[:min(n_eval, n_cal)])] if not extra else []
        held = heldout_inputs(Traces({}, [], n_cal, kept, extra, note), n_eval, who=fn)
    search = LayerSearch(work, order, tables, bits, build,
                         Quality(work, eval_fn, held, who=fn, call=call),
                         aliases=info.get("shared"))
    base = search.base
    rows: List[Dict[str, Any]] = []
    for thr in _progress(ts, progress, desc="dnateq: threshold sweep"):
        cfg = search.threshold_bits(thr, qopt["first_layer_divisor"], qopt["act_threshold_scale"])
        qv, evaluated = search.measure(cfg)
        avg, sto = search.bit_totals(cfg)
        rows.append(dict(threshold=thr, bits=cfg, avg_bits=avg, storage_bits=sto, quality=qv,
                         loss=base - qv, passed=base - qv <= max_loss, evaluated=evaluated))
    return ThresholdSweep(rows, base, search.quality.metric, max_loss, order, options)


def _sweep_requantize(model, batches, eval_fn, ts, max_loss, progress, opts, options
                      ) -> ThresholdSweep:
    rows: List[Dict[str, Any]] = []
    base = None
    order: List[str] = []
    for thr in _progress(ts, progress, desc="dnateq: threshold sweep (requantize)"):
        # the largest max_loss: the single threshold always "passes", so
        # quantize keeps exactly the configuration of this threshold.
        q = quantize(model, batches, eval_fn=eval_fn, max_loss=sys.float_info.max,
                     threshold_step=thr,
                     max_threshold=thr, progress=False,
                     **dict(dict(method="paper"), **opts))
        info = q.dnateq_info
        order = list(info["order"])
        cfg = {n: int(get_module(q, n).bits) for n in order}
        nw = sum(get_module(q, n).weight_count for n in order)
        avg = sum(cfg[n] * get_module(q, n).weight_count for n in order) / nw
        sto = sum((cfg[n] + int(get_module(q, n).w_signed)) * get_module(q, n).weight_count
                  for n in order) / nw
        base = info["base_quality"]
        qv = info["quality"]
        rows.append(dict(threshold=thr, bits=cfg, avg_bits=avg, storage_bits=sto, quality=qv,
                         loss=base - qv, passed=base - qv <= max_loss, evaluated=True))
    return ThresholdSweep(rows, float(base), "eval_fn" if eval_fn is not None else "proxy",
                          max_loss, order, options)
