"""Model calibration: ``dnateq.quantize(model, loader, **options)`` (SPEC section 3).

The offline methodology of DNA-TEQ on any PyTorch model:

1. ``nn.MultiheadAttention`` modules are replaced by float equivalents with
   explicit Q/K/V/out ``nn.Linear``s (:class:`dnateq.nn.ExpMultiheadAttention`).
2. Forward pre-hooks on every quantizable layer (``nn.Linear``, ``nn.Conv2d``
   with zero padding) record the layer's input over ``calib_batches`` batches
   into a bounded, uniformly random sample per layer (priority sampling: every
   element gets a random key and the ``sample_size`` smallest keys are kept,
   so memory does not grow with the number of batches). The exact smallest
   and largest nonzero magnitudes and whether any input was negative are
   tracked over the whole trace, so the fit covers the true range.
3. Per layer: the exponential-fit RSS (scipy.stats, SPEC section 2) of W and A
   picks the tensor that starts the base search; for each ``n`` in ``bits``
   ``dnateq.exp_fit`` fits that tensor and the other one reuses its alpha.
4. Outer loop over ``Thr_w`` = ``threshold_step``, 2x, ... ``max_threshold``:
   bit choice by table look-up, one evaluation per distinct configuration;
   the last configuration whose loss is within ``max_loss`` is kept.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .eval import distributed as _dist
from .nn.modules import ExpConv2d, ExpLinear, ExpMultiheadAttention, MODES, ROUNDINGS
from .nn.uniform import UniformConv2d, UniformLinear

# Layer types that replace float ones (fused fast paths must not bypass them).
_QUANTIZED = (ExpLinear, ExpConv2d, UniformLinear, UniformConv2d)

__all__ = ["quantize", "exponential_rss", "batch_input", "INPUT_KEYS", "select_layers",
           "trace_layers", "Traces", "deliver", "choose_bits"]

#: Keys tried, in order, to find the model input in a dict batch; when none is
#: present the first tensor value of the dict is used.
INPUT_KEYS = ("input", "inputs", "x", "pixel_values", "input_ids", "image", "images")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def batch_input(batch: Any, who: str = "dnateq.quantize") -> Any:
    """The model input of one loader batch: a tensor as is; the first item of a
    tuple/list; for a dict the value of the first key of :data:`INPUT_KEYS`
    present, else its first tensor value."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError(f"{who}: a loader batch is an empty tuple/list")
        return batch[0]
    if isinstance(batch, dict):
        for k in INPUT_KEYS:
            if k in batch:
                return batch[k]
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v
        raise ValueError(f"{who}: a dict batch has no tensor value (keys "
                         f"{list(batch)}); expected one of {INPUT_KEYS}")
    raise TypeError(f"{who}: loader batches must be tensors, tuples/lists or "
                    f"dicts, got {type(batch).__name__}")


def exponential_rss(x: torch.Tensor, normalize: bool = False, bins: int = 100) -> float:
    """RSS of the exponential fit (scipy.stats ``expon.fit`` with ``floc=0``) to the
    nonzero magnitudes of ``x`` against their 100-bin density histogram (SPEC
    section 2). ``normalize`` divides the magnitudes by their mean first.
    A tensor with fewer than two distinct nonzero magnitudes gives ``inf``."""
    from scipy import stats
    m = x.detach().reshape(-1).abs().double()
    m = m[m != 0].cpu().numpy()
    if m.size < 2 or float(m.max()) == float(m.min()):
        return math.inf   # degenerate: never the tensor that starts the search
    if normalize:
        m = m / m.mean()
    loc, scale = stats.expon.fit(m, floc=0)
    dens, edges = np.histogram(m, bins=bins, density=True)
    centers = 0.5 * (edges[:-1] + edges[1:])
    return float(np.sum((dens - stats.expon.pdf(centers, loc=loc, scale=scale)) ** 2))


class _Trace:
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


def _get_parent(root: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parts = name.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = _get_parent(root, name)
    setattr(parent, attr, module)


def _get_module(root: nn.Module, name: str) -> nn.Module:
    parent, attr = _get_parent(root, name)
    return getattr(parent, attr)


def _matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p)
               for p in patterns)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(t, device) for t in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    raise TypeError(f"dnateq.quantize: cannot find a tensor in the model output "
                    f"({type(out).__name__}) for the proxy metric; pass eval_fn")


def proxy_quality(ref_outputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """The proxy quality in percent: top-1 agreement with the float model for
    ``[B, C]`` logits, else 100 x mean cosine similarity (per sample)."""
    agree, total, cos = 0.0, 0, []
    for r, o in zip(ref_outputs, outputs):
        r, o = r.float(), o.float()
        if r.dim() == 2 and r.shape[1] > 1:
            agree += float((r.argmax(1) == o.argmax(1)).sum())
            total += r.shape[0]
        else:
            rr = r.reshape(r.shape[0], -1) if r.dim() > 1 else r.reshape(1, -1)
            oo = o.reshape(rr.shape)
            cos.append(torch.nn.functional.cosine_similarity(rr, oo, dim=1, eps=1e-12))
    if _dist.is_distributed():
        # every rank holds its own held-out batches: the quality of the union
        c = torch.cat(cos) if cos else torch.zeros(0)
        agree, total, csum, cn = _dist.all_reduce_sum(
            [agree, total, float(c.double().sum()), c.numel()]).tolist()
        return 100.0 * agree / total if total else 100.0 * csum / cn
    if total:
        return 100.0 * agree / total
    return 100.0 * float(torch.cat(cos).mean())


def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, **kw)



# ---------------------------------------------------------------------------
# layer selection and tracing (shared with dnateq.baselines and dnateq.analysis)
# ---------------------------------------------------------------------------

_PROJS = ("q_proj", "k_proj", "v_proj", "out_proj")


def select_layers(work: nn.Module, layers: Optional[Sequence[str]] = None,
                  skip: Optional[Sequence[str]] = None, who: str = "dnateq.quantize"
                  ) -> Tuple[List[str], List[str], Dict[str, str]]:
    """Prepare ``work`` (modified in place) and list its quantizable layers.

    Selected ``nn.MultiheadAttention`` modules are replaced by
    :class:`dnateq.nn.ExpMultiheadAttention` (explicit Q/K/V/out ``nn.Linear``s,
    float) so each projection is its own layer. Returns ``(mha_names, cands,
    skipped)``: the replaced attention modules, the candidate layer names in
    ``named_modules`` order, and ``{name: reason}`` for the layers left float.
    Every quantizer uses this one selection, so baselines cover the same layers.
    """
    mha_names = [n for n, m in work.named_modules()
                 if isinstance(m, nn.MultiheadAttention) and n and not _matches(n, skip)
                 and (layers is None or _matches(n, layers)
                      or any(_matches(f"{n}.{p}", layers) for p in _PROJS))]
    for n in mha_names:
        _set_module(work, n, ExpMultiheadAttention.from_float(_get_module(work, n)))
    for m in work.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False   # the nested fast path bypasses the modules
    skipped: Dict[str, str] = {}
    cands: List[str] = []
    kept_mha = [n for n, m in work.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for n, m in work.named_modules():
        if isinstance(m, _QUANTIZED):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if any(n.startswith(k + ".") for k in kept_mha):
                skipped[n] = "inside a skipped nn.MultiheadAttention"
                continue
            if layers is not None and not _matches(n, layers):
                continue
            if _matches(n, skip):
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


class Traces:
    """What :func:`trace_layers` collected: ``traces`` ({name: bounded sample
    with exact extremes}), ``order`` (names in first-execution order),
    ``batches`` (calibration batches run), ``kept`` (the first calibration
    inputs kept, on the model's device) and ``extra`` (further loader inputs,
    not run)."""

    def __init__(self, traces, order, batches, kept, extra):
        self.traces, self.order, self.batches = traces, order, batches
        self.kept, self.extra = kept, extra


def trace_layers(work: nn.Module, names: Sequence[str], loader: Iterable, *,
                 calib_batches: int = 8, sample_size: int = 1 << 18, seed: int = 0,
                 progress: bool = True, keep_inputs: int = 0, extra_inputs: int = 0,
                 who: str = "dnateq.quantize", label: str = "dnateq") -> Traces:
    """Run ``work`` on ``calib_batches`` loader batches and record the input of
    every layer in ``names`` (forward pre-hooks, bounded memory: see
    :class:`_Trace`). ``keep_inputs`` of the calibration inputs are kept and up
    to ``extra_inputs`` further batches are read (not run) for held-out
    evaluation. Raises when the loader is empty, a batch is malformed or the
    model cannot take it, or activations are non-finite; messages start with
    ``who``, the progress bar with ``label``."""
    gen = torch.Generator()
    gen.manual_seed(int(seed) + _dist.rank())   # independent sampling keys per rank
    traces = {n: _Trace(sample_size, gen, who) for n in names}
    order: List[str] = []
    device = _model_device(work)

    def make_hook(name):
        def hook(mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if name not in order:
                order.append(name)
            traces[name].add(args[0], name)
        return hook

    handles = [_get_module(work, n).register_forward_pre_hook(make_hook(n)) for n in names]
    kept: List[Any] = []
    extra: List[Any] = []
    n_calib = 0
    trace_error: Optional[BaseException] = None
    try:
        it = iter(loader)
        bar = _progress(it, progress, desc=f"{label}: tracing", total=int(calib_batches))
        with torch.no_grad():
            for batch in bar:
                x = _to_device(batch_input(batch, who), device)
                try:
                    work(x)
                except Exception as e:
                    if str(e).startswith(who):
                        raise
                    raise RuntimeError(f"{who}: the model cannot take loader batch "
                                       f"{n_calib} (input {_describe(x)}): "
                                       f"{type(e).__name__}: {e}") from e
                if len(kept) < int(keep_inputs):
                    kept.append(x)
                n_calib += 1
                if n_calib >= int(calib_batches):
                    break
            if hasattr(bar, "close"):
                bar.close()
            if int(extra_inputs) > 0:
                for batch in it:
                    extra.append(_to_device(batch_input(batch, who), device))
                    if len(extra) >= int(extra_inputs):
                        break
    except Exception as e:
        trace_error = e
    finally:
        for h in handles:
            h.remove()
    # Under torchrun every rank traced its shard: fail together (no rank hangs
    # in a collective), then merge into the trace of the union of the shards.
    _dist.raise_if_any_failed(trace_error, f"{who} tracing")
    if _dist.is_distributed():
        n_calib = int(_dist.all_reduce_sum([n_calib], dtype=torch.int64)[0])
        _dist.merge_traces(traces)
        order = next((o for o in _dist.all_gather_objects(order) if o), order)
    if n_calib == 0:
        raise ValueError(f"{who}: the loader yielded no batch")
    return Traces(traces, order, n_calib, kept, extra)

# ---------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------

def choose_bits(tables: Dict[str, Dict[str, Any]], order: Sequence[str], thr: float,
                bits: Sequence[int], first_layer_divisor: float,
                act_threshold_scale) -> Dict[str, int]:
    """The bit choice of SPEC section 3, item 4 for ``Thr_w = thr``, from
    ``dnateq_info["tables"]``: per layer the lowest ``n`` whose RMAE of W and A
    are within ``Thr_w`` and ``Thr_act``, else the largest; the first layer in
    execution order uses ``thr / first_layer_divisor``. The same rule as
    ``dnateq.quantize`` and :func:`dnateq.analysis.threshold_sweep` use."""
    bits = sorted(bits)
    first = order[0] if order else None
    cfg: Dict[str, int] = {}
    for n in order:
        rows = tables[n]["rows"]
        if act_threshold_scale == "auto":
            r = rows[bits[0]]
            scale = r["rmae_a"] / r["rmae_w"] if r["rmae_w"] > 0 else 1.0
        else:
            scale = float(act_threshold_scale)
        tw = thr / first_layer_divisor if n == first else thr
        ta = tw * scale
        pick = bits[-1]
        for b in bits:
            if rows[b]["rmae_w"] <= tw and rows[b]["rmae_a"] <= ta:
                pick = b
                break
        cfg[n] = pick
    return cfg


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
             seed: int = 0) -> nn.Module:
    """Calibrate ``model`` on ``loader`` and return it with DNA-TEQ quantized layers.

    Args:
        model: a float ``nn.Module``. Quantizable layers: ``nn.Linear``,
            ``nn.Conv2d`` (``padding_mode="zeros"``; others stay float and are
            listed as skipped) and the Q/K/V/out projections of
            ``nn.MultiheadAttention`` (replaced by :class:`dnateq.nn.ExpMultiheadAttention`).
        loader: an iterable of batches: tensors, tuples/lists (the first item is
            the input) or dicts (the value of the first key present among
            ``"input", "inputs", "x", "pixel_values", "input_ids", "image",
            "images"``, else the first tensor value). The model is called as
            ``model(input)``; inputs are moved to the model's device.
        eval_fn: ``eval_fn(model) -> float``, higher is better. When None, a
            proxy in percent on held-out loader batches: top-1 agreement with the
            float model for ``[B, C]`` logits, else 100 x mean cosine similarity.
        max_loss: the allowed quality loss, in ``eval_fn``'s units (default 1.0).
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
            batches held out for evaluation (default 4); when the loader has no
            more batches, the first calibration batches are reused (up to
            ``eval_batches`` of them are kept for that).
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

    Returns:
        The quantized model (a deep copy unless ``inplace``). ``model.dnateq_info``
        holds the calibration record (per-layer tables, thresholds tried,
        qualities, skipped layers, fallback flag) used by :func:`dnateq.report`.

    Raises:
        ValueError / TypeError / RuntimeError with a clear message for bad
        input (no quantizable layer, empty loader, non-finite activations, a
        batch the model cannot take); the caller's model is then unchanged.
    """
    # -- option checks -----------------------------------------------------------
    if not isinstance(model, nn.Module):
        raise TypeError(f"dnateq.quantize: model must be an nn.Module, got {type(model).__name__}")
    bits = sorted({int(b) for b in bits})
    if not bits or bits[0] < 2 or bits[-1] > 7:
        raise ValueError(f"dnateq.quantize: bits must be values in [2, 7], got {bits}")
    if search not in ("golden", "paper"):
        raise ValueError(f"dnateq.quantize: search must be 'golden' or 'paper', got {search!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"dnateq.quantize: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if mode not in MODES:
        raise ValueError(f"dnateq.quantize: mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(act_threshold_scale, str) and act_threshold_scale == "auto"):
        try:
            act_threshold_scale = float(act_threshold_scale)
        except (TypeError, ValueError):
            raise ValueError("dnateq.quantize: act_threshold_scale must be a positive float "
                             f"or 'auto', got {act_threshold_scale!r}") from None
        if not act_threshold_scale > 0:
            raise ValueError(f"dnateq.quantize: act_threshold_scale must be > 0, got "
                             f"{act_threshold_scale}")
    if not threshold_step > 0 or not max_threshold >= threshold_step:
        raise ValueError(f"dnateq.quantize: need 0 < threshold_step <= max_threshold, got "
                         f"{threshold_step}, {max_threshold}")
    if not first_layer_divisor > 0:
        raise ValueError(f"dnateq.quantize: first_layer_divisor must be > 0, got "
                         f"{first_layer_divisor}")
    if int(calib_batches) < 1:
        raise ValueError(f"dnateq.quantize: calib_batches must be >= 1, got {calib_batches}")
    if int(eval_batches) < 1:
        raise ValueError(f"dnateq.quantize: eval_batches must be >= 1, got {eval_batches}")
    if int(sample_size) < 16:
        raise ValueError(f"dnateq.quantize: sample_size must be >= 16, got {sample_size}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError("dnateq.quantize: eval_fn must be callable (model -> float)")

    # -- work on a copy: the caller's model is never touched before success ------
    work = copy.deepcopy(model)
    was_training = model.training
    work.eval()

    # 1. MultiheadAttention -> explicit projections; candidate layers.
    mha_names, cands, skipped = select_layers(work, layers, skip)

    # 2. Traces.
    clock = [time.perf_counter()]
    tr = trace_layers(work, cands, loader, calib_batches=calib_batches,
                      sample_size=sample_size, seed=seed, progress=progress,
                      keep_inputs=int(eval_batches) if eval_fn is None else 0,
                      extra_inputs=int(eval_batches) if eval_fn is None else 0)
    traces, order, calib_inputs, eval_inputs = tr.traces, tr.order, tr.kept, tr.extra
    for n in cands:
        if traces[n].calls == 0:
            skipped[n] = "not executed during calibration"
    qnames = [n for n in order if n in traces and traces[n].calls > 0]
    if not qnames:
        raise ValueError("dnateq.quantize: no quantizable layer was executed by the model "
                         "on the calibration batches")

    clock.append(time.perf_counter())

    # 3. Per-layer tables.
    tables: Dict[str, Dict[str, Any]] = {}
    for n in _progress(qnames, progress, desc="dnateq: fitting"):
        mod = _get_module(work, n)
        w = mod.weight.detach().float().cpu()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"dnateq.quantize: layer '{n}' has non-finite weights")
        a = traces[n].sample()
        rss_w = exponential_rss(w, rss_normalize)
        rss_a = exponential_rss(a, rss_normalize)
        start = "A" if rss_a < rss_w else "W"
        rows = {}
        for b in bits:
            if start == "W":
                alpha, sw, bw, rw = ops.exp_fit(w, b, search, rounding)
                _, sa, ba, ra = ops.exp_fit(a, b, search, rounding, alpha)
            else:
                alpha, sa, ba, ra = ops.exp_fit(a, b, search, rounding)
                _, sw, bw, rw = ops.exp_fit(w, b, search, rounding, alpha)
            rows[b] = dict(alpha=alpha, sw=sw, bw=bw, sa=sa, ba=ba, rmae_w=rw, rmae_a=ra)
        tables[n] = dict(rows=rows, rss_w=rss_w, rss_a=rss_a, start=start,
                         a_signed=traces[n].negative, kind=type(mod).__name__)
    traces.clear()
    clock.append(time.perf_counter())

    first = qnames[0]

    def choose(thr: float) -> Dict[str, int]:
        return choose_bits(tables, qnames, thr, bits, first_layer_divisor, act_threshold_scale)

    # 4. Threshold loop.
    floats = {n: _get_module(work, n) for n in qnames}
    cache: Dict[Tuple[str, int], nn.Module] = {}
    eval_mode = "lut" if mode == "count" else mode

    def build(n, b):
        key = (n, b)
        if key not in cache:
            t = tables[n]
            r = t["rows"][b]
            info = dict(rmae_w=r["rmae_w"], rmae_a=r["rmae_a"], rss_w=t["rss_w"],
                        rss_a=t["rss_a"], start=t["start"], first_layer=(n == first))
            cls = ExpLinear if isinstance(floats[n], nn.Linear) else ExpConv2d
            cache[key] = cls.from_float(floats[n], b, (r["alpha"], r["sw"], r["bw"]),
                                        (r["alpha"], r["sa"], r["ba"]),
                                        a_signed=t["a_signed"], rounding=rounding,
                                        mode=eval_mode, info=info)
        return cache[key]

    def apply(cfg: Dict[str, int]) -> None:
        for n, b in cfg.items():
            _set_module(work, n, build(n, b))
        _disable_fast_paths(work)

    ref_outputs: List[torch.Tensor] = []
    if eval_fn is None:
        if not eval_inputs:   # no held-out batches: reuse the calibration ones
            eval_inputs = calib_inputs
        with torch.no_grad():
            ref_outputs = [_first_tensor(work(x)).detach() for x in eval_inputs]

    def evaluate() -> float:
        work.eval()
        if eval_fn is not None:
            q = float(eval_fn(work))
        else:
            with torch.no_grad():
                q = proxy_quality(ref_outputs, [_first_tensor(work(x)) for x in eval_inputs])
        if not math.isfinite(q):
            raise ValueError(f"dnateq.quantize: the quality metric returned {q}")
        return q

    base = evaluate()
    steps = int(math.floor(max_threshold / threshold_step + 1e-9))
    history: List[Dict[str, Any]] = []
    best_cfg: Optional[Dict[str, int]] = None
    best_q: Optional[float] = None
    best_thr: Optional[float] = None
    last_cfg: Optional[Dict[str, int]] = None
    last_q: Optional[float] = None
    bar = _progress(range(1, steps + 1), progress, desc="dnateq: thresholds")
    for i in bar:
        thr = round(i * threshold_step, 10)
        cfg = choose(thr)
        if cfg == last_cfg:
            q = last_q       # same configuration: no new evaluation
            evaluated = False
        else:
            apply(cfg)
            q = evaluate()
            evaluated = True
        ok = base - q <= max_loss
        history.append(dict(threshold=thr, bits=dict(cfg), quality=q, loss=base - q,
                            passed=ok, evaluated=evaluated))
        last_cfg, last_q = cfg, q
        if not ok:
            break
        best_cfg, best_q, best_thr = cfg, q, thr
        if all(b == bits[0] for b in cfg.values()):
            break
    fallback = best_cfg is None
    if fallback:
        warnings.warn(f"dnateq.quantize: even the first threshold ({threshold_step:.2%}) loses "
                      f"more than max_loss={max_loss}; returning the all-{bits[-1]}-bit "
                      "configuration", RuntimeWarning, stacklevel=2)
        best_cfg = {n: bits[-1] for n in qnames}
        apply(best_cfg)
        best_q = evaluate()
    else:
        apply(best_cfg)
    for n in qnames:
        mod = _get_module(work, n)
        mod.mode = mode
    if hasattr(bar, "close"):
        bar.close()

    clock.append(time.perf_counter())
    info = dict(
        # wall-clock seconds per phase (the search includes building the
        # quantized layers and every evaluation)
        timing=dict(trace=clock[1] - clock[0], tables=clock[2] - clock[1],
                    search=clock[3] - clock[2], total=clock[3] - clock[0]),
        base_quality=base, quality=best_q, loss=base - best_q, threshold=best_thr,
        fallback=fallback, metric="eval_fn" if eval_fn is not None else "proxy",
        history=history, skipped=skipped, order=list(qnames), first_layer=first,
        tables={n: dict(start=t["start"], rss_w=t["rss_w"], rss_a=t["rss_a"],
                        a_signed=t["a_signed"], rows={b: dict(r) for b, r in t["rows"].items()})
                for n, t in tables.items()},
        mha_replaced=list(mha_names),
        options=dict(max_loss=max_loss, bits=list(bits), search=search, rounding=rounding,
                     first_layer_divisor=first_layer_divisor,
                     act_threshold_scale=act_threshold_scale, threshold_step=threshold_step,
                     max_threshold=max_threshold, rss_normalize=rss_normalize,
                     calib_batches=calib_batches, mode=mode, seed=seed),
    )
    return deliver(work, model, inplace, was_training, mha_names, qnames, "dnateq_info", info)


def deliver(work: nn.Module, model: nn.Module, inplace: bool, was_training: bool,
            mha_names: Sequence[str], names: Sequence[str], attr: str,
            info: Dict[str, Any]) -> nn.Module:
    """The result of a quantizer that worked on ``work``, a copy of ``model``:
    ``work`` itself, or with ``inplace`` the replaced attention modules and
    quantized layers moved into ``model``. Either way the fused fast paths are
    off, the training flag is the caller's and the record is set as ``attr``."""
    _disable_fast_paths(work)
    work.train(was_training)
    setattr(work, attr, info)
    if not inplace:
        return work
    for n in mha_names:
        _set_module(model, n, _get_module(work, n))
    for n in names:
        if not any(n.startswith(mn + ".") for mn in mha_names):
            _set_module(model, n, _get_module(work, n))
    _disable_fast_paths(model)
    setattr(model, attr, info)
    return model


def _disable_fast_paths(root: nn.Module) -> None:
    """PyTorch's fused Transformer fast paths read the layers' float weights
    directly, bypassing (or failing on) quantized modules: turn them off where a
    quantized module lives inside (per instance, documented flags)."""
    for m in root.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
        if isinstance(m, nn.TransformerEncoderLayer) and any(
                isinstance(c, _QUANTIZED) for c in m.modules()):
            # only gates the fast path; the activation itself is m.activation
            m.activation_relu_or_gelu = 0


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {list(x.shape)} {x.dtype}"
    return type(x).__name__
