"""Step 3 of calibration (SPEC section 3, items 2 and 3): per layer and per
candidate ``n``, the fitted parameters and errors of the weights (W) and the
traced activations (A).

The tensor whose exponential-fit RSS is lower starts the base search; the other
one reuses that ``alpha`` and fits its own ``S, beta``. Each tensor is sorted
once for all candidate bit widths (:func:`dnateq.exp_fits`), with results
bit-identical to one :func:`dnateq.exp_fit` call per width.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch

from .. import ops
from .._common import get_module
from .._common import progress as _bar

__all__ = ["exponential_rss", "fit_pair", "fit_layer", "fit_layers"]


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


def fit_pair(first: torch.Tensor, second: torch.Tensor, bits: Sequence[int], search: str,
             rounding: str):
    """``first`` searches its base for every ``n`` in ``bits``; ``second`` reuses
    it. Returns two float64 ``[len(bits), 4]`` tables ``(alpha, S, beta, rmae)``,
    each tensor sorted once."""
    a = ops.exp_fits(first, bits, search, rounding)
    b = ops.exp_fits(second, bits, search, rounding, alpha=a[:, 0].tolist())
    return a, b


def fit_layer(w: torch.Tensor, a: torch.Tensor, bits: Sequence[int], *, search: str = "golden",
              rounding: str = "nearest", rss_normalize: bool = False, a_signed: bool = False,
              kind: str = "Linear") -> Dict[str, Any]:
    """The table of one layer: ``rows`` ({n: alpha, sw, bw, sa, ba, rmae_w,
    rmae_a}), ``rss_w``, ``rss_a``, ``start`` (``"W"`` or ``"A"``, the tensor
    that searched the base), ``a_signed`` and ``kind`` — the record
    ``dnateq_info["tables"]`` keeps per layer."""
    rss_w = exponential_rss(w, rss_normalize)
    rss_a = exponential_rss(a, rss_normalize)
    start = "A" if rss_a < rss_w else "W"
    if start == "W":
        tw, ta = fit_pair(w, a, bits, search, rounding)
    else:
        ta, tw = fit_pair(a, w, bits, search, rounding)
    rows = {}
    for i, b in enumerate(bits):
        alpha, sw, bw, rw = tw[i].tolist()
        alpha_a, sa, ba, ra = ta[i].tolist()
        alpha = alpha if start == "W" else alpha_a
        rows[b] = dict(alpha=alpha, sw=sw, bw=bw, sa=sa, ba=ba, rmae_w=rw, rmae_a=ra)
    return dict(rows=rows, rss_w=rss_w, rss_a=rss_a, start=start, a_signed=bool(a_signed),
                kind=kind)


def fit_layers(work, names: Sequence[str], traces: Mapping[str, Any], config,
               who: str = "dnateq.quantize") -> Dict[str, Dict[str, Any]]:
    """:func:`fit_layer` of every layer in ``names`` (its weights from ``work``,
    its activations from ``traces``), with the options of ``config``."""
    tables: Dict[str, Dict[str, Any]] = {}
    for n in _bar(names, config.progress, desc="dnateq: fitting"):
        mod = get_module(work, n)
        w = mod.weight.detach().float().cpu()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{who}: layer '{n}' has non-finite weights")
        tables[n] = fit_layer(w, traces[n].sample(), config.bits, search=config.search,
                              rounding=config.rounding, rss_normalize=config.rss_normalize,
                              a_signed=traces[n].negative, kind=type(mod).__name__)
    return tables
