"""Per-layer bit plot of a quantized model."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch.nn as nn

from ..report import Report, report

__all__ = ["plot_bits"]


def _layers(obj: Any) -> List[Dict[str, Any]]:
    """``[{name, n, weights, w_signed}]`` from a model, a Report, a Report's
    ``to_dict()`` or a mapping ``{layer: n}`` (weights/sign then unknown)."""
    fn = "dnateq.analysis.plot_bits"
    if isinstance(obj, nn.Module):
        try:
            rows = report(obj).layers
        except ValueError:
            raise ValueError(f"{fn}: qmodel_or_report has no dnateq quantized layer "
                             "(use dnateq.quantize first)") from None
    elif isinstance(obj, Report):
        rows = obj.layers
    elif isinstance(obj, Mapping) and "layers" in obj:
        rows = obj["layers"]
    elif isinstance(obj, Mapping):
        rows = []
        for k, v in obj.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{fn}: a mapping qmodel_or_report must map layer names to "
                                f"int bits; {k!r} maps to {v!r}")
            rows.append(dict(name=str(k), n=v))
    else:
        raise TypeError(f"{fn}: qmodel_or_report must be a quantized model, a dnateq Report, "
                        f"its to_dict() or a {{layer: bits}} mapping, got {type(obj).__name__}")
    if not rows:
        raise ValueError(f"{fn}: qmodel_or_report has no layer")
    return [dict(name=r["name"], n=int(r["n"]), weights=r.get("weights"),
                 w_signed=r.get("w_signed")) for r in rows]


def plot_bits(qmodel_or_report: Any, *, storage: bool = True, title: Optional[str] = None,
              figsize: Optional[Tuple[float, float]] = None):
    """Bar chart of the exponent bits ``n`` of every quantized layer (the paper's
    convention) and, beside each, the storage bits per weight (``n + 1`` for a
    signed weight tensor, SPEC section 1 "Bit accounting"), with dashed lines at
    the weight-count-weighted averages.

    ``qmodel_or_report``: a model from :func:`dnateq.quantize`, a
    :class:`dnateq.Report`, its ``to_dict()``, or a ``{layer: n}`` mapping (then
    only the ``n`` bars, unweighted average). ``storage=False`` draws only the
    ``n`` bars. Returns the matplotlib Figure (one axes; ``len(layers)`` bars
    per series)."""
    import numpy as np
    from matplotlib.figure import Figure

    rows = _layers(qmodel_or_report)
    has_storage = storage and all(r["w_signed"] is not None for r in rows)
    names = [r["name"] for r in rows]
    n = np.array([r["n"] for r in rows], dtype=float)
    if all(r["weights"] is not None for r in rows):
        wts = np.array([r["weights"] for r in rows], dtype=float)
        weighting = "weighted by weights"
    else:
        wts = np.ones(len(rows))
        weighting = "per layer"
    fig = Figure(figsize=figsize or (max(6.0, 0.32 * len(rows) + 2.5), 4.0))
    ax = fig.subplots()
    x = np.arange(len(rows))
    width = 0.4 if has_storage else 0.7
    off = width / 2 if has_storage else 0.0
    avg = float((n * wts).sum() / wts.sum())
    ax.bar(x - off, n, width, color="tab:blue", label=f"n (exponent bits), avg {avg:.2f}")
    ax.axhline(avg, color="tab:blue", ls="--", lw=1)
    if has_storage:
        s = n + np.array([1.0 if r["w_signed"] else 0.0 for r in rows])
        savg = float((s * wts).sum() / wts.sum())
        ax.bar(x + off, s, width, color="tab:orange",
               label=f"storage bits (with sign), avg {savg:.2f}")
        ax.axhline(savg, color="tab:orange", ls="--", lw=1)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("bits per weight")
    ax.set_ylim(0, 9)
    ax.set_yticks(range(0, 9))
    ax.set_title(title or f"bits per layer (averages {weighting})")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
