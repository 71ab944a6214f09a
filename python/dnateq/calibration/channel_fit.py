"""Per-layer fits beyond the paper's per-tensor one (issue 12, item 2).

- :func:`fake_quant` quantizes and dequantizes a tensor with per-tensor or
  per-row (per-output-channel) parameters, with SPEC section 1's normative
  thresholds (float64, rounded once to float32): the fit's model of what the
  operators compute.
- :func:`range_params` is SPEC section 2's range fit (lowest level ``lo``,
  highest ``hi``) for given ``alpha``, for one range or one per row.
- :func:`fit_weight_rows` fits ``S_w[j], beta_w[j]`` per output channel with
  one shared ``alpha`` (SPEC section 9). Both factor out of Eq. 8's sum over
  the input dimension, so the count path stays exact.
- :func:`choose_shared_alpha` picks the one base of a layer for the
  per-channel case: it minimizes ``RMAE_W(per channel) + RMAE_A`` over
  ``alpha`` (a log-spaced scan of ``[1 + 1e-4, alpha_max(n)]`` refined by a
  golden-section search), instead of letting the per-tensor fit of one tensor
  impose its base.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["exp_range", "alpha_max", "fake_quant", "range_params", "fit_weight_rows",
           "rows_rmae", "choose_shared_alpha", "ALPHA_MIN"]

ALPHA_MIN = 1.0 + 1e-4

Scalar = Union[float, torch.Tensor]


def exp_range(bits: int) -> int:
    """``E = 2^(n-1) - 1``."""
    return (1 << (int(bits) - 1)) - 1


def alpha_max(bits: int) -> float:
    """``min(16, exp(40 / E))`` (SPEC section 2)."""
    return min(16.0, math.exp(40.0 / exp_range(bits)))


def _rows_param(p: Scalar, rows: int) -> torch.Tensor:
    t = torch.as_tensor(p, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        return t.expand(rows).reshape(rows, 1)
    if t.numel() != rows:
        raise ValueError(f"dnateq: per-row parameters need {rows} values, got {t.numel()}")
    return t.reshape(rows, 1)


def level_tables(alpha: float, scale: Scalar, offset: Scalar, bits: int, rows: int,
                 rounding: str = "nearest") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(levels [rows, 2E+1], thresholds [rows, 2E])`` in float32, computed in
    float64 and rounded once (SPEC section 1)."""
    E = exp_range(bits)
    S, B = _rows_param(scale, rows), _rows_param(offset, rows)
    k = torch.arange(-E, E + 1, dtype=torch.float64)
    pw = float(alpha) ** k
    lv = S * pw + B
    if rounding == "log":
        thr = B + S * (float(alpha) ** (k[:-1] + 0.5))
    elif rounding == "nearest":
        thr = B + S * 0.5 * (pw[:-1] + pw[1:])
    else:
        raise ValueError(f"dnateq: rounding must be 'nearest' or 'log', got {rounding!r}")
    return lv.to(torch.float32), thr.to(torch.float32).contiguous()


def fake_quant(x: torch.Tensor, alpha: float, scale: Scalar, offset: Scalar, bits: int,
               rounding: str = "nearest") -> torch.Tensor:
    """Quantize-dequantize ``x`` (float32 result, same shape). ``scale`` and
    ``offset`` are scalars (per tensor) or 1-D of length ``x.shape[0]`` (one per
    row, i.e. per output channel of a weight)."""
    xf = x.detach().float()
    rows = xf.shape[0] if xf.dim() > 0 else 1
    per_row = (torch.as_tensor(scale).numel() > 1 or torch.as_tensor(offset).numel() > 1)
    x2 = xf.reshape(rows, -1) if per_row else xf.reshape(1, -1)
    lv, thr = level_tables(alpha, scale, offset, bits, x2.shape[0], rounding)
    idx = torch.searchsorted(thr, x2.abs().contiguous(), right=True)   # ties go up
    out = lv.gather(1, idx) * torch.sign(x2)                             # x == 0 -> 0
    return out.reshape(xf.shape)


def range_params(lo: Scalar, hi: Scalar, alpha: float, bits: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SPEC section 2's range fit for given ``alpha``: ``S = (hi - lo) /
    (alpha^E - alpha^-E)``, ``beta = lo - S alpha^-E`` (float64 tensors, the
    shape of ``lo``). Degenerate ranges as the SPEC: ``hi == lo`` gives ``S = lo,
    beta = 0``; an all-zero range ``S = 1, beta = 0``."""
    lo = torch.as_tensor(lo, dtype=torch.float64)
    hi = torch.as_tensor(hi, dtype=torch.float64)
    E = exp_range(bits)
    a = float(alpha)
    S = (hi - lo) / (a ** E - a ** (-E))
    B = lo - S * a ** (-E)
    deg = hi <= lo
    S = torch.where(deg, lo, S)
    B = torch.where(deg, torch.zeros_like(B), B)
    zero = hi <= 0
    S = torch.where(zero, torch.ones_like(S), S)
    B = torch.where(zero, torch.zeros_like(B), B)
    return S, B


def row_ranges(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per output channel (row of ``w.reshape(N, -1)``): the smallest nonzero and
    the largest magnitude (float64; rows without a nonzero give ``0, 0``)."""
    m = w.detach().reshape(w.shape[0], -1).abs().double()
    hi = m.max(dim=1).values
    lo = torch.where(m > 0, m, torch.full_like(m, math.inf)).min(dim=1).values
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    return lo, hi


def fit_weight_rows(w: torch.Tensor, alpha: float, bits: int
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel ``S_w[j], beta_w[j]`` (float32 ``[N]``) for the shared
    ``alpha``: each channel's levels span its own magnitude range."""
    lo, hi = row_ranges(w)
    S, B = range_params(lo, hi, alpha, bits)
    return S.float(), B.float()


def rows_rmae(w: torch.Tensor, alpha: float, scale: Scalar, offset: Scalar, bits: int,
              rounding: str = "nearest") -> float:
    """RMAE ``sum|w - w_hat| / sum|w|`` of ``w`` under per-row (or per-tensor)
    parameters (0 for an all-zero tensor)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    den = float(w2.abs().double().sum())
    if den == 0.0:
        return 0.0
    wh = fake_quant(w2, alpha, scale, offset, bits, rounding)
    return float((w2 - wh).abs().double().sum()) / den


def _row_subset(w: torch.Tensor, max_elems: int, gen: torch.Generator) -> torch.Tensor:
    w2 = w.detach().float().reshape(w.shape[0], -1)
    rows = max(1, min(w2.shape[0], max_elems // max(1, w2.shape[1])))
    if rows >= w2.shape[0]:
        return w2
    idx = torch.randperm(w2.shape[0], generator=gen)[:rows]
    return w2[idx]


def choose_shared_alpha(w: torch.Tensor, a: Optional[torch.Tensor], bits: int,
                        rounding: str = "nearest", per_channel: bool = True,
                        candidates: Sequence[float] = (), grid: int = 24,
                        max_elems: int = 1 << 15, seed: int = 0) -> float:
    """The one base of a layer: the ``alpha`` minimizing ``RMAE_W + RMAE_A``, with
    the weights fitted per output channel (``per_channel``) or per tensor and
    the activation sample ``a`` per tensor (``a=None``: weights only), both by
    the range fit. A log-spaced scan of ``log alpha`` over ``[1 + 1e-4,
    alpha_max(n)]`` (plus ``candidates``, e.g. the per-tensor fits' answers)
    is refined by golden-section search around the best point. The weight
    error is measured on a row subset of at most ``max_elems`` elements."""
    from .. import ops
    gen = torch.Generator().manual_seed(int(seed))
    wr = _row_subset(w, max_elems, gen)
    if per_channel:
        wlo, whi = row_ranges(wr)
    else:
        mm = wr.abs().double()
        nz = mm[mm > 0]
        wlo = nz.min() if nz.numel() else torch.tensor(0.0, dtype=torch.float64)
        whi = mm.max()
    if a is not None:
        av = a.detach().float().reshape(-1)
        am = av.abs()
        anz = am[am > 0]
        alo = float(anz.min()) if anz.numel() else 0.0
        ahi = float(am.max()) if am.numel() else 0.0
    amax = alpha_max(bits)

    def errs(alphas):
        alphas = [min(max(float(x), ALPHA_MIN), amax) for x in alphas]
        out = []
        for al in alphas:
            S, B = range_params(wlo, whi, al, bits)
            out.append(rows_rmae(wr, al, S, B, bits, rounding))
        if a is not None and av.numel():
            sa, ba = [], []
            for al in alphas:
                s, b = range_params(alo, ahi, al, bits)
                sa.append(float(s))
                ba.append(float(b))
            ea = ops.exp_errors(av, alphas, sa, ba, bits, rounding).tolist()
            out = [x + y for x, y in zip(out, ea)]
        return alphas, out

    la0, la1 = math.log(math.log(ALPHA_MIN)), math.log(math.log(amax))
    scan = [math.exp(math.exp(la0 + (la1 - la0) * i / (grid - 1))) for i in range(grid)]
    scan += [float(c) for c in candidates if c is not None and math.isfinite(float(c))]
    xs, es = errs(scan)
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    xs = [xs[i] for i in order]
    es = [es[i] for i in order]
    i = min(range(len(es)), key=lambda j: es[j])
    best_x, best_e = xs[i], es[i]
    # golden-section on log(log alpha) between the neighbours of the best point
    lo_x = xs[max(0, i - 1)]
    hi_x = xs[min(len(xs) - 1, i + 1)]
    if hi_x > lo_x:
        f = lambda t: errs([math.exp(math.exp(t))])[1][0]
        a_, b_ = math.log(math.log(lo_x)), math.log(math.log(hi_x))
        g = (math.sqrt(5) - 1) / 2
        c, d = b_ - g * (b_ - a_), a_ + g * (b_ - a_)
        fc, fd = f(c), f(d)
        for _ in range(8):
            if fc < fd:
                b_, d, fd = d, c, fc
                c = b_ - g * (b_ - a_)
                fc = f(c)
            else:
                a_, c, fc = c, d, fd
                d = a_ + g * (b_ - a_)
                fd = f(d)
        for t, e in ((c, fc), (d, fd)):
            if e < best_e:
                best_x, best_e = math.exp(math.exp(t)), e
    return float(min(max(best_x, ALPHA_MIN), amax))
