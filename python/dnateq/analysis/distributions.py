"""Goodness of fit of common distributions to the magnitudes of weights and
activations: the paper's Tables I-II and Fig. 1-2 (SPEC section 2, "Distribution
fit").

For one tensor: the nonzero magnitudes ``m = |x|``, their ``bins``-bin density
histogram, the maximum-likelihood fit of each distribution (scipy.stats;
``floc=0`` for the exponential and Pareto, as SPEC section 2 says; also for the
optional half-normal and log-normal), and
``RSS = sum_bins (density - pdf(center))^2``. For the exponential this is
exactly :func:`dnateq.calibrate.exponential_rss` (same steps, same float64
arithmetic; the tests check equality).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._common import matches as _matches
from .._common import progress as _progress
from ..calibration.trace import trace_layers
from ._common import (FLOAT_TYPES, QUANTIZED_TYPES, check_positive_int, csv_text, eval_mode,
                      fmt, layer_names, markdown_table, split_mha)

__all__ = ["fit_distributions", "DistributionFits", "distribution_rss", "rss_table",
           "DISTRIBUTIONS", "PAPER_DISTRIBUTIONS"]

#: name -> (scipy.stats distribution, fixed arguments of its ``fit``). The first
#: four are the paper's (Tables I-II); the others are offered for comparison.
DISTRIBUTIONS: Dict[str, Tuple[str, Dict[str, float]]] = OrderedDict([
    ("normal", ("norm", {})),
    ("exponential", ("expon", {"floc": 0})),
    ("pareto", ("pareto", {"floc": 0})),
    ("uniform", ("uniform", {})),
    ("halfnormal", ("halfnorm", {"floc": 0})),
    ("lognormal", ("lognorm", {"floc": 0})),
])
#: The four distributions of the paper's Tables I and II.
PAPER_DISTRIBUTIONS = ("normal", "exponential", "pareto", "uniform")
TENSOR_KINDS = ("weights", "activations")


def _check_distributions(distributions, fn: str) -> Tuple[str, ...]:
    if isinstance(distributions, str):
        distributions = (distributions,)
    try:
        ds = tuple(distributions)
    except TypeError:
        raise TypeError(f"dnateq.analysis.{fn}: distributions must be a sequence of names, "
                        f"got {distributions!r}") from None
    if not ds:
        raise ValueError(f"dnateq.analysis.{fn}: distributions is empty; choose from "
                         f"{list(DISTRIBUTIONS)}")
    for d in ds:
        if d not in DISTRIBUTIONS:
            raise ValueError(f"dnateq.analysis.{fn}: unknown distribution {d!r} in "
                             f"distributions; known: {list(DISTRIBUTIONS)}")
    if len(set(ds)) != len(ds):
        raise ValueError(f"dnateq.analysis.{fn}: distributions has duplicates: {list(ds)}")
    return ds


def _magnitudes(x: torch.Tensor) -> np.ndarray:
    # The same steps as calibrate.exponential_rss, so the RSS agree bit for bit.
    m = x.detach().reshape(-1).abs().double()
    return m[m != 0].cpu().numpy()


def _fit(m: np.ndarray, distributions: Sequence[str], bins: int, normalize: bool
         ) -> Dict[str, Any]:
    """RSS, fitted parameters and the density histogram of magnitudes ``m``.
    Fewer than two distinct magnitudes: every RSS is ``inf`` (no fit exists),
    as in ``exponential_rss``."""
    from scipy import stats
    if m.size < 2 or float(m.max()) == float(m.min()):
        return dict(rss={d: math.inf for d in distributions}, params={}, dens=None,
                    edges=None, count=int(m.size))
    if not np.isfinite(m).all():
        raise ValueError("non-finite values")
    if normalize:
        m = m / m.mean()
    dens, edges = np.histogram(m, bins=bins, density=True)
    centers = 0.5 * (edges[:-1] + edges[1:])
    rss, params = {}, {}
    with np.errstate(all="ignore"):
        for d in distributions:
            dist_name, kw = DISTRIBUTIONS[d]
            dist = getattr(stats, dist_name)
            p = tuple(float(v) for v in dist.fit(m, **kw))
            pdf = dist.pdf(centers, *p)
            r = float(np.sum((dens - pdf) ** 2))
            rss[d] = r if math.isfinite(r) else math.inf
            params[d] = p
    return dict(rss=rss, params=params, dens=dens, edges=edges, count=int(m.size))


def rss_table(x: torch.Tensor, distributions: Sequence[str] = PAPER_DISTRIBUTIONS, *,
              normalize: bool = False, bins: int = 100) -> Dict[str, float]:
    """``{distribution: RSS}`` of the fits to the nonzero magnitudes of ``x``
    (one histogram for all). ``inf`` for a tensor with fewer than two distinct
    nonzero magnitudes."""
    ds = _check_distributions(distributions, "rss_table")
    bins = check_positive_int(bins, "bins", "rss_table")
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    m = _magnitudes(x)
    try:
        return _fit(m, ds, bins, normalize)["rss"]
    except ValueError:
        raise ValueError("dnateq.analysis.rss_table: x has non-finite values") from None


def distribution_rss(x: torch.Tensor, distribution: str = "exponential",
                     normalize: bool = False, bins: int = 100) -> float:
    """RSS of one distribution's fit to the nonzero magnitudes of ``x`` against
    their ``bins``-bin density histogram (SPEC section 2). With
    ``distribution="exponential"`` it equals :func:`dnateq.calibrate.exponential_rss`
    (same arguments), and can replace it."""
    return rss_table(x, (distribution,), normalize=normalize, bins=bins)[distribution]


# ---------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------

class DistributionFits:
    """The result of :func:`fit_distributions`.

    Attributes:
        rows: one dict per (layer, tensor): ``layer``, ``tensor``
            (``"weights"``, ``"activations"`` or ``"tensor"`` for bare tensors),
            ``module`` (type name), ``count`` (magnitudes fitted), ``rss``
            (``{distribution: RSS}``) and ``best`` (lowest RSS; None when the
            tensor is degenerate).
        distributions: the distributions fitted, in order.
        mean: ``{tensor: {distribution: mean RSS over its rows}}`` — the
            paper's Table I (activations) and Table II (weights). Degenerate
            rows (RSS ``inf`` for every distribution) are left out of the mean
            and counted in ``notes``.
        wins: ``{tensor: {distribution: number of rows where it is best}}``.
        best: ``{tensor: distribution with the lowest mean RSS}``.
        notes: caveats (degenerate tensors, layers not executed, ...).
        options: the options used.
    """

    def __init__(self, rows: List[Dict[str, Any]], distributions: Sequence[str],
                 fits: Dict[Tuple[str, str], Dict[str, Any]], notes: List[str],
                 options: Dict[str, Any]):
        self.rows = rows
        self.distributions = tuple(distributions)
        self._fits = fits
        self.notes = notes
        self.options = options
        self.mean: Dict[str, Dict[str, float]] = {}
        self.wins: Dict[str, Dict[str, int]] = {}
        self.best: Dict[str, Optional[str]] = {}
        for kind in self.tensors:
            rs = [r for r in rows if r["tensor"] == kind and r["best"] is not None]
            if not rs:
                continue
            self.mean[kind] = {d: float(np.mean([r["rss"][d] for r in rs]))
                               for d in self.distributions}
            self.wins[kind] = {d: sum(r["best"] == d for r in rs) for d in self.distributions}
            self.best[kind] = min(self.distributions, key=lambda d: self.mean[kind][d])

    @property
    def tensors(self) -> List[str]:
        """The tensor kinds present, in first-seen order."""
        seen: List[str] = []
        for r in self.rows:
            if r["tensor"] not in seen:
                seen.append(r["tensor"])
        return seen

    @property
    def layers(self) -> List[str]:
        seen: List[str] = []
        for r in self.rows:
            if r["layer"] not in seen:
                seen.append(r["layer"])
        return seen

    def row(self, layer: str, tensor: str) -> Dict[str, Any]:
        for r in self.rows:
            if r["layer"] == layer and r["tensor"] == tensor:
                return r
        raise KeyError(f"dnateq.analysis: no row for layer {layer!r}, tensor {tensor!r}")

    # -- exports ---------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "distributions": list(self.distributions),
            "layers": [dict(r, rss=dict(r["rss"])) for r in self.rows],
            "mean": {k: dict(v) for k, v in self.mean.items()},
            "wins": {k: dict(v) for k, v in self.wins.items()},
            "best": dict(self.best),
            "notes": list(self.notes),
            "options": dict(self.options),
        }

    def to_csv(self) -> str:
        """One line per (layer, tensor): ``layer, tensor, module, count,
        rss_<distribution>..., best``."""
        headers = (["layer", "tensor", "module", "count"]
                   + [f"rss_{d}" for d in self.distributions] + ["best"])
        return csv_text(headers, ([r["layer"], r["tensor"], r["module"], r["count"]]
                                  + [repr(r["rss"][d]) for d in self.distributions]
                                  + [r["best"]] for r in self.rows))

    def mean_markdown(self) -> str:
        """The per-model table (the paper's Tables I and II): mean RSS per
        distribution, the lowest in bold, and how many layers each one wins."""
        lines = []
        for kind in self.mean:
            best = self.best[kind]
            cells = []
            for d in self.distributions:
                v = fmt(self.mean[kind][d])
                cells.append(f"**{v}**" if d == best else v)
            lines.append([kind] + cells + [", ".join(f"{d} {n}" for d, n in
                                                     self.wins[kind].items() if n)])
        headers = ["tensor / mean RSS"] + list(self.distributions) + ["best in (layers)"]
        return markdown_table(headers, lines)

    def to_markdown(self) -> str:
        out = [self.mean_markdown(), ""]
        headers = ["layer", "tensor", "module", "count"] + list(self.distributions) + ["best"]
        out.append(markdown_table(headers, ([r["layer"], r["tensor"], r["module"], r["count"]]
                                            + [r["rss"][d] for d in self.distributions]
                                            + [r["best"]] for r in self.rows)))
        if self.notes:
            out.append("")
            out += [f"- note: {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def __repr__(self) -> str:
        return self.to_markdown()

    # -- plot ------------------------------------------------------------------
    def plot_histograms(self, layer: str, tensor: Optional[str] = None,
                        distributions: Optional[Sequence[str]] = None, *,
                        figsize: Optional[Tuple[float, float]] = None, points: int = 400):
        """Fig. 1-2 of the paper: the density histogram of a layer's magnitudes with
        the fitted pdfs, one subplot per tensor (``tensor=None``: every tensor
        fitted for that layer). Returns the matplotlib Figure (never shown).

        The y-axis stops at 1.3x the highest bar, so that a pdf with a
        singularity at the lowest magnitude (Pareto) does not flatten the
        histogram."""
        # A bare Figure (no pyplot): no global figure registry, no backend needed.
        from matplotlib.figure import Figure
        if layer not in self.layers:
            raise ValueError(f"dnateq.analysis.plot_histograms: unknown layer {layer!r}; "
                             f"layers: {layer_names(self.layers)}")
        kinds = [r["tensor"] for r in self.rows if r["layer"] == layer]
        if tensor is not None:
            if tensor not in kinds:
                raise ValueError(f"dnateq.analysis.plot_histograms: layer {layer!r} has no "
                                 f"{tensor!r} fit (tensor must be one of {kinds})")
            kinds = [tensor]
        ds = (self.distributions if distributions is None
              else _check_distributions(distributions, "plot_histograms"))
        for d in ds:
            if d not in self.distributions:
                raise ValueError(f"dnateq.analysis.plot_histograms: distribution {d!r} was "
                                 f"not fitted (fitted: {list(self.distributions)})")
        fig = Figure(figsize=figsize or (5.5 * len(kinds), 4.0))
        axes = fig.subplots(1, len(kinds), squeeze=False)[0]
        from scipy import stats
        for ax, kind in zip(axes, kinds):
            fit = self._fits[(layer, kind)]
            row = self.row(layer, kind)
            ax.set_title(f"{layer} — {kind}")
            ax.set_xlabel("|x| / mean |x|" if self.options.get("normalize") else "|x|")
            ax.set_ylabel("density")
            if fit["dens"] is None:
                ax.text(0.5, 0.5, "degenerate tensor\n(fewer than 2 distinct magnitudes)",
                        ha="center", va="center", transform=ax.transAxes)
                continue
            dens, edges = fit["dens"], fit["edges"]
            ax.bar(edges[:-1], dens, width=np.diff(edges), align="edge", alpha=0.45,
                   color="0.55", label="histogram")
            xs = np.linspace(edges[0], edges[-1], int(points))
            with np.errstate(all="ignore"):
                for d in ds:
                    dist_name, _ = DISTRIBUTIONS[d]
                    ys = getattr(stats, dist_name).pdf(xs, *fit["params"][d])
                    ax.plot(xs, ys, lw=1.6, label=f"{d} (RSS {fmt(row['rss'][d])})")
            ax.set_ylim(0, 1.3 * float(dens.max()))
            ax.set_xlim(edges[0], edges[-1])
            ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


# ---------------------------------------------------------------------------
# fit_distributions
# ---------------------------------------------------------------------------

TensorInput = Union[nn.Module, torch.Tensor, Mapping[str, Any], Sequence[torch.Tensor]]


def _tensor_items(obj: Any, tensors: Tuple[str, ...]) -> List[Tuple[str, str, str, torch.Tensor]]:
    """(layer, tensor kind, module type, tensor) for the non-model inputs."""
    fn = "fit_distributions"
    items: List[Tuple[str, str, str, torch.Tensor]] = []
    if isinstance(obj, torch.Tensor):
        return [("tensor", "tensor", "Tensor", obj)]
    if isinstance(obj, Mapping):
        pairs = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        pairs = [(str(i), t) for i, t in enumerate(obj)]
    else:
        raise TypeError(f"dnateq.analysis.{fn}: model_or_tensors must be an nn.Module, a tensor, "
                        f"a dict of tensors or a list of tensors, got {type(obj).__name__}")
    if not pairs:
        raise ValueError(f"dnateq.analysis.{fn}: model_or_tensors is empty")
    kinds_present: List[str] = []
    for name, v in pairs:
        if isinstance(v, torch.Tensor):
            items.append((str(name), "tensor", "Tensor", v))
        elif isinstance(v, Mapping):
            for k, t in v.items():
                if k not in TENSOR_KINDS:
                    raise ValueError(f"dnateq.analysis.{fn}: model_or_tensors[{name!r}] has key "
                                     f"{k!r}; per-layer dicts take {TENSOR_KINDS}")
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"dnateq.analysis.{fn}: model_or_tensors[{name!r}][{k!r}] "
                                    f"must be a tensor, got {type(t).__name__}")
                kinds_present.append(k)
                if k in tensors:
                    items.append((str(name), k, "Tensor", t))
        else:
            raise TypeError(f"dnateq.analysis.{fn}: model_or_tensors[{name!r}] must be a tensor "
                            f"or a dict {{'weights': ..., 'activations': ...}}, got "
                            f"{type(v).__name__}")
    if not items:
        raise ValueError(f"dnateq.analysis.{fn}: tensors={tensors} selects none of the given "
                         f"tensors (kinds present: {sorted(set(kinds_present))})")
    return items


def fit_distributions(model_or_tensors: TensorInput, loader: Optional[Iterable] = None, *,
                      distributions: Sequence[str] = PAPER_DISTRIBUTIONS,
                      tensors: Union[str, Sequence[str]] = TENSOR_KINDS,
                      bins: int = 100,
                      normalize: bool = False,
                      calib_batches: int = 8,
                      sample_size: int = 1 << 18,
                      layers: Optional[Sequence[str]] = None,
                      skip: Optional[Sequence[str]] = None,
                      progress: bool = True,
                      seed: int = 0) -> DistributionFits:
    """Fit ``distributions`` to the magnitudes of every layer's weights and input
    activations (the paper's Section III-A, Tables I-II).

    Args:
        model_or_tensors: a model, or tensors directly: one tensor, a list of
            tensors, a dict ``{name: tensor}``, or ``{name: {"weights": w,
            "activations": a}}``. A model's layers are its ``nn.Linear`` and
            ``nn.Conv2d`` (every padding mode), the Q/K/V/out projections of its
            ``nn.MultiheadAttention`` (split on a copy, as ``dnateq.quantize``
            does) and, in an already quantized model, its
            :class:`~dnateq.nn.ExpLinear` / :class:`~dnateq.nn.ExpConv2d`, whose
            weights are their dequantized levels (``2^n - 1`` magnitudes: the
            histogram is then a set of spikes).
        loader: batches (tensors, tuples/lists whose first item is the input, or
            dicts passed as ``model(**batch)``, as in ``dnateq.quantize``) to trace the input
            activations with forward pre-hooks; needed for
            ``"activations"``, only allowed with a model.
        distributions: names among ``"normal"``, ``"exponential"``, ``"pareto"``,
            ``"uniform"`` (the paper's four, the default), ``"halfnormal"`` and
            ``"lognormal"``.
        tensors: ``"weights"``, ``"activations"`` or both (default). Bare tensors
            are fitted whatever this says.
        bins: histogram bins (default 100, SPEC section 2).
        normalize: fit ``m / mean(m)`` instead of the raw magnitudes (raw RSS
            scales with the tensor's magnitude; see SPEC section 2).
        calib_batches: loader batches traced (default 8, as ``dnateq.quantize``).
        sample_size: bound on each layer's traced activation sample (uniform
            priority sample, plus the exact extremes; the same sampler and, for
            the same ``seed``, ``calib_batches``, ``sample_size`` and set of
            layers, the same sample as ``dnateq.quantize``, so its recorded
            ``rss_a`` is the exponential column here). Weights are fitted whole.
        layers, skip: module names, prefixes or ``fnmatch`` patterns to include /
            leave out (as in ``dnateq.quantize``).
        progress: tqdm bars for tracing and fitting.
        seed: seed of the activation sub-sampling.

    Returns:
        :class:`DistributionFits` (``rows``, ``mean``, ``to_markdown()``,
        ``plot_histograms(layer)``, ...).
    """
    fn = "fit_distributions"
    ds = _check_distributions(distributions, fn)
    if isinstance(tensors, str):
        tensors = (tensors,)
    tensors = tuple(tensors)
    if not tensors:
        raise ValueError(f"dnateq.analysis.{fn}: tensors is empty; use any of {TENSOR_KINDS}")
    for t in tensors:
        if t not in TENSOR_KINDS:
            raise ValueError(f"dnateq.analysis.{fn}: unknown kind {t!r} in tensors; use "
                             f"{TENSOR_KINDS}")
    bins = check_positive_int(bins, "bins", fn)
    calib_batches = check_positive_int(calib_batches, "calib_batches", fn)
    sample_size = check_positive_int(sample_size, "sample_size", fn, minimum=16)
    options = dict(distributions=list(ds), tensors=list(tensors), bins=bins,
                   normalize=bool(normalize), calib_batches=calib_batches,
                   sample_size=sample_size, seed=seed)
    notes: List[str] = []
    items: List[Tuple[str, str, str, torch.Tensor]]
    if isinstance(model_or_tensors, nn.Module):
        items = _model_items(model_or_tensors, loader, tensors, calib_batches, sample_size,
                             layers, skip, progress, seed, notes)
    else:
        if loader is not None:
            raise ValueError(f"dnateq.analysis.{fn}: loader is only used with a model; "
                             "model_or_tensors is tensors")
        items = _tensor_items(model_or_tensors, tensors)

    rows: List[Dict[str, Any]] = []
    fits: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for layer, kind, mtype, t in _progress(items, progress, desc="dnateq: fitting distributions"):
        try:
            fit = _fit(_magnitudes(t), ds, bins, normalize)
        except ValueError:
            raise ValueError(f"dnateq.analysis.{fn}: the {kind} of {layer!r} have non-finite "
                             "values") from None
        finite = {d: r for d, r in fit["rss"].items() if math.isfinite(r)}
        best = min(finite, key=finite.get) if finite else None
        if best is None:
            notes.append(f"{layer} ({kind}): fewer than two distinct nonzero magnitudes; "
                         "no fit (RSS inf), left out of the means")
        rows.append(dict(layer=layer, tensor=kind, module=mtype, count=fit["count"],
                         rss=dict(fit["rss"]), best=best))
        fits[(layer, kind)] = fit
    return DistributionFits(rows, ds, fits, notes, options)


def _model_items(model: nn.Module, loader, tensors, calib_batches, sample_size, layers, skip,
                 progress, seed, notes) -> List[Tuple[str, str, str, torch.Tensor]]:
    fn = "fit_distributions"
    if "activations" in tensors and loader is None:
        raise ValueError(f"dnateq.analysis.{fn}: tensors includes 'activations' but no loader "
                         "was given (pass a loader, or tensors=('weights',))")
    if "activations" not in tensors and loader is not None:
        notes.append("loader given but tensors excludes 'activations': not traced")
    work = split_mha(model)
    cands: List[Tuple[str, nn.Module]] = []
    for n, m in work.named_modules():
        if not isinstance(m, FLOAT_TYPES + QUANTIZED_TYPES):
            continue
        if layers is not None and not _matches(n, layers):
            continue
        if _matches(n, skip):
            continue
        cands.append((n, m))
    if not cands:
        raise ValueError(f"dnateq.analysis.{fn}: the model has no quantizable layer "
                         "(nn.Linear, nn.Conv2d, nn.MultiheadAttention, dnateq ExpLinear/"
                         "ExpConv2d)" + (" matching layers/skip" if layers or skip else ""))
    if any(isinstance(m, QUANTIZED_TYPES) for _, m in cands):
        notes.append("quantized layers: their weights are the dequantized levels, and their "
                     "inputs come from upstream quantized layers")

    order: List[str] = []
    traces: Dict[str, Any] = {}
    if "activations" in tensors:
        # dnateq.quantize's own tracer: the same seed, batches, sample_size and
        # layers give the same activation sample (and the same RSS).
        with eval_mode(work):
            tr = trace_layers(work, [n for n, _ in cands], loader, calib_batches=calib_batches,
                              sample_size=sample_size, seed=seed, progress=progress,
                              who=f"dnateq.analysis.{fn}", label="dnateq.analysis")
        traces, order = tr.traces, tr.order
        missed = [n for n, _ in cands if traces[n].calls == 0]
        if missed:
            notes.append(f"not executed on the loader batches (no activation fit): "
                         f"{layer_names(missed)}")

    # Rows in forward-execution order where known, then the rest in module order.
    rank = {n: i for i, n in enumerate(order)}
    cands.sort(key=lambda nm: rank.get(nm[0], len(rank)))
    items = []
    for n, m in cands:
        mtype = type(m).__name__
        if "weights" in tensors:
            w = m.dequantized_weight() if isinstance(m, QUANTIZED_TYPES) else m.weight
            items.append((n, "weights", mtype, w.detach().float().cpu()))
        if "activations" in tensors and traces[n].calls > 0:
            items.append((n, "activations", mtype, traces[n].sample()))
    if not items:
        raise ValueError(f"dnateq.analysis.{fn}: no tensor to fit (no selected layer ran on "
                         "the loader batches)")
    return items
