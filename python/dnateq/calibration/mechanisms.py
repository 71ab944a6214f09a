"""The per-layer fit and build with the mechanisms beyond the paper
(issue 12, item 2), each one an option of its own:

- ``per_channel``: weights with ``S_w[j], beta_w[j]`` per output channel and
  one shared ``alpha`` (:func:`dnateq.calibration.channel_fit.choose_shared_alpha`);
- ``clip``: the activation range chosen by the layer's output error
  (:func:`dnateq.calibration.clip.fit_activation`);
- ``bias_correction``: the mean output error per output channel added to
  the bias;
- ``smoothing`` and ``allocation="sensitivity"`` act on the model and on the
  bit choice (:mod:`.passes`, :mod:`.sensitivity`).

:func:`fit_layer` returns the same table layout as the paper's fit (``rows``
per ``n`` with ``alpha, sw, bw, sa, ba, rmae_w, rmae_a``) plus what the
mechanisms found (``out_err``, ``delta``, ``clip``);
:func:`dnateq.calibration.build.build_layer` turns one row into an
``ExpLinear``/``ExpConv2d``. With every mechanism off,
:func:`fit_layer` is exactly the paper's fit (SPEC section 3, items 2-3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .channel_fit import choose_shared_alpha, fake_quant, fit_weight_rows, rows_rmae
from .clip import LayerProbe, fit_activation

__all__ = ["Mechanisms", "fit_layer", "MECHANISM_NAMES"]

MECHANISM_NAMES = ("per_channel", "smoothing", "clip", "bias_correction", "sensitivity")


@dataclass
class Mechanisms:
    """Which mechanisms run (all off = the paper's method)."""
    per_channel: bool = False
    smoothing: Any = False           # False, "auto", "fold" or "buffer"
    clip: bool = False
    bias_correction: bool = False
    sensitivity: bool = False        # allocation: sensitivity-guided instead of thresholds

    def any_layer(self) -> bool:
        return bool(self.per_channel or self.clip or self.bias_correction or self.smoothing)

    def needs_probe(self) -> bool:
        return bool(self.clip or self.bias_correction or self.smoothing)

    def names(self):
        return [k for k in MECHANISM_NAMES if getattr(self, k)]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def fit_layer(mod: nn.Module, w: torch.Tensor, a: torch.Tensor, bits: Sequence[int], *,
              mech: Mechanisms, probe: Optional[LayerProbe] = None,
              search: str = "golden", rounding: str = "nearest",
              rss: Optional[Dict[str, Any]] = None, seed: int = 0) -> Dict[int, Dict[str, Any]]:
    """Rows ``{n: params}`` of one layer (``w`` its weight as it will be
    quantized, ``a`` its traced activation sample). ``rss`` carries the
    paper's starting-tensor choice (``start`` = ``"W"``/``"A"``)."""
    from .. import ops
    start = (rss or {}).get("start", "W")
    rows: Dict[int, Dict[str, Any]] = {}
    for b in bits:
        # the paper's per-tensor fit (also the starting point of the mechanisms)
        if start == "W":
            alpha, sw, bw, rw = ops.exp_fit(w, b, search, rounding)
            _, sa, ba, ra = ops.exp_fit(a, b, search, rounding, alpha)
        else:
            alpha, sa, ba, ra = ops.exp_fit(a, b, search, rounding)
            _, sw, bw, rw = ops.exp_fit(w, b, search, rounding, alpha)
        row = dict(alpha=alpha, sw=sw, bw=bw, sa=sa, ba=ba, rmae_w=rw, rmae_a=ra)
        if mech.per_channel:
            alpha = choose_shared_alpha(w, a, b, rounding, per_channel=True,
                                        candidates=(row["alpha"],), seed=seed)
            S, B = fit_weight_rows(w, alpha, b)
            rw = rows_rmae(w, alpha, S, B, b, rounding)
            _, sa, ba, ra = ops.exp_fit(a, b, search, rounding, alpha)
            row.update(alpha=alpha, sw=S, bw=B, sa=sa, ba=ba, rmae_w=rw, rmae_a=ra)
        if probe is not None and (mech.clip or mech.bias_correction):
            wh = fake_quant(w, row["alpha"], row["sw"], row["bw"], b, rounding)
            r = fit_activation(probe, a, row["alpha"], b, wh, rounding, clip=mech.clip,
                               bias_correct=mech.bias_correction)
            if mech.clip and (r["hi_q"] < 1.0 or r["lo_q"] > 0.0):
                row.update(sa=r["sa"], ba=r["ba"],
                           rmae_a=ops.exp_error(a, row["alpha"], r["sa"], r["ba"], b, rounding))
            row.update(out_err=r["out_err"], out_err_full_range=r["full_err"],
                       clip=dict(hi_q=r["hi_q"], lo_q=r["lo_q"]) if mech.clip else None,
                       delta=r["delta"] if mech.bias_correction else None)
        rows[int(b)] = row
    return rows


def _mean(v) -> float:
    return float(v.double().mean()) if isinstance(v, torch.Tensor) else float(v)


def row_summary(row: Dict[str, Any]) -> Dict[str, Any]:
    """A row with tensors reduced to floats (for records and reports)."""
    out = {}
    for k, v in row.items():
        if k == "delta":
            out["bias_delta_absmax"] = None if v is None else float(v.abs().max())
        elif isinstance(v, torch.Tensor):
            out[k] = _mean(v)
            out[k + "_per_channel"] = True
        else:
            out[k] = v
    return out
