"""The options of ``dnateq.quantize`` as one validated dataclass."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Tuple, Union

from ..nn.modules import MODES, ROUNDINGS
from .call import ModelCall

__all__ = ["QuantizeConfig"]

_WHO = "dnateq.quantize"

#: The output-fidelity floor of ``min_cosine="auto"`` with method="sensitivity":
#: the mean cosine to the float model's outputs the issue's users ask of a
#: quantized model (issue 12), not a value fitted to one model.
DEFAULT_MIN_COSINE = 0.99


@dataclass
class QuantizeConfig:
    """Every option of :func:`dnateq.quantize` (documented there), validated
    and normalised by :meth:`validated`: ``bits`` sorted and deduplicated,
    ``act_threshold_scale`` a float (or ``"auto"``).

    ``method`` names the bit-allocation strategy (``"sensitivity"``, the
    default in one process, or ``"paper"``: the threshold rule, the default
    under torchrun with more than one rank, where the sensitivity measurements
    and the mechanism passes are not yet merged across ranks; see
    :data:`dnateq.calibration.allocate.STRATEGIES`); ``passes`` the extra
    calibration passes to run, by name (see
    :data:`dnateq.calibration.pipeline.PASSES`; None = the method's
    :data:`~dnateq.calibration.pipeline.DEFAULT_PASSES`)."""
    eval_fn: Optional[Callable[[Any], float]] = None
    max_loss: float = 1.0
    bits: Sequence[int] = (3, 4, 5, 6, 7)
    search: str = "golden"
    rounding: str = "nearest"
    first_layer_divisor: float = 10.0
    act_threshold_scale: Union[float, str] = 1.0
    threshold_step: float = 0.01
    max_threshold: float = 0.30
    rss_normalize: bool = False
    calib_batches: int = 8
    eval_batches: int = 4
    sample_size: int = 1 << 18
    layers: Optional[Sequence[str]] = None
    skip: Optional[Sequence[str]] = None
    inplace: bool = False
    mode: str = "lut"
    progress: bool = True
    seed: int = 0
    method: Optional[str] = None
    passes: Optional[Tuple[str, ...]] = None
    smoothing: str = "auto"
    bits_budget: Optional[float] = None
    min_cosine: Union[float, str, None] = "auto"
    forward: Optional[Callable[[Any, Any], Any]] = None
    mask: Any = None

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "QuantizeConfig":
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> "QuantizeConfig":
        """A checked, normalised copy; raises ``ValueError``/``TypeError`` naming
        the option."""
        c = dataclasses.replace(self)
        try:
            if isinstance(c.max_loss, (str, bytes)):
                raise TypeError
            max_loss = float(c.max_loss)
        except (TypeError, ValueError):
            raise TypeError(f"{_WHO}: max_loss must be a number, got {c.max_loss!r}") from None
        if not (math.isfinite(max_loss) and max_loss >= 0):
            raise ValueError(f"{_WHO}: max_loss must be finite and >= 0 (in eval_fn's units), "
                             f"got {c.max_loss!r}")
        bits = sorted({int(b) for b in c.bits})
        if not bits or bits[0] < 2 or bits[-1] > 7:
            raise ValueError(f"{_WHO}: bits must be values in [2, 7], got {bits}")
        c.bits = tuple(bits)
        if c.search not in ("golden", "paper"):
            raise ValueError(f"{_WHO}: search must be 'golden' or 'paper', got {c.search!r}")
        if c.rounding not in ROUNDINGS:
            raise ValueError(f"{_WHO}: rounding must be one of {ROUNDINGS}, got {c.rounding!r}")
        if c.mode not in MODES:
            raise ValueError(f"{_WHO}: mode must be one of {MODES}, got {c.mode!r}")
        if not (isinstance(c.act_threshold_scale, str) and c.act_threshold_scale == "auto"):
            try:
                c.act_threshold_scale = float(c.act_threshold_scale)
            except (TypeError, ValueError):
                raise ValueError(f"{_WHO}: act_threshold_scale must be a positive float or "
                                 f"'auto', got {c.act_threshold_scale!r}") from None
            if not c.act_threshold_scale > 0:
                raise ValueError(f"{_WHO}: act_threshold_scale must be > 0, got "
                                 f"{c.act_threshold_scale}")
        if not c.threshold_step > 0 or not c.max_threshold >= c.threshold_step:
            raise ValueError(f"{_WHO}: need 0 < threshold_step <= max_threshold, got "
                             f"{c.threshold_step}, {c.max_threshold}")
        if not c.first_layer_divisor > 0:
            raise ValueError(f"{_WHO}: first_layer_divisor must be > 0, got "
                             f"{c.first_layer_divisor}")
        for name, minimum in (("calib_batches", 1), ("eval_batches", 1), ("sample_size", 16)):
            v = getattr(c, name)
            if int(v) < minimum:
                raise ValueError(f"{_WHO}: {name} must be >= {minimum}, got {v}")
        if c.eval_fn is not None and not callable(c.eval_fn):
            raise TypeError(f"{_WHO}: eval_fn must be callable (model -> float)")
        ModelCall(c.forward, c.mask, _WHO)   # checks forward and mask
        from .allocate import STRATEGIES
        if c.method is None:
            from ..eval import distributed as _dist
            multi = _dist.is_distributed() and _dist.world_size() > 1
            c.method = "paper" if multi else "sensitivity"
        if c.method not in STRATEGIES:
            raise ValueError(f"{_WHO}: method must be one of {sorted(STRATEGIES)}, got "
                             f"{c.method!r}")
        from .pipeline import DEFAULT_PASSES, PASSES
        if c.passes is None:
            c.passes = tuple(DEFAULT_PASSES.get(c.method, ()))
        c.passes = (c.passes,) if isinstance(c.passes, str) else tuple(c.passes or ())
        from .passes import SMOOTH_MODES
        if c.smoothing not in SMOOTH_MODES:
            raise ValueError(f"{_WHO}: smoothing must be one of {SMOOTH_MODES}, got "
                             f"{c.smoothing!r}")
        if c.bits_budget is not None:
            try:
                c.bits_budget = float(c.bits_budget)
            except (TypeError, ValueError):
                raise ValueError(f"{_WHO}: bits_budget must be a number, got "
                                 f"{c.bits_budget!r}") from None
            if not (min(c.bits) <= c.bits_budget) or c.bits_budget != c.bits_budget:
                raise ValueError(f"{_WHO}: bits_budget must be >= min(bits) = {min(c.bits)}, "
                                 f"got {c.bits_budget}")
            if c.method != "sensitivity":
                raise ValueError(f"{_WHO}: bits_budget needs method='sensitivity', got "
                                 f"method={c.method!r}")
        if isinstance(c.min_cosine, str):
            if c.min_cosine != "auto":
                raise ValueError(f"{_WHO}: min_cosine must be a number in (-1, 1], 'auto' or "
                                 f"None, got {c.min_cosine!r}")
            c.min_cosine = DEFAULT_MIN_COSINE if c.method == "sensitivity" else None
        elif c.min_cosine is not None:
            try:
                if isinstance(c.min_cosine, bool):
                    raise TypeError
                v = float(c.min_cosine)
            except (TypeError, ValueError):
                raise TypeError(f"{_WHO}: min_cosine must be a number in (-1, 1], 'auto' or "
                                f"None, got {c.min_cosine!r}") from None
            if not -1.0 < v <= 1.0:
                raise ValueError(f"{_WHO}: min_cosine must be in (-1, 1], got {c.min_cosine!r}")
            if c.method != "sensitivity":
                raise ValueError(f"{_WHO}: min_cosine needs method='sensitivity' (the paper's "
                                 f"rule has no floor), got method={c.method!r}")
            c.min_cosine = v
        unknown = [p for p in c.passes if p not in PASSES]
        if unknown:
            raise ValueError(f"{_WHO}: unknown pass(es) {unknown}; known: {sorted(PASSES)}")
        return c
