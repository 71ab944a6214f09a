"""Sensitivity-guided bit allocation (issue 12, item 2; SPEC section 9 "Bit choice").

Beside the paper's threshold rule (which looks at each tensor's RMAE only),
this allocation measures what each layer's quantization does to the model:

1. :func:`measure_sensitivity`: for every layer and every candidate ``n``,
   only that layer is quantized (the rest stays float) and the model's
   output on a few calibration inputs is compared with the float output:
   ``loss = sum ||y_q - y||^2 / sum ||y||^2`` (relative squared error, which
   adds up over layers whose errors are independent).
2. :func:`greedy_path`: from every layer at the largest ``n``, repeatedly
   lower the one layer (to any smaller ``n``) that adds the least loss per
   weight-bit saved, until every layer is at the smallest ``n``. Each point
   of the path is the best configuration found for its average bits
   (weighted by weight count, the paper's convention); losses are first
   made monotone in ``n`` (fewer bits never measure better).
3. :func:`at_budget` takes the first path point within an average-bits
   budget; :func:`search_path` bisects the path for the cheapest point whose
   quality loss (``eval_fn`` or the proxy) stays within ``max_loss``: about
   ``log2(path length)`` evaluations.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["relative_error", "measure_sensitivity", "monotone", "greedy_path", "avg_bits",
           "at_budget", "predicted_loss", "search_path", "search_limit", "sens_inputs"]


def _get_parent(root: nn.Module, name: str):
    parts = name.split(".")
    m = root
    for p in parts[:-1]:
        m = getattr(m, p)
    return m, parts[-1]


def _swap(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, attr = _get_parent(root, name)
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


def relative_error(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """``sum ||out - ref||^2 / sum ||ref||^2`` over the pairs (float64)."""
    num = den = 0.0
    for r, o in zip(ref, out):
        r = r.detach().double()
        num += float((o.detach().double() - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return num / max(den, 1e-300)


def measure_sensitivity(work: nn.Module, names: Sequence[str], bits: Sequence[int],
                        build: Callable[[str, int], nn.Module], inputs: Sequence[Any],
                        run: Callable[[nn.Module, Any], torch.Tensor],
                        after_swap: Optional[Callable[[nn.Module], None]] = None,
                        progress: Optional[Callable] = None) -> Dict[str, Dict[int, float]]:
    """``{layer: {n: loss}}``: the relative output error of ``work`` (evaluated by
    ``run(model, input) -> tensor`` on ``inputs``) with only that layer
    replaced by ``build(layer, n)``. ``work`` is restored after each layer."""
    with torch.no_grad():
        ref = [run(work, x).detach() for x in inputs]
    out: Dict[str, Dict[int, float]] = {}
    it = names if progress is None else progress(names)
    for n in it:
        out[n] = {}
        orig = None
        try:
            for b in sorted(bits):
                q = build(n, b)
                prev = _swap(work, n, q)
                if orig is None:
                    orig = prev
                if after_swap is not None:
                    after_swap(work)
                with torch.no_grad():
                    outs = [run(work, x) for x in inputs]
                out[n][int(b)] = relative_error(ref, outs)
        finally:
            if orig is not None:
                _swap(work, n, orig)
    return out


def monotone(losses: Mapping[int, float]) -> Dict[int, float]:
    """``L(n) = max_{n' >= n} loss(n')``: fewer bits never cost less."""
    out: Dict[int, float] = {}
    run = -math.inf
    for b in sorted(losses, reverse=True):
        v = float(losses[b])
        run = max(run, v if math.isfinite(v) else math.inf)
        out[b] = run
    return out


def avg_bits(cfg: Mapping[str, int], counts: Mapping[str, int]) -> float:
    """Weight-count-weighted average of ``n`` (the paper's convention)."""
    tot = sum(int(counts[n]) for n in cfg)
    return sum(int(b) * int(counts[n]) for n, b in cfg.items()) / max(tot, 1)


def predicted_loss(cfg: Mapping[str, int], sens: Mapping[str, Mapping[int, float]]) -> float:
    """The additive estimate ``sum_layers L_layer(n_layer)``."""
    return sum(monotone(sens[n])[b] for n, b in cfg.items())


def greedy_path(sens: Mapping[str, Mapping[int, float]], counts: Mapping[str, int],
                bits: Sequence[int]) -> List[Dict[str, int]]:
    """Configurations from all-``max(bits)`` to all-``min(bits)``, each one layer
    lower than the previous: the move with the least loss added per
    weight-bit saved (ties: more bits saved, then execution order)."""
    bits = sorted(int(b) for b in bits)
    names = list(sens)
    L = {n: monotone(sens[n]) for n in names}
    cfg = {n: bits[-1] for n in names}
    path = [dict(cfg)]
    while True:
        best = None
        for i, n in enumerate(names):
            b = cfg[n]
            for b2 in bits:
                if b2 >= b:
                    break
                dl = max(L[n][b2] - L[n][b], 0.0)
                db = (b - b2) * max(int(counts[n]), 1)
                key = (dl / db, -db, i)
                if best is None or key < best[0]:
                    best = (key, n, b2)
        if best is None:
            break
        cfg[best[1]] = best[2]
        path.append(dict(cfg))
    return path


def at_budget(path: Sequence[Mapping[str, int]], counts: Mapping[str, int],
              budget: float) -> Dict[str, int]:
    """The first (highest-quality) path point whose average bits is within
    ``budget`` (the last point when none is)."""
    for cfg in path:
        if avg_bits(cfg, counts) <= float(budget) + 1e-9:
            return dict(cfg)
    return dict(path[-1])


def search_path(path: Sequence[Mapping[str, int]], evaluate: Callable[[Mapping[str, int]], float],
                base: float, max_loss: float,
                cosine: Optional[Callable[[Mapping[str, int]], Optional[float]]] = None,
                min_cosine: Optional[float] = None
                ) -> Tuple[Optional[int], List[Dict[str, Any]]]:
    """Bisect ``path`` for the last point that passes (quality assumed to fall
    along the path): its loss ``base - evaluate(cfg)`` is within ``max_loss``
    and, when ``min_cosine`` is set, ``cosine(cfg)`` (measured only once the
    loss passed) is at least ``min_cosine``. Returns ``(index or None when even
    path[0] fails, history)``; each history entry holds ``index, quality,
    loss, cosine, passed`` and ``failed`` (None, ``"loss"`` or ``"fidelity"``)."""
    hist: List[Dict[str, Any]] = []
    seen: Dict[int, bool] = {}
    floor = cosine is not None and min_cosine is not None

    def ok(i: int) -> bool:
        if i not in seen:
            q = float(evaluate(path[i]))
            failed = None if base - q <= max_loss else "loss"
            c = cosine(path[i]) if floor and failed is None else None
            if c is not None and c < float(min_cosine):
                failed = "fidelity"
            seen[i] = failed is None
            hist.append(dict(index=i, quality=q, loss=base - q, cosine=c, passed=seen[i],
                             failed=failed))
        return seen[i]

    last = len(path) - 1
    if ok(last):
        return last, hist
    if not ok(0):
        return None, hist
    lo, hi = 0, last          # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, hist


def search_limit(index: Optional[int], history: Sequence[Mapping[str, Any]],
                 path_length: int) -> str:
    """What stopped :func:`search_path` at ``index``: ``"path_end"`` (every
    layer at the smallest ``n`` passed), ``"loss"`` or ``"fidelity"`` (why the
    next point failed; for ``index`` None, why the first one did)."""
    if index is not None and index == path_length - 1:
        return "path_end"
    nxt = 0 if index is None else index + 1
    for h in history:
        if h["index"] == nxt and not h["passed"]:
            return h.get("failed") or "loss"
    return "loss"


# ---------------------------------------------------------------------------
# the allocation strategy of dnateq.quantize(method="sensitivity")
# ---------------------------------------------------------------------------

#: At most this many samples of the first calibration inputs measure the
#: sensitivities (L x |bits| forward passes).
SENS_SAMPLES = 32


def head(x: Any, k: int) -> Any:
    """The first ``k`` samples of a model input (a tensor, or a dict/tuple of
    tensors sharing the leading batch dimension; anything else unchanged)."""
    if isinstance(x, torch.Tensor):
        return x[:k] if x.dim() > 0 else x
    if isinstance(x, dict):
        return {n: head(v, k) for n, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(head(v, k) for v in x)
    return x


def n_samples(x: Any) -> int:
    """The leading (batch) size of a model input: of a tensor, or of the first
    tensor in a dict/tuple; 1 when there is none."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    vals = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    for v in vals:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def sens_inputs(inputs: Sequence[Any], k: int) -> List[Any]:
    """The first ``k`` samples of the calibration inputs, taken from as many
    inputs as needed (small batches, e.g. 16 sentences, do not cut the
    measurement to one batch)."""
    out: List[Any] = []
    left = int(k)
    for x in inputs:
        if left <= 0:
            break
        m = n_samples(x)
        out.append(head(x, left))
        left -= min(m, left)
    return out


def sensitivity_strategy(search, config):
    """``method="sensitivity"``: measure every layer at every ``n`` on the first
    calibration input, build the greedy path, then take the point at
    ``config.bits_budget`` (when set) or bisect the path with the quality
    measure for the cheapest point within ``max_loss``. Falls back to every
    layer at the largest ``n`` (with a RuntimeWarning) when even that fails."""
    import warnings
    from .allocate import Allocation
    from .select import disable_fast_paths
    inputs = sens_inputs(list(getattr(search, "calib_inputs", None) or search.quality.inputs),
                         SENS_SAMPLES)
    if not inputs:
        raise RuntimeError("dnateq.quantize: method='sensitivity' needs a calibration input")
    from .call import select_valid
    qual = search.quality

    def run(model, x):   # the proxy's comparable output, valid tokens only
        t, _ = qual._output(0, x)
        return select_valid(t, qual.call.mask_of(x))

    sens = measure_sensitivity(search.work, search.names, search.bits, search.build, inputs,
                               run, after_swap=disable_fast_paths)
    counts = {n: int(search.floats[n].weight.numel()) for n in search.names}
    path = greedy_path(sens, counts, search.bits)
    budget = getattr(config, "bits_budget", None)
    min_cos = getattr(config, "min_cosine", None)
    history: List[Dict[str, Any]] = []
    fallback = False
    if budget is not None:   # the budget is the user's: the floor is reported only
        cfg = at_budget(path, counts, budget)
        q, _ = search.measure(cfg)
        history.append(dict(budget=float(budget), bits=dict(cfg), quality=q,
                            loss=search.base - q, passed=search.base - q <= config.max_loss,
                            evaluated=True))
        limit = "budget"
    else:
        def evaluate(cfg):
            return search.measure(cfg)[0]
        idx, hist = search_path(path, evaluate, search.base, config.max_loss,
                                search.cosine, min_cos)
        limit = search_limit(idx, hist, len(path))
        for h in hist:
            h["bits"] = dict(path[h["index"]])
            h["avg_bits"] = avg_bits(path[h["index"]], counts)
            h["evaluated"] = True
        history = hist
        if idx is None:
            fallback = True
            why = (f"loses more than max_loss={config.max_loss}" if limit == "loss" else
                   f"keeps a mean cosine to the float outputs below min_cosine={min_cos}")
            warnings.warn(f"dnateq.quantize: even every layer at {search.bits[-1]} bits {why}; "
                          "returning that configuration", RuntimeWarning, stacklevel=3)
            idx = 0
        cfg = dict(path[idx])
        q, _ = search.measure(cfg)
    cos = search.cosine(cfg) if hasattr(search, "cosine") else None
    search.apply(cfg)
    record = dict(bits_budget=budget, min_cosine=min_cos, cosine=cos, limit=limit,
                  sensitivity={n: {int(b): float(v) for b, v in s.items()}
                               for n, s in sens.items()},
                  path_length=len(path), predicted_loss=predicted_loss(cfg, sens))
    return Allocation(cfg, q, None, history, fallback, record)


def _register() -> None:
    try:
        from .allocate import register_strategy
    except ImportError:
        return
    register_strategy("sensitivity", sensitivity_strategy)


_register()
