"""Step 2 of calibration (SPEC section 3, item 1): bounded traces of every
selected layer's input, and their merge across ranks under ``torchrun``.

Forward pre-hooks record each layer's input over ``calib_batches`` batches
into a bounded, uniformly random sample per layer (priority sampling: every
element gets a random key and the ``sample_size`` smallest keys are kept, so
memory does not grow with the number of batches). The exact smallest and
largest nonzero magnitudes, the signed extremes and whether any input was
negative are tracked over the whole trace, so the fit covers the true range.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._common import get_module, model_device
from .._common import progress as _bar
from ..eval import distributed as _dist
from .call import ModelCall, select_valid

__all__ = ["Trace", "Traces", "trace_layers", "plan_batches", "merge_traces", "TRACE_FIELDS"]


class Trace:
    """Bounded uniform sample of one layer's inputs (priority sampling)."""

    def __init__(self, size: int, gen: torch.Generator, who: str = "dnateq.quantize"):
        self.size, self.gen, self.who = int(size), gen, who
        self.vals = torch.empty(0)
        self.keys = torch.empty(0)
        self.kmax = 1.0
        self.lo = math.inf   # smallest nonzero magnitude
        self.hi = 0.0        # largest magnitude
        self.lo_val = 0.0
        self.hi_val = 0.0
        self.negative = False
        self.vmin = math.inf   # signed extremes (uniform baselines' ranges)
        self.vmax = -math.inf
        self.count = 0
        self.calls = 0

    def add(self, x: torch.Tensor, name: str) -> None:
        v = x.detach().reshape(-1).float().cpu()
        if v.numel() == 0:
            return
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{self.who}: non-finite (NaN/Inf) input activations reached "
                             f"layer '{name}' during calibration")
        self.calls += 1
        self.count += v.numel()
        m = v.abs()
        if bool((v < 0).any()):
            self.negative = True
        self.vmin = min(self.vmin, float(v.min()))
        self.vmax = max(self.vmax, float(v.max()))
        i = int(m.argmax())
        if float(m[i]) > self.hi:
            self.hi, self.hi_val = float(m[i]), float(v[i])
        nz = m != 0
        if bool(nz.any()):
            mm = torch.where(nz, m, torch.full_like(m, math.inf))
            j = int(mm.argmin())
            if float(m[j]) < self.lo:
                self.lo, self.lo_val = float(m[j]), float(v[j])
        keys = torch.rand(v.numel(), generator=self.gen)
        if self.vals.numel() >= self.size:
            # Only keys below the current largest kept key can enter.
            sel = keys < self.kmax
            keys, v = keys[sel], v[sel]
        if self.vals.numel() + v.numel() > self.size:
            keys = torch.cat([self.keys, keys])
            vals = torch.cat([self.vals, v])
            kept = torch.topk(keys, self.size, largest=False, sorted=False).indices
            self.keys, self.vals = keys[kept], vals[kept]
            self.kmax = float(self.keys.max())
        else:
            self.keys = torch.cat([self.keys, keys])
            self.vals = torch.cat([self.vals, v])

    def sample(self) -> torch.Tensor:
        """The sample, plus the exact extremes of the whole trace."""
        extra = [self.hi_val] + ([self.lo_val] if math.isfinite(self.lo) else [])
        return torch.cat([self.vals, torch.tensor(extra, dtype=torch.float32)])


class Traces:
    """What :func:`trace_layers` collected: ``traces`` ({name: bounded sample
    with exact extremes}), ``order`` (names in first-execution order),
    ``batches`` (calibration batches run), ``kept`` (the first calibration
    inputs kept, on the model's device), ``extra`` (further loader inputs,
    not run: the held-out batches) and ``heldout_note`` (None, or why fewer
    held-out batches than asked for were kept)."""

    def __init__(self, traces, order, batches, kept, extra, heldout_note=None):
        self.traces, self.order, self.batches = traces, order, batches
        self.kept, self.extra, self.heldout_note = kept, extra, heldout_note


def _length(loader: Iterable) -> Optional[int]:
    try:
        return int(len(loader))   # lists, DataLoaders; generators have none
    except Exception:
        return None


def plan_batches(length: Optional[int], calib_batches: int, heldout: int
                 ) -> Tuple[int, Optional[str]]:
    """How many batches to trace when ``heldout`` batches must stay unseen by
    calibration: ``(calibration batches, note)``. A loader of known
    ``length`` shorter than ``calib_batches + heldout`` keeps what follows the
    calibration batches for evaluation, and when that is nothing, calibrates on
    fewer batches so that some are held out (the note says so)."""
    calib = int(calib_batches)
    if heldout <= 0 or length is None or length >= calib + heldout:
        return calib, None
    if length - calib >= 1:
        return calib, None
    if length < 2:
        return calib, None   # nothing can be held out: the caller warns
    hold = max(1, min(heldout, length // 2))
    return length - hold, (f"the loader has {length} batches, fewer than calib_batches + 1 = "
                           f"{calib + 1}: calibrating on {length - hold} and holding out "
                           f"{hold} for the proxy")


def trace_layers(work: nn.Module, names: Sequence[str], loader: Iterable, *,
                 calib_batches: int = 8, sample_size: int = 1 << 18, seed: int = 0,
                 progress: bool = True, keep_inputs: int = 0, extra_inputs: int = 0,
                 who: str = "dnateq.quantize", label: str = "dnateq",
                 call: Optional[ModelCall] = None, shorten: bool = True) -> Traces:
    """Run ``work`` on ``calib_batches`` loader batches and record the input of
    every layer in ``names`` (forward pre-hooks, bounded memory: see
    :class:`Trace`). ``call`` is the calling convention (:class:`ModelCall`;
    default: tensors and tuples as ``model(input)``, dicts as
    ``model(**batch)``); where it gives a mask (a dict batch's
    ``attention_mask``), only the valid token positions of ``[B, T, ...]``
    layer inputs are traced. ``keep_inputs`` of the calibration inputs are kept
    and up to ``extra_inputs`` further batches are read (not run) for held-out
    evaluation: when the loader is known to be too short for them,
    calibration takes fewer batches (:func:`plan_batches`), unless ``shorten``
    is False (the held-out batches are then only what follows). Raises when the
    loader is empty, a batch is malformed or the model cannot take it, or
    activations are non-finite; messages start with ``who``, the progress bar
    with ``label``. Under ``torchrun`` the ranks' traces are merged
    (:func:`merge_traces`)."""
    call = call if call is not None else ModelCall(who=who)
    gen = torch.Generator()
    gen.manual_seed(int(seed) + _dist.rank())   # independent sampling keys per rank
    traces = {n: Trace(sample_size, gen, who) for n in names}
    order: List[str] = []
    device = model_device(work)
    n_plan, note = (plan_batches(_length(loader), int(calib_batches), int(extra_inputs))
                    if shorten else (int(calib_batches), None))
    mask: List[Optional[torch.Tensor]] = [None]

    def make_hook(name):
        def hook(mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if name not in order:
                order.append(name)
            traces[name].add(select_valid(args[0], mask[0]), name)
        return hook

    handles = [get_module(work, n).register_forward_pre_hook(make_hook(n)) for n in names]
    kept: List[Any] = []
    extra: List[Any] = []
    n_calib = 0
    trace_error: Optional[BaseException] = None
    try:
        it = iter(loader)
        bar = _bar(it, progress, desc=f"{label}: tracing", total=n_plan)
        with torch.no_grad():
            for batch in bar:
                what = f"loader batch {n_calib}"
                x = call.prepare(batch, device, what)
                mask[0] = call.mask_of(x)
                call.run(work, x, what)
                if len(kept) < int(keep_inputs):
                    kept.append(x)
                n_calib += 1
                if n_calib >= n_plan:
                    break
            if hasattr(bar, "close"):
                bar.close()
            if int(extra_inputs) > 0:
                for batch in it:
                    extra.append(call.prepare(batch, device,
                                              f"loader batch {n_calib + len(extra)}"))
                    if len(extra) >= int(extra_inputs):
                        break
    except Exception as e:
        trace_error = e
    finally:
        mask[0] = None
        for h in handles:
            h.remove()
    # Under torchrun every rank traced its shard: fail together (no rank hangs
    # in a collective), then merge into the trace of the union of the shards.
    _dist.raise_if_any_failed(trace_error, f"{who} tracing")
    if _dist.is_distributed():
        n_calib = int(_dist.all_reduce_sum([n_calib], dtype=torch.int64)[0])
        merge_traces(traces)
        order = next((o for o in _dist.all_gather_objects(order) if o), order)
    if n_calib == 0:
        raise ValueError(f"{who}: the loader yielded no batch")
    return Traces(traces, order, n_calib, kept, extra, note)


def merge_traces(traces: Dict[str, Any]) -> None:
    """Combine the per-layer calibration traces of all ranks, in place.

    ``traces`` maps layer names (the same on every rank) to :class:`Trace`
    objects filled from this rank's shard. Afterwards every rank holds the
    same merged trace:

    - ``lo``/``hi`` (and the signed values attaining them): the minimum
      nonzero / maximum magnitude over all ranks (ties: the lowest rank);
    - ``vmin``/``vmax`` (signed extremes): min/max over ranks;
    - ``negative``: any rank saw a negative input; ``count``/``calls``: sums;
    - the sample: priority sampling keeps the ``size`` smallest of i.i.d.
      uniform keys, so the union of the ranks' samples cut back to the
      ``size`` smallest keys is a uniform sample of the union of all inputs.
      This needs independent keys on different ranks: seed each rank's key
      generator differently (``seed + rank``).

    A single process (or world size 1) leaves ``traces`` unchanged.
    """
    if not _dist.is_distributed() or _dist.world_size() == 1:
        return
    names = sorted(traces)
    local = {n: {f: getattr(traces[n], f) for f in TRACE_FIELDS if hasattr(traces[n], f)}
             for n in names}
    parts = _dist.all_gather_objects(local)
    for p in parts:
        if sorted(p) != names:
            raise RuntimeError("dnateq.quantize: ranks traced different layers; every rank "
                               "must calibrate the same model")
    for n in names:
        t = traces[n]
        recs = [p[n] for p in parts]
        t.lo, t.lo_val, t.hi, t.hi_val = math.inf, 0.0, 0.0, 0.0
        for r in recs:   # rank order: strict comparisons keep the lowest rank on ties
            if r["lo"] < t.lo:
                t.lo, t.lo_val = r["lo"], r["lo_val"]
            if r["hi"] > t.hi:
                t.hi, t.hi_val = r["hi"], r["hi_val"]
        if "vmin" in recs[0]:   # signed extremes (ranges of the uniform baselines)
            t.vmin = min(r["vmin"] for r in recs)
            t.vmax = max(r["vmax"] for r in recs)
        t.negative = any(r["negative"] for r in recs)
        t.count = sum(int(r["count"]) for r in recs)
        t.calls = sum(int(r["calls"]) for r in recs)
        keys = torch.cat([r["keys"].reshape(-1).float().cpu() for r in recs])
        vals = torch.cat([r["vals"].reshape(-1).float().cpu() for r in recs])
        if keys.numel() > t.size:
            # a stable sort makes the kept set and its order identical on all ranks
            kept = torch.sort(keys, stable=True).indices[:t.size]
            keys, vals = keys[kept], vals[kept]
        t.keys, t.vals = keys, vals
        t.kmax = float(keys.max()) if keys.numel() else 1.0


#: The state of a :class:`Trace` that :func:`merge_traces` combines
#: (``vmin``/``vmax`` where the trace has them).
TRACE_FIELDS = ("vals", "keys", "lo", "hi", "lo_val", "hi_val", "negative", "count", "calls",
                "vmin", "vmax")
