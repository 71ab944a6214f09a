"""``dnateq.quantize``: the calibration steps of SPEC section 3, top-down, and
the registry of extra calibration passes (the extension points).

Stages where passes run (see :func:`register_pass`):

- ``"before_fit"``: after tracing, before the per-layer fits. A pass gets the
  :class:`Calibration` state; it may change the working model's weights and
  the layers' predecessors (e.g. fold a smoothing scale into a LayerNorm),
  record a per-layer smoothing vector in ``state.smooth[name]``, and note what
  it did per layer in ``state.layer_passes[name]`` (for the report). The fit
  reads the weights from the working model and the activations from
  ``state.traces`` after the passes ran (a pass that changes what a layer sees
  re-traces: :meth:`Calibration.retrace`).
- ``"after_fit"``: after the per-layer fits, before building. A pass gets the
  state and may refine ``state.tables`` (per-channel weights, the activation
  range chosen by output error, bias corrections: :mod:`.passes`).
- ``"after_build"``: every freshly built quantized layer, before the
  allocation evaluates it, as ``fn(state, name, layer, float_layer)``.

Methods: ``method="paper"`` runs no pass by default and allocates by the
paper's threshold rule (its exact reproduction); the default
``method="sensitivity"`` runs :data:`DEFAULT_PASSES` and allocates by measured
sensitivity (:mod:`.sensitivity`). ``passes=[...]`` overrides the method's
passes either way, so each mechanism also runs alone.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._common import get_module
from .allocate import STRATEGIES, Allocation, LayerSearch
from .build import LayerCache, deliver
from .config import QuantizeConfig
from .fit import fit_layers
from .quality import Fidelity, Quality
from .call import ModelCall
from .select import Selection, select
from .trace import Traces, trace_layers

__all__ = ["quantize", "calibrate", "Calibration", "PASSES", "STAGES", "BEFORE_FIT",
           "AFTER_FIT", "AFTER_BUILD", "DEFAULT_PASSES", "register_pass", "run_passes", "executed_layers"]

BEFORE_FIT, AFTER_FIT, AFTER_BUILD = "before_fit", "after_fit", "after_build"
STAGES = (BEFORE_FIT, AFTER_FIT, AFTER_BUILD)

#: The passes each method runs when ``passes`` is not given: the paper's
#: method none; the sensitivity allocation the combination that measured best
#: (benchmarks/bench_ablation.py).
DEFAULT_PASSES: Dict[str, Tuple[str, ...]] = {
    "paper": (),
    "sensitivity": ("smoothing", "per_channel", "clip", "bias_correction"),
}


@dataclass
class Pass:
    name: str
    stage: str
    fn: Callable[..., None]


#: Registered passes by name; ``QuantizeConfig.passes`` selects which run.
PASSES: Dict[str, Pass] = {}


def register_pass(name: str, stage: str, fn: Callable[..., None]) -> None:
    """Register ``fn`` as pass ``name`` at ``stage`` (one of :data:`STAGES`);
    ``quantize(passes=[name, ...])`` runs it (in the order given)."""
    if stage not in STAGES:
        raise ValueError(f"dnateq.calibration: stage must be one of {STAGES}, got {stage!r}")
    PASSES[name] = Pass(name, stage, fn)


@dataclass
class Calibration:
    """The state the passes see: the working ``model`` (a copy of the caller's),
    the validated ``config``, the quantized layer ``names`` in execution order,
    the :class:`~dnateq.calibration.trace.Traces`, the ``skipped`` layers, the
    split attention modules, and what the steps add: ``tables`` (after the
    fit), ``smooth`` ({name: per-input-channel vector}) and ``layer_passes``
    ({name: [pass names that changed it]})."""
    model: nn.Module
    config: QuantizeConfig
    names: List[str]
    traces: Traces
    skipped: Dict[str, str]
    mha_names: List[str]
    tables: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    smooth: Dict[str, torch.Tensor] = field(default_factory=dict)
    layer_passes: Dict[str, List[str]] = field(default_factory=dict)
    selection: Optional[Selection] = None
    heldout: Dict[str, Any] = field(default_factory=dict)
    call: Optional[ModelCall] = None
    #: the first calibration inputs (model inputs), kept when a pass needs them
    calib_inputs: List[Any] = field(default_factory=list)
    #: modules outside the quantized layers that a pass changed (e.g. a
    #: LayerNorm a smoothing factor was folded into): moved with ``inplace``
    changed_modules: List[str] = field(default_factory=list)
    #: per-pass records merged into ``dnateq_info`` (e.g. ``smoothing``)
    records: Dict[str, Any] = field(default_factory=dict)

    def passes_at(self, stage: str) -> List[Pass]:
        return [PASSES[p] for p in self.config.passes if PASSES[p].stage == stage]

    def retrace(self, inputs: Sequence[Any]) -> None:
        """Trace the layers again on ``inputs`` (loader batches, or the
        prepared ones in ``traces.kept``), replacing ``traces.traces``."""
        c = self.config
        tr = trace_layers(self.model, self.names, inputs, calib_batches=len(inputs),
                          sample_size=c.sample_size, seed=c.seed, progress=False,
                          call=self.call)
        self.traces.traces = tr.traces

    def after_build_hooks(self) -> List[Callable[[str, nn.Module, nn.Module], None]]:
        return [lambda n, q, f, p=p: p.fn(self, n, q, f) for p in self.passes_at(AFTER_BUILD)]


def run_passes(stage: str, state: Calibration) -> None:
    """Run the selected passes of ``stage`` that take the whole state."""
    for p in state.passes_at(stage):
        p.fn(state)


def executed_layers(tr: Traces, cands: Sequence[str], skipped: Dict[str, str]) -> List[str]:
    """The candidates the model ran, in first-execution order; the others are
    noted in ``skipped``."""
    for n in cands:
        if tr.traces[n].calls == 0:
            skipped[n] = "not executed during calibration"
    names = [n for n in tr.order if n in tr.traces and tr.traces[n].calls > 0]
    if not names:
        raise ValueError("dnateq.quantize: no quantizable layer was executed by the model "
                         "on the calibration batches")
    return names


def quantize(model: nn.Module, loader: Iterable, *,
             eval_fn: Optional[Callable[[nn.Module], float]] = None,
             max_loss: float = 1.0,
             bits: Sequence[int] = (3, 4, 5, 6, 7),
             search: str = "golden",
             rounding: str = "nearest",
             first_layer_divisor: float = 10.0,
             act_threshold_scale: Union[float, str] = 1.0,
             threshold_step: float = 0.01,
             max_threshold: float = 0.30,
             rss_normalize: bool = False,
             calib_batches: int = 8,
             eval_batches: int = 4,
             sample_size: int = 1 << 18,
             layers: Optional[Sequence[str]] = None,
             skip: Optional[Sequence[str]] = None,
             inplace: bool = False,
             mode: str = "lut",
             progress: bool = True,
             seed: int = 0,
             method: Optional[str] = None,
             passes: Optional[Sequence[str]] = None,
             forward: Optional[Callable[[nn.Module, Any], Any]] = None,
             mask: Any = None,
             smoothing: str = "auto",
             bits_budget: Optional[float] = None,
             min_cosine: Union[float, str, None] = "auto") -> nn.Module:
    """Calibrate ``model`` on ``loader`` and return it with DNA-TEQ quantized layers.

    Args:
        model: a float ``nn.Module``. Quantizable layers: ``nn.Linear``,
            ``nn.Conv2d`` (``padding_mode="zeros"``; others stay float and are
            listed as skipped) and the Q/K/V/out projections of
            ``nn.MultiheadAttention`` (replaced by :class:`dnateq.nn.ExpMultiheadAttention`).
        loader: an iterable of batches, moved to the model's device: a tensor
            is the input (``model(x)``); of a tuple/list the first item is the
            input (``model(batch[0])``); a dict is passed as keyword arguments
            (``model(**batch)``, the Hugging Face convention: tokenizer output,
            ``pixel_values``...). See ``forward`` for anything else.
        eval_fn: ``eval_fn(model) -> float``, higher is better. When None, a
            proxy in percent on held-out loader batches that calibration never
            saw: top-1 agreement with the float model for ``[B, C]`` logits, else
            100 x mean cosine similarity. Of a dict-like output (``ModelOutput``,
            sentence-transformers) it compares ``sentence_embedding``, else
            ``logits``, else ``last_hidden_state``, only at the valid positions
            of the mask (see ``mask``).
        max_loss: the allowed quality loss, in ``eval_fn``'s units (default 1.0;
            finite and >= 0).
        bits: candidate exponent bits ``n`` (default 3..7).
        search: base search of ``exp_fit``: ``"golden"`` (default) or ``"paper"``.
        rounding: ``"nearest"`` (default) or ``"log"`` (the paper's).
        first_layer_divisor: the first quantizable layer in forward-execution
            order uses ``Thr_w / first_layer_divisor`` (default 10).
        act_threshold_scale: ``Thr_act = Thr_w * act_threshold_scale`` (default
            1.0); ``"auto"`` scales per layer by ``RMAE_A / RMAE_W`` at the
            smallest candidate ``n``.
        threshold_step: step of the outer ``Thr_w`` loop (default 0.01 = 1 %).
            The loop stops at the first threshold whose loss exceeds
            ``max_loss`` (the previous configuration is kept), or early once
            every layer is at the smallest ``n`` (the choice cannot change any
            more); a threshold giving the same bit choice as the previous one
            is not evaluated again. If even the first threshold fails, the
            all-``max(bits)`` configuration is returned with a RuntimeWarning
            (``dnateq_info["fallback"]``, also noted by :func:`dnateq.report`).
        max_threshold: the largest ``Thr_w`` tried (default 0.30).
        rss_normalize: compare the RSS on ``m / mean(m)`` instead of raw
            magnitudes when choosing the starting tensor.
        calib_batches: number of loader batches traced (default 8).
        eval_batches: for the proxy metric only, number of further loader
            batches held out for evaluation (default 4), never traced. A loader
            (with a ``len``) too short for both calibrates on fewer batches and
            says so in a warning; one that yields nothing after the calibration
            batches (a one-batch loader, or an iterator of unknown length) makes
            the proxy reuse calibration batches, with a warning that its
            estimate is then optimistic. ``dnateq_info["estimate"]`` records the
            estimate and on how many held-out batches it was made.
        sample_size: per-layer bound on the traced activation sample (elements).
        layers: module names, name prefixes (a submodule's name selects the
            layers inside it) or ``fnmatch`` patterns of the layers to quantize
            (default: all quantizable layers).
        skip: names, prefixes or patterns of layers to leave in float (a
            skipped ``nn.MultiheadAttention`` stays whole, in float).
        inplace: swap the quantized modules into ``model`` itself (only once
            calibration has succeeded) instead of returning a deep copy.
        mode: execution mode of the quantized modules: ``"lut"`` (default),
            ``"count"`` or ``"fake"``. Evaluations during the search run in
            ``"lut"`` when ``mode="count"`` (the modes agree to 1e-4).
        progress: tqdm progress bars for tracing, fitting and the threshold loop
            (``progress=False`` silences them).
        seed: seed of the activation sub-sampling (results are deterministic
            for a fixed seed and loader).
        method: the bit allocation; None (default): ``"sensitivity"`` in one
            process, ``"paper"`` under torchrun with several ranks (the
            sensitivity measurements and passes are not merged across ranks
            yet). ``"sensitivity"``: every layer's
            effect on the model output is measured at every ``n`` (only that
            layer quantized), a greedy path lowers the layer that costs least
            per weight-bit saved, and the cheapest point of the path within
            ``max_loss`` is found by bisection (``bits_budget`` takes the point
            at that average instead). ``"paper"``: the paper's threshold rule
            above (SPEC section 3, items 4-5), reproduced exactly when no
            pass runs. Further strategies register in
            :data:`dnateq.calibration.allocate.STRATEGIES`.
        passes: the mechanisms to run, by name (registered in
            :data:`dnateq.calibration.pipeline.PASSES`): ``"per_channel"``
            (weights with one scale/offset per output channel, one shared
            ``alpha``), ``"smoothing"`` (per-input-channel factors moved from
            the activations into the weights, folded into the preceding
            LayerNorm/Linear where exact, else the layer's ``smooth``
            buffer), ``"clip"`` (the activation range chosen by the layer's
            output error), ``"bias_correction"`` (the mean output error per
            channel added to the bias). None (default): the method's
            :data:`DEFAULT_PASSES` (none for ``"paper"``).
        smoothing: where the ``"smoothing"`` pass puts its factors: ``"auto"``
            (fold where exact, else the buffer), ``"fold"`` (an error for a
            layer with no foldable predecessor) or ``"buffer"``.
        bits_budget: with ``method="sensitivity"``, the average bits (paper
            convention) to allocate to, without searching ``max_loss``.
        min_cosine: the output-fidelity floor of ``method="sensitivity"``: a
            configuration passes only when, beside the loss within
            ``max_loss``, the mean cosine of its outputs to the float model's
            (sentence_embedding, logits or last_hidden_state; per sample, or
            per valid token) on ``eval_batches`` loader batches that follow the
            calibration ones is at least this. A task metric measured on few
            samples is noisy and can pass a configuration that moved far from
            the float model; the floor keeps it out. ``"auto"`` (default):
            0.99 for ``"sensitivity"``, None (no floor) for ``"paper"``, which
            stays the paper's rule. With ``bits_budget`` the cosine is measured
            and reported, not enforced. The report names which limit stopped
            the search (``limit``: loss, fidelity or the path's end).
        forward: ``forward(model, batch) -> output`` calls the model on a
            (device-moved) loader batch instead of the rules of ``loader``, for
            any other convention, e.g. sentence-transformers:
            ``forward=lambda model, batch: model(batch)``.
        mask: which token positions count: None (default) takes a dict batch's
            ``"attention_mask"`` (``[B, T]``, nonzero = valid); a callable
            ``mask(batch) -> [B, T] tensor or None`` any other; False none. The
            trace then samples only the valid positions of ``[B, T, ...]`` layer
            inputs (padding would otherwise dominate the fit), and the proxy
            compares only valid positions.

    Returns:
        The quantized model (a deep copy unless ``inplace``). ``model.dnateq_info``
        holds the calibration record (per-layer tables, thresholds tried,
        qualities, skipped layers, fallback flag) used by :func:`dnateq.report`.

    Raises:
        ValueError / TypeError / RuntimeError with a clear message for bad
        input (no quantizable layer, empty loader, non-finite activations, a
        batch the model cannot take); the caller's model is then unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dnateq.quantize: model must be an nn.Module, got {type(model).__name__}")
    config = QuantizeConfig(
        eval_fn=eval_fn, max_loss=max_loss, bits=bits, search=search, rounding=rounding,
        first_layer_divisor=first_layer_divisor, act_threshold_scale=act_threshold_scale,
        threshold_step=threshold_step, max_threshold=max_threshold, rss_normalize=rss_normalize,
        calib_batches=calib_batches, eval_batches=eval_batches, sample_size=sample_size,
        layers=layers, skip=skip, inplace=inplace, mode=mode, progress=progress, seed=seed,
        method=method, passes=passes, forward=forward, mask=mask, smoothing=smoothing,
        bits_budget=bits_budget, min_cosine=min_cosine).validated()
    return calibrate(model, loader, config)


def calibrate(model: nn.Module, loader: Iterable, config: QuantizeConfig) -> nn.Module:
    """:func:`quantize` with its options as a validated :class:`QuantizeConfig`:
    the paper's steps, top-down. The caller's model is never touched before
    success (all work happens on a copy)."""
    work = copy.deepcopy(model)
    was_training = model.training
    work.eval()
    call = ModelCall(config.forward, config.mask)
    clock = [time.perf_counter()]
    # 1. Layers: attention split into projections, Conv1D as Linear; candidates.
    sel = select(work, config.layers, config.skip)
    # 2. Bounded traces (valid tokens only), and held-out batches for the proxy.
    #    With eval_fn, the output-fidelity floor (min_cosine) takes the batches
    #    that follow the calibration ones, without shortening calibration.
    proxy = config.eval_fn is None
    held = int(config.eval_batches) if proxy or config.min_cosine is not None else 0
    keep = max(held, int(config.calib_batches)) if _needs_inputs(config) else held
    tr = trace_layers(work, sel.names, loader, calib_batches=config.calib_batches,
                      sample_size=config.sample_size, seed=config.seed,
                      progress=config.progress, keep_inputs=keep, extra_inputs=held, call=call,
                      shorten=proxy)
    names = executed_layers(tr, sel.names, sel.skipped)
    state = Calibration(work, config, names, tr, sel.skipped, sel.mha, selection=sel, call=call,
                        calib_inputs=list(tr.kept))
    run_passes(BEFORE_FIT, state)
    clock.append(time.perf_counter())
    # 3. Per-layer tables: every candidate n, each tensor sorted once; then the
    #    passes that refine them.
    state.tables = fit_layers(work, names, tr.traces, config)
    run_passes(AFTER_FIT, state)
    tr.traces.clear()
    clock.append(time.perf_counter())
    # 4. Bit allocation over cached quantized layers, judged by eval_fn or the proxy.
    build = LayerCache({n: get_module(work, n) for n in names}, state.tables,
                       rounding=config.rounding, mode="lut" if config.mode == "count" else config.mode,
                       first=names[0], after_build=state.after_build_hooks(),
                       smooth=state.smooth, layer_passes=state.layer_passes)
    if proxy:
        inputs = heldout_inputs(tr, held)
    else:   # fidelity floor only: what follows calibration, else its batches
        inputs = tr.extra or tr.kept[:held]
    state.heldout = dict(held_out_batches=len(tr.extra) if inputs is tr.extra else 0,
                         on_calibration_batches=bool(held) and inputs is not tr.extra)
    quality = Quality(work, config.eval_fn, inputs if proxy else [], call=call)
    search = LayerSearch(work, names, state.tables, config.bits, build, quality,
                         aliases=sel.aliases)
    search.calib_inputs = list(tr.kept)
    search.fidelity = (Fidelity(work, inputs, call) if config.min_cosine is not None and inputs
                       else None)
    alloc = STRATEGIES[config.method](search, config)
    for n in names:
        get_module(work, n).mode = config.mode
    clock.append(time.perf_counter())
    info = _record(state, search, alloc, clock)
    moved = list(names) + [m for m in state.changed_modules if m not in names]
    return deliver(work, model, config.inplace, was_training, sel.mha, moved, "dnateq_info", info,
                   aliases=sel.aliases)


def _needs_inputs(config: QuantizeConfig) -> bool:
    return bool(config.passes) or config.method != "paper"


def _row_record(r: Dict[str, Any]) -> Dict[str, Any]:
    """A table row for ``dnateq_info``: the per-channel vectors and the bias
    correction (they live in the layers) reduced to flags."""
    out = {k: _plain(v) for k, v in r.items()
           if k not in ("w_scale", "w_offset", "delta", "out_err_full_range")}
    if r.get("w_scale") is not None:
        out["per_channel"] = True
    if r.get("delta") is not None:
        out["bias_corrected"] = True
    return out


def _plain(v: Any) -> Any:
    """JSON-friendly record values: tensors become a short summary."""
    if isinstance(v, torch.Tensor):
        return dict(per_channel=int(v.numel()), mean=float(v.double().mean()),
                    absmax=float(v.double().abs().max())) if v.numel() else None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def heldout_inputs(tr: Traces, wanted: int, who: str = "dnateq.quantize") -> List[Any]:
    """The proxy's inputs: the held-out batches of ``tr``; when there are
    none, the kept calibration batches, with a warning (the estimate is then
    made on data the fit has seen). Warns too when calibration was shortened
    to hold batches out."""
    if wanted <= 0:
        return []
    if tr.heldout_note is not None:
        warnings.warn(f"{who}: {tr.heldout_note}; pass a longer loader (calib_batches + "
                      f"eval_batches = {tr.batches + wanted} batches) or eval_fn",
                      UserWarning, stacklevel=4)
    if tr.extra:
        return tr.extra
    warnings.warn(f"{who}: the loader has no batch left after the {tr.batches} calibration "
                  "batches, so the proxy metric is judged on calibration batches it was fitted "
                  "on (its estimate is optimistic); pass a loader with eval_batches more "
                  "batches, or eval_fn", UserWarning, stacklevel=4)
    return tr.kept


def _record(state: Calibration, search: LayerSearch, alloc: Allocation, clock) -> Dict[str, Any]:
    """``dnateq_info``: the calibration record :func:`dnateq.report` reads."""
    c = state.config
    return dict(
        # wall-clock seconds per phase (the search includes building the
        # quantized layers and every evaluation)
        timing=dict(trace=clock[1] - clock[0], tables=clock[2] - clock[1],
                    search=clock[3] - clock[2], total=clock[3] - clock[0]),
        base_quality=search.base, quality=alloc.quality, loss=search.base - alloc.quality,
        threshold=alloc.threshold, fallback=alloc.fallback, metric=search.quality.metric,
        history=alloc.history, skipped=state.skipped, order=list(state.names),
        estimate=dict(metric=search.quality.metric, base_quality=search.base,
                      quality=alloc.quality, loss=search.base - alloc.quality,
                      **state.heldout),
        first_layer=state.names[0],
        tables={n: dict(start=t["start"], rss_w=t["rss_w"], rss_a=t["rss_a"],
                        a_signed=t["a_signed"],
                        rows={b: _row_record(r) for b, r in t["rows"].items()})
                for n, t in state.tables.items()},
        method=c.method, passes=list(c.passes),
        layer_passes={n: list(v) for n, v in state.layer_passes.items()},
        **{k: _plain(v) for k, v in state.records.items()},
        mha_replaced=list(state.mha_names),
        conv1d_replaced=list(state.selection.conv1d) if state.selection else [],
        shared={n: list(a) for n, a in (state.selection.aliases if state.selection else {}).items()
                if n in state.names},
        options=dict(max_loss=c.max_loss, bits=list(c.bits), search=c.search,
                     rounding=c.rounding, first_layer_divisor=c.first_layer_divisor,
                     act_threshold_scale=c.act_threshold_scale,
                     threshold_step=c.threshold_step, max_threshold=c.max_threshold,
                     rss_normalize=c.rss_normalize, calib_batches=c.calib_batches,
                     mode=c.mode, seed=c.seed, method=c.method, passes=list(c.passes),
                     forward=c.forward is not None,
                     mask="attention_mask" if c.mask is None else bool(c.mask),
                     smoothing=c.smoothing, bits_budget=c.bits_budget,
                     min_cosine=c.min_cosine),
        **alloc.record,
    )
