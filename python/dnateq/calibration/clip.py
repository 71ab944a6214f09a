"""Error-driven activation range and bias correction (issue 12, item 2).

The paper's fit spans the traced activation range ``[lo, hi]`` and scores it
by the tensor's RMAE. What matters is the layer's *output*: a
:class:`LayerProbe` keeps a small sample of the layer's real inputs (rows of
a Linear's input, whole images or a crop of them for a Conv2d) and measures
``||op(x_hat, W_hat) - op(x, W)||^2 / ||op(x, W)||^2`` for candidate
parameters. :func:`fit_activation` then lets the fit clip the traced tail
(``hi`` down to a high quantile) and raise the lowest level (``lo`` up to a
low quantile) wherever that lowers this output error, for the layer's shared
``alpha``; the full range stays a candidate, so the result is never worse on
the probe than the paper's range.

Bias correction: the mean of the output error per output channel over the
probe, ``delta[j] = mean(y - y_hat)[j]``, is added to the quantized layer's
bias. Eq. 8 adds the bias after the counts, so this keeps the count path
exact.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .channel_fit import fake_quant, range_params

__all__ = ["LayerProbe", "fit_activation", "HI_QUANTILES", "LO_QUANTILES"]

#: Candidate upper ends of the activation range (quantiles of the traced
#: magnitudes; 1.0 is the paper's full range).
HI_QUANTILES = (1.0, 0.99999, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98)
#: Candidate lowest levels (0.0 is the smallest traced nonzero magnitude).
LO_QUANTILES = (0.0, 0.001, 0.01, 0.05, 0.15)


class LayerProbe:
    """A layer's float computation on a small sample of its real inputs.

    ``x`` is the sample (Linear: ``[rows, K]``; Conv2d: ``[B, C, H, W]``),
    already divided by the layer's smoothing factor if it has one, and
    ``weight`` the weight the layer will quantize (smoothed likewise)."""

    def __init__(self, module: nn.Module, x: torch.Tensor,
                 weight: Optional[torch.Tensor] = None):
        self.w = (module.weight if weight is None else weight).detach().float().cpu()
        self.x = x.detach().float().cpu()
        if isinstance(module, nn.Conv2d):
            st, pad, dil, g = module.stride, module.padding, module.dilation, module.groups
            self.op = lambda a, w: F.conv2d(a, w, None, st, pad, dil, g)
            self.cdim = 1
        elif isinstance(module, nn.Linear):
            self.op = lambda a, w: F.linear(a, w)
            self.cdim = -1
        else:
            raise TypeError(f"dnateq: LayerProbe needs nn.Linear or nn.Conv2d, got "
                            f"{type(module).__name__}")
        with torch.no_grad():
            self.y = self.op(self.x, self.w)
        self.den = max(float(self.y.double().pow(2).sum()), 1e-30)

    def _reduce_dims(self, t: torch.Tensor):
        cd = self.cdim % t.dim()
        return [d for d in range(t.dim()) if d != cd]

    def error(self, x_hat: torch.Tensor, w_hat: torch.Tensor, bias_correct: bool = False
              ) -> Tuple[float, Optional[torch.Tensor]]:
        """``(relative squared output error, bias delta or None)``; with
        ``bias_correct`` the error is the one left after adding the delta."""
        with torch.no_grad():
            d = self.op(x_hat, w_hat) - self.y
            delta = None
            if bias_correct:
                delta = -d.double().mean(dim=self._reduce_dims(d))
                shape = [1] * d.dim()
                shape[self.cdim % d.dim()] = -1
                d = d + delta.float().reshape(shape)
        return float(d.double().pow(2).sum()) / self.den, delta

    def bias_delta(self, x_hat: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        """Per output channel: ``mean(y - y_hat)`` over the probe (float32)."""
        return self.error(x_hat, w_hat, True)[1].float()


def _quantile_sorted(m: torch.Tensor, q: float) -> float:
    i = int(round(q * (m.numel() - 1)))
    return float(m[min(max(i, 0), m.numel() - 1)])


def fit_activation(probe: LayerProbe, a_sample: torch.Tensor, alpha: float, bits: int,
                   w_hat: torch.Tensor, rounding: str = "nearest", clip: bool = True,
                   bias_correct: bool = False,
                   hi_quantiles: Sequence[float] = HI_QUANTILES,
                   lo_quantiles: Sequence[float] = LO_QUANTILES) -> Dict[str, Any]:
    """Activation ``(S_a, beta_a)`` for the layer's ``alpha`` from the traced
    sample ``a_sample`` (exact extremes included): the full traced range, or
    with ``clip`` the candidate range (upper end over ``hi_quantiles``, then
    lowest level over ``lo_quantiles`` of the traced magnitudes) with the
    lowest output error on ``probe`` (after bias correction when
    ``bias_correct``). Returns ``dict(sa, ba, lo, hi, hi_q, lo_q, out_err,
    full_err, delta)``; ``delta`` is the bias correction (float32 ``[N]``) or
    None."""
    m = a_sample.detach().float().reshape(-1).abs()
    m = m[m > 0].sort().values
    if m.numel() == 0:
        sa, ba = 1.0, 0.0
        err, delta = probe.error(fake_quant(probe.x, alpha, sa, ba, bits, rounding), w_hat,
                                 bias_correct)
        return dict(sa=sa, ba=ba, lo=0.0, hi=0.0, hi_q=1.0, lo_q=0.0, out_err=err,
                    full_err=err, delta=delta)
    lo0, hi0 = float(m[0]), float(m[-1])

    def evaluate(lo, hi):
        S, B = range_params(lo, hi, alpha, bits)
        S, B = float(S), float(B)
        xh = fake_quant(probe.x, alpha, S, B, bits, rounding)
        e, d = probe.error(xh, w_hat, bias_correct)
        return e, d, S, B

    best = None
    full = evaluate(lo0, hi0)
    best = (full[0], 1.0, 0.0, lo0, hi0, full)
    if clip:
        for q in hi_quantiles:
            if q >= 1.0:
                continue
            hi = _quantile_sorted(m, q)
            if not hi > lo0:
                continue
            r = evaluate(lo0, hi)
            if r[0] < best[0]:
                best = (r[0], q, 0.0, lo0, hi, r)
        hi = best[4]
        for q in lo_quantiles:
            if q <= 0.0:
                continue
            lo = _quantile_sorted(m, q)
            if not lo < hi or lo <= lo0:
                continue
            r = evaluate(lo, hi)
            if r[0] < best[0]:
                best = (r[0], best[1], q, lo, hi, r)
    err, hq, lq, lo, hi, r = best
    return dict(sa=r[2], ba=r[3], lo=lo, hi=hi, hi_q=hq, lo_q=lq, out_err=err,
                full_err=full[0], delta=None if r[1] is None else r[1].float())
