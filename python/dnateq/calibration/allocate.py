"""Step 4 of calibration (SPEC section 3, items 4 and 5): choosing ``n`` per
layer.

:class:`LayerSearch` is the one search object every allocation uses (and
:func:`dnateq.analysis.threshold_sweep` reuses): it swaps cached quantized
layers into the working model and measures a configuration's quality, each
distinct configuration once. A *strategy* is a function
``strategy(search, config) -> Allocation``; :data:`STRATEGIES` maps
``QuantizeConfig.method`` names to them. ``"paper"`` is the paper's threshold
rule (:func:`threshold_rule`); further strategies register themselves with
:func:`register_strategy` (e.g. a sensitivity-guided one in
``dnateq.calibration.sensitivity``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from .._common import progress as _bar
from .._common import set_module
from .build import LayerCache
from .quality import Quality
from .select import disable_fast_paths

__all__ = ["choose_bits", "LayerSearch", "Allocation", "threshold_rule", "STRATEGIES",
           "register_strategy", "bit_totals"]


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


def bit_totals(floats: Dict[str, nn.Module], cfg: Dict[str, int]) -> Tuple[float, float]:
    """``(average bits, storage bits)`` of a configuration, weighted by weight
    count: ``n`` (the paper's convention), and ``n`` plus the sign bit of signed
    weights."""
    nw = avg = sto = 0.0
    for n, b in cfg.items():
        w = floats[n].weight
        k = w.numel()
        nw += k
        avg += b * k
        sto += (b + (1 if bool((w < 0).any()) else 0)) * k
    return avg / nw, sto / nw


class LayerSearch:
    """The working model with its quantized-layer cache and quality measure.

    ``names``: the quantized layers in execution order; ``tables``: their
    fitted tables; ``bits``: the candidate ``n``, ascending; ``build``: a
    :class:`LayerCache`; ``quality``: a :class:`Quality` of ``work``;
    ``aliases``: {name: [other names of the same module]} (set alike).
    ``base`` is the float model's quality (measured on construction, before any
    layer is swapped). :meth:`measure` returns a configuration's quality,
    evaluating each distinct configuration once."""

    def __init__(self, work: nn.Module, names: Sequence[str], tables: Dict[str, Dict[str, Any]],
                 bits: Sequence[int], build: LayerCache, quality: Quality,
                 aliases: Optional[Dict[str, Sequence[str]]] = None):
        self.work, self.names, self.tables = work, list(names), tables
        self.aliases = {n: list(a) for n, a in (aliases or {}).items()}
        self.bits = sorted(int(b) for b in bits)
        self.build, self.quality = build, quality
        self.floats = build.floats
        self.evaluations = 0
        self._seen: Dict[Tuple[int, ...], float] = {}
        # The output-fidelity measure (a calibration.quality.Fidelity) of the
        # floor min_cosine, set by the pipeline; None: no floor.
        self.fidelity: Optional[Callable[[], float]] = None
        self._cos: Dict[Tuple[int, ...], float] = {}
        self.base = quality()

    def apply(self, cfg: Dict[str, int]) -> None:
        """Swap the quantized layers of ``cfg`` ({name: n}) into the working model."""
        for n, b in cfg.items():
            layer = self.build(n, b)
            for a in [n] + self.aliases.get(n, []):   # a shared layer stays shared
                set_module(self.work, a, layer)
        disable_fast_paths(self.work)

    def measure(self, cfg: Dict[str, int]) -> Tuple[float, bool]:
        """``(quality, evaluated)`` of ``cfg`` (applied to the working model
        when evaluated; ``evaluated`` is False when it was measured before)."""
        key = tuple(cfg[n] for n in self.names if n in cfg)
        if key in self._seen:
            return self._seen[key], False
        self.apply(cfg)
        q = self.quality()
        self.evaluations += 1
        self._seen[key] = q
        return q, True

    def cosine(self, cfg: Dict[str, int]) -> Optional[float]:
        """The mean cosine of ``cfg``'s outputs to the float model's
        (:attr:`fidelity`, each distinct configuration once; ``cfg`` is applied
        when measured), or None without a fidelity measure."""
        if self.fidelity is None:
            return None
        key = tuple(cfg[n] for n in self.names if n in cfg)
        if key not in self._cos:
            self.apply(cfg)
            self._cos[key] = float(self.fidelity())
        return self._cos[key]

    def threshold_bits(self, thr: float, first_layer_divisor: float,
                       act_threshold_scale) -> Dict[str, int]:
        """The paper's bit choice at ``Thr_w = thr`` (:func:`choose_bits`)."""
        return choose_bits(self.tables, self.names, thr, self.bits, first_layer_divisor,
                           act_threshold_scale)

    def bit_totals(self, cfg: Dict[str, int]) -> Tuple[float, float]:
        return bit_totals(self.floats, cfg)


@dataclass
class Allocation:
    """A strategy's answer: ``bits`` ({name: n}), its ``quality``, the
    ``threshold`` kept (None for strategies without one), the ``history`` of
    steps tried, ``fallback`` (no step passed: all at the largest ``n``) and
    ``record``, strategy-specific entries merged into ``dnateq_info``."""
    bits: Dict[str, int]
    quality: float
    threshold: Optional[float] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    fallback: bool = False
    record: Dict[str, Any] = field(default_factory=dict)


def threshold_rule(search: LayerSearch, config) -> Allocation:
    """The paper's outer loop (SPEC section 3, item 5): ``Thr_w`` =
    ``threshold_step``, 2x, ... up to ``max_threshold`` while the loss stays
    within ``max_loss``; the last passing configuration is kept. Stops early
    once every layer is at the smallest ``n``; if even the first threshold
    fails, the all-largest-``n`` configuration with a RuntimeWarning."""
    bits = search.bits
    steps = int(math.floor(config.max_threshold / config.threshold_step + 1e-9))
    history: List[Dict[str, Any]] = []
    best_cfg: Optional[Dict[str, int]] = None
    best_q: Optional[float] = None
    best_thr: Optional[float] = None
    bar = _bar(range(1, steps + 1), config.progress, desc="dnateq: thresholds")
    for i in bar:
        thr = round(i * config.threshold_step, 10)
        cfg = search.threshold_bits(thr, config.first_layer_divisor, config.act_threshold_scale)
        q, evaluated = search.measure(cfg)
        ok = search.base - q <= config.max_loss
        history.append(dict(threshold=thr, bits=dict(cfg), quality=q, loss=search.base - q,
                            passed=ok, evaluated=evaluated))
        if not ok:
            break
        best_cfg, best_q, best_thr = cfg, q, thr
        if all(b == bits[0] for b in cfg.values()):
            break
    if hasattr(bar, "close"):
        bar.close()
    if best_cfg is None:
        warnings.warn(f"dnateq.quantize: even the first threshold ({config.threshold_step:.2%}) "
                      f"loses more than max_loss={config.max_loss}; returning the "
                      f"all-{bits[-1]}-bit configuration", RuntimeWarning, stacklevel=3)
        best_cfg = {n: bits[-1] for n in search.names}
        search.apply(best_cfg)
        best_q = search.quality()
        return Allocation(best_cfg, best_q, None, history, True)
    search.apply(best_cfg)
    return Allocation(best_cfg, best_q, best_thr, history, False)


#: Allocation strategies by ``QuantizeConfig.method`` name.
STRATEGIES: Dict[str, Callable[[LayerSearch, Any], Allocation]] = {"paper": threshold_rule}


def register_strategy(name: str, fn: Callable[[LayerSearch, Any], Allocation]) -> None:
    """Make ``fn(search, config) -> Allocation`` available as ``method=name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dnateq.calibration: a strategy needs a non-empty name, got {name!r}")
    STRATEGIES[name] = fn
