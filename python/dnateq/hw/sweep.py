"""Design-space sweeps of the hardware cost model, in the spirit of QAPPA (seed 003).

QAPPA explores PE type, bit precision, scratchpad size, bandwidth and PE count
and compares designs by *performance per area* against *energy*, normalized to
the best-performance-per-area baseline point. :func:`sweep` does the same for
the DNA-TEQ and INT8 accelerators of :func:`dnateq.hw.estimate`::

    sw = dnateq.hw.sweep(qmodel, x, pes=[4, 16, 64], units=[8, 16], bandwidth=[2.5, 10],
                         sram=[1, 2.5, 8], bits=[None, 3, 5])
    print(sw.to_markdown())
    sw.pareto()            # the non-dominated (energy, perf/area) points
    sw.plot_pareto("pareto.png")

The model is traced once; each point is a closed-form evaluation, so large
grids are cheap (a progress bar shows with ``progress=True``).
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch.nn as nn

from ._fmt import csv_text, markdown_table, save_figure
from .config import HWConfig, as_config
from .estimate import check_bits, evaluate
from .._common import describe
from .shapes import trace_layers

__all__ = ["sweep", "SweepResult", "AXES"]

#: Sweep arguments and the HWConfig field each one sets.
AXES = {"pes": "num_pes", "units": "units_per_pe", "bandwidth": "vault_bandwidth_gbs",
        "sram": "sram_kb_per_pe"}
_LABEL = {"int8": "INT8", "dnateq": "DNA-TEQ"}


def _as_list(v: Any, name: str) -> List[Any]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        return [v]
    out = list(v)
    if not out:
        raise ValueError(f"dnateq.hw.sweep: {name} is empty; give at least one value")
    # numpy / torch scalars become Python numbers, so the rows stay plain data
    return [x.item() if hasattr(x, "item") and callable(x.item) else x for x in out]


class SweepResult:
    """The result of :func:`sweep`: ``rows`` (one per hardware point and bit-width,
    both designs side by side), ``axes`` (the swept values), ``config`` (the base
    :class:`HWConfig`), ``reference`` (the INT8 point every ``norm_*`` figure is
    relative to: the one with the highest performance per area, as QAPPA) and
    ``notes``. Every output is labelled as an estimate."""

    def __init__(self, rows: List[Dict[str, Any]], axes: Dict[str, List[Any]],
                 config: HWConfig, reference: Dict[str, Any], notes: List[str],
                 input_desc: str):
        self.rows, self.axes, self.config = rows, axes, config
        self.reference, self.notes, self.input_desc = reference, notes, input_desc

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def params(self) -> List[str]:
        return list(self.axes)

    # -- points and the Pareto front -------------------------------------------------
    def points(self, design: Optional[str] = None) -> List[Dict[str, Any]]:
        """One dict per design point: ``design``, the swept parameters, ``energy_uj``,
        ``latency_us``, ``area_mm2``, ``perf_per_area`` (forward passes per second
        per mm2), ``norm_energy`` and ``norm_perf_area``. INT8 points do not
        depend on ``bits`` and appear once per hardware point."""
        if design not in (None, "int8", "dnateq"):
            raise ValueError(f"dnateq.hw: design must be None, 'int8' or 'dnateq', got {design!r}")
        hw_keys = [k for k in self.axes if k != "bits"]
        out, seen = [], set()
        for r in self.rows:
            for d in ("int8", "dnateq"):
                if design is not None and d != design:
                    continue
                key = (d,) + tuple(r[k] for k in hw_keys) + ((r.get("bits"),) if d == "dnateq"
                                                           else ())
                if key in seen:
                    continue
                seen.add(key)
                p = {"design": _LABEL[d]}
                p.update({k: r[k] for k in hw_keys})
                if d == "dnateq":
                    p["bits"] = r.get("bits")
                for f in ("energy_uj", "latency_us", "area_mm2", "perf_per_area",
                          "norm_energy", "norm_perf_area"):
                    p[f] = r[f"{d}_{f}"]
                out.append(p)
        return out

    def pareto(self, design: Optional[str] = None) -> List[Dict[str, Any]]:
        """The points no other point beats on both lower energy and higher
        performance per area (among ``design``'s points when given), by energy."""
        pts = sorted(self.points(design), key=lambda p: (p["energy_uj"], -p["perf_per_area"]))
        front, best = [], float("-inf")
        for p in pts:
            if p["perf_per_area"] > best:
                front.append(p)
                best = p["perf_per_area"]
        return front

    # -- exports -----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"estimate": True, "input": self.input_desc,
                "axes": {k: list(v) for k, v in self.axes.items()},
                "config": self.config.to_dict(), "reference": dict(self.reference),
                "rows": [dict(r) for r in self.rows], "pareto": self.pareto(),
                "notes": list(self.notes)}

    def _columns(self) -> List[str]:
        return list(self.rows[0].keys())

    def to_csv(self) -> str:
        cols = self._columns()
        return csv_text(cols, ([r.get(c) for c in cols] for r in self.rows))

    def to_markdown(self, max_rows: Optional[int] = None) -> str:
        """The table (every row, or the first ``max_rows``) and the Pareto front."""
        keys = list(self.axes)
        hdr = keys + ["INT8 uJ", "DNA-TEQ uJ", "energy ratio", "INT8 us", "DNA-TEQ us",
                      "speedup", "INT8 mm2", "DNA-TEQ mm2", "INT8 perf/area (norm)",
                      "DNA-TEQ perf/area (norm)"]
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        body = [[("model" if (k == "bits" and r[k] is None) else r[k]) for k in keys]
                + [r["int8_energy_uj"], r["dnateq_energy_uj"], r["energy_ratio"],
                   r["int8_latency_us"], r["dnateq_latency_us"], r["speedup"],
                   r["int8_area_mm2"], r["dnateq_area_mm2"], r["int8_norm_perf_area"],
                   r["dnateq_norm_perf_area"]] for r in rows]
        out = ["### Design-space sweep: analytical estimate", "",
               f"Estimated, not measured: dnateq.hw cost model of one forward pass of "
               f"example_input ({self.input_desc}); base configuration {self.config.summary()}. "
               f"'norm' figures are relative to the INT8 point with the highest performance "
               f"per area ({self._ref_text()}).", "",
               markdown_table(hdr, body)]
        if max_rows is not None and len(self.rows) > max_rows:
            out.append(f"\n({len(self.rows) - max_rows} more rows: see to_csv())")
        front = self.pareto()
        pk = [k for k in keys if k != "bits"]
        out += ["", "Pareto front (lower energy, higher performance per area):", "",
                markdown_table(["design"] + pk + ["bits", "energy uJ", "latency us", "area mm2",
                                                  "norm energy", "norm perf/area"],
                               [[p["design"]] + [p[k] for k in pk]
                                + [("" if p["design"] == "INT8" else
                                    ("model" if p.get("bits") is None else p["bits"])),
                                   p["energy_uj"], p["latency_us"], p["area_mm2"],
                                   p["norm_energy"], p["norm_perf_area"]] for p in front])]
        for n in self.notes:
            out.append(f"- note: {n}")
        return "\n".join(out) + "\n"

    def _ref_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.reference.items()
                         if k in self.axes and k != "bits")

    def _repr_markdown_(self) -> str:
        return self.to_markdown(max_rows=50)

    def __repr__(self) -> str:
        return (f"<SweepResult (analytical estimate): {len(self.rows)} rows over "
                f"{', '.join(self.axes)}; {len(self.pareto())} Pareto points>")

    # -- plot -------------------------------------------------------------------------
    def plot_pareto(self, path: Any = None, figsize: Optional[Sequence[float]] = None):
        """Normalized performance per area against normalized energy for every design
        point (QAPPA's Fig. 3-5 view), the Pareto front drawn as a line. Returns a
        ``matplotlib.figure.Figure``; ``path`` also saves it."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=tuple(figsize) if figsize else (7.5, 5.5))
        ax = fig.add_subplot(1, 1, 1)
        style = {"INT8": dict(marker="o", color="#4c72b0"),
                 "DNA-TEQ": dict(marker="^", color="#dd8452")}
        for d in ("int8", "dnateq"):
            pts = self.points(d)
            lab = _LABEL[d]
            ax.scatter([p["norm_energy"] for p in pts], [p["norm_perf_area"] for p in pts],
                       s=28, alpha=0.65, label=f"{lab} ({len(pts)} points)", **style[lab])
        front = self.pareto()
        ax.plot([p["norm_energy"] for p in front], [p["norm_perf_area"] for p in front],
                "k--", lw=1, drawstyle="steps-post", label="Pareto front")
        ax.scatter([p["norm_energy"] for p in front], [p["norm_perf_area"] for p in front],
                   s=70, facecolors="none", edgecolors="k", linewidths=1.2)
        ax.axvline(1.0, color="0.7", lw=0.8)
        ax.axhline(1.0, color="0.7", lw=0.8)
        ax.set_xlabel("energy, normalized (lower is better)")
        ax.set_ylabel("performance per area, normalized (higher is better)")
        ax.set_title("Design space (analytical estimate), relative to the best INT8 "
                     "perf/area point", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, path)
        return fig


def sweep(qmodel: nn.Module, example_input: Any, *, pes: Any = None, units: Any = None,
          bandwidth: Any = None, sram: Any = None, bits: Any = None, config: Any = None,
          progress: bool = True, **fields: Any) -> SweepResult:
    """Evaluate :func:`dnateq.hw.estimate` over a grid of accelerator designs.

    Args:
        qmodel, example_input: as :func:`dnateq.hw.estimate` (traced once).
        pes: values of ``num_pes`` (processing elements).
        units: values of ``units_per_pe`` (MAC / Counter-Set units per PE).
        bandwidth: values of ``vault_bandwidth_gbs`` (GB/s per vault).
        sram: values of ``sram_kb_per_pe`` (KiB of data buffer per PE).
        bits: DNA-TEQ exponent bits: ``None`` keeps each layer's own ``n``, an
            integer 2..7 runs every DNA-TEQ layer at that ``n`` (the INT8 design
            does not depend on it).
        config: the base :class:`HWConfig` (or a dict of overrides); axes not
            given stay at its value.
        progress: a tqdm progress bar over the points.
        **fields: further axes, any :class:`HWConfig` field name with a list of
            values (e.g. ``frequency_mhz=[200, 300]``).

    Each axis takes a list (or one value). The grid is the Cartesian product,
    rows in the order of the axes as given. Every point is validated before the
    model runs; a bad value raises an error naming the axis and the field.
    """
    who = "dnateq.hw.sweep"
    base = as_config(config, who)
    field_names = set(base.to_dict())
    axes: Dict[str, List[Any]] = {}
    fmap: Dict[str, str] = {}
    for arg, fname in AXES.items():
        v = {"pes": pes, "units": units, "bandwidth": bandwidth, "sram": sram}[arg]
        if v is not None:
            if fname in fields:
                raise ValueError(f"{who}: give either {arg}= or {fname}=, not both")
            axes[arg] = _as_list(v, arg)
            fmap[arg] = fname
    for k, v in fields.items():
        if k not in field_names:
            import difflib
            close = difflib.get_close_matches(k, list(field_names) + list(AXES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{who}: unknown argument {k!r}{hint}: not a sweep axis "
                             f"({', '.join(AXES)}, bits) nor an HWConfig field")
        axes[k] = _as_list(v, k)
        fmap[k] = k
    bit_values = [None] if bits is None else _as_list(bits, "bits")
    bit_values = [check_bits(b, who) for b in bit_values]
    if bits is not None:
        axes["bits"] = bit_values

    # Validate every hardware point before tracing the model.
    hw_axes = [k for k in axes if k != "bits"]
    configs: List[Any] = []
    for combo in itertools.product(*[axes[k] for k in hw_axes]):
        over = {fmap[k]: v for k, v in zip(hw_axes, combo)}
        try:
            cfg = base.replace(**over)
        except (TypeError, ValueError) as e:
            bad = ", ".join(f"{k}={v!r}" for k, v in zip(hw_axes, combo))
            raise type(e)(f"{who}: invalid design point ({bad}): {e}") from e
        configs.append((dict(zip(hw_axes, combo)), cfg))

    shapes, notes = trace_layers(qmodel, example_input, who)
    desc = describe(example_input)
    todo = [(p, c, b) for p, c in configs for b in bit_values]
    it: Iterable = todo
    if progress and len(todo) > 1:
        try:
            from tqdm.auto import tqdm
            it = tqdm(todo, desc=f"{who}: {len(todo)} points")
        except ImportError:  # pragma: no cover
            pass
    rows: List[Dict[str, Any]] = []
    for point, cfg, b in it:
        est = evaluate(shapes, cfg, bits=b)
        t = est.totals
        row: Dict[str, Any] = dict(point)
        if "bits" in axes:
            row["bits"] = b
        for d in ("int8", "dnateq"):
            row[f"{d}_energy_uj"] = t[d]["energy_pj"] / 1e6
            row[f"{d}_latency_us"] = t[d]["latency_s"] * 1e6
            row[f"{d}_area_mm2"] = t[d]["area_mm2"]
            row[f"{d}_perf_per_area"] = t[d]["perf_per_area"]
        row["energy_ratio"] = t["energy_ratio"]
        row["speedup"] = t["speedup"]
        rows.append(row)
    # QAPPA's normalization: the INT8 point with the highest performance per area.
    ref = max(rows, key=lambda r: r["int8_perf_per_area"])
    for r in rows:
        for d in ("int8", "dnateq"):
            r[f"{d}_norm_energy"] = r[f"{d}_energy_uj"] / ref["int8_energy_uj"]
            r[f"{d}_norm_perf_area"] = r[f"{d}_perf_per_area"] / ref["int8_perf_per_area"]
    reference = {k: ref[k] for k in hw_axes}
    reference.update(int8_energy_uj=ref["int8_energy_uj"],
                     int8_perf_per_area=ref["int8_perf_per_area"])
    return SweepResult(rows, axes, base, reference, list(notes), desc)
