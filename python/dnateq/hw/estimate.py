"""``dnateq.hw.estimate``: energy, latency and area of a (quantized) model on the
DNA-TEQ accelerator against an INT8 one -- an analytical estimate (SPEC section 8).

::

    est = dnateq.hw.estimate(qmodel, example_input)
    est.energy_ratio, est.speedup       # DNA-TEQ / INT8 energy; INT8 time / DNA-TEQ time
    print(est.to_markdown())            # per layer and totals, labelled as an estimate
    est.plot("hw.png")                  # matplotlib Figure

The cost terms are in :mod:`dnateq.hw.model`, the constants in
:class:`dnateq.hw.HWConfig`, the layer geometry comes from one real forward
pass (:mod:`dnateq.hw.shapes`).
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn

from ._fmt import csv_text, markdown_table, save_figure
from .config import HWConfig, as_config
from .model import DESIGNS, ENERGY_TERMS, choose_mapping, layer_cost, storage_bits
from .._common import describe
from .shapes import LayerShape, trace_layers

__all__ = ["estimate", "evaluate", "HWEstimate", "check_bits"]

_LABEL = {"int8": "INT8", "dnateq": "DNA-TEQ"}
ESTIMATE_NOTE = ("analytical estimate, not a measurement: operation counts x per-operation "
                 "energies, a dataflow traffic model on a 3D-stacked DRAM model and a "
                 "tile schedule (dnateq.hw, SPEC section 8)")

# Per design, the totals are sums of these row fields.
_SUMMED = ("energy_pj", "op_energy_pj", "latency_s", "compute_s", "memory_s", "steps",
           "counter_updates", "fp_mul", "fp_add", "int_adds", "comparisons", "cycles",
           "weight_bytes", "input_bytes", "output_bytes", "param_bytes", "dram_bytes",
           "sram_bytes") + tuple(f"energy_{k}_pj" for k in ENERGY_TERMS)


def check_bits(bits: Any, who: str) -> Optional[int]:
    """``None`` (each layer at its own n) or an exponent width 2..7 for every
    DNA-TEQ layer (a what-if)."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{who}: bits must be None or an integer 2..7, got {bits!r}")
    bits = int(bits)
    if not 2 <= bits <= 7:
        raise ValueError(f"{who}: bits must be in 2..7 (exponent bits n), got {bits}")
    return bits


class HWEstimate:
    """The result of :func:`estimate`: ``rows`` (one flat dict per layer call),
    ``totals`` (per design and the ratios), ``config`` (the :class:`HWConfig`
    used) and ``notes``. Every output says it is an estimate.

    Row keys: ``name, kind, module, quantized, n, K, N, P, macs, a_signed,
    w_signed, zero_frac, mapping``, then per design (prefix ``int8_`` /
    ``dnateq_``) the fields of :func:`dnateq.hw.model.layer_cost` (bits, bytes,
    operation counts, cycles, seconds, ``energy_<term>_pj``, ``energy_pj``,
    ``latency_s``, ``bound``), and ``energy_ratio``, ``speedup``.
    """

    def __init__(self, rows: List[Dict[str, Any]], totals: Dict[str, Any], config: HWConfig,
                 notes: List[str], input_desc: str, bits: Optional[int] = None):
        self.rows, self.totals, self.config = rows, totals, config
        self.notes, self.input_desc, self.bits = notes, input_desc, bits

    # -- headline figures ------------------------------------------------------------
    @property
    def energy_ratio(self) -> float:
        """DNA-TEQ energy / INT8 energy (lower is better)."""
        return self.totals["energy_ratio"]

    @property
    def speedup(self) -> float:
        """INT8 latency / DNA-TEQ latency (higher is better)."""
        return self.totals["speedup"]

    @property
    def area_ratio(self) -> float:
        """DNA-TEQ area / INT8 area."""
        return self.totals["area_ratio"]

    @property
    def op_energy_ratio(self) -> float:
        """Energy ratio of the operation-count view (no dataflow, no static energy)."""
        return self.totals["op_energy_ratio"]

    def energy_breakdown(self) -> Dict[str, Dict[str, float]]:
        """``{design: {term: pJ}}`` over the whole model."""
        return {d: {k: self.totals[d][f"energy_{k}_pj"] for k in ENERGY_TERMS} for d in DESIGNS}

    # -- exports -----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"estimate": True, "method": ESTIMATE_NOTE, "input": self.input_desc,
                "bits_override": self.bits, "config": self.config.to_dict(),
                "rows": [dict(r) for r in self.rows],
                "totals": {k: (dict(v) if isinstance(v, dict) else v)
                           for k, v in self.totals.items()},
                "notes": list(self.notes)}

    def to_csv(self) -> str:
        """One line per layer call, every row key as a column."""
        cols = list(self.rows[0].keys())
        return csv_text(cols, ([r.get(c) for c in cols] for r in self.rows))

    def to_markdown(self, per_layer: bool = True) -> str:
        t = self.totals
        head = [
            "### DNA-TEQ vs INT8 accelerator: analytical estimate",
            "",
            f"Estimated, not measured ({ESTIMATE_NOTE}). One forward pass of example_input "
            f"({self.input_desc}) on {self.config.summary()}."
            + (f" What-if: every DNA-TEQ layer at n = {self.bits}." if self.bits else ""),
            "",
        ]
        out = list(head)
        if per_layer:
            hdr = ["layer", "kind", "n", "K", "N", "P", "MACs", "INT8 uJ", "DNA-TEQ uJ",
                   "energy ratio", "INT8 us", "DNA-TEQ us", "speedup", "bound INT8 / DNA-TEQ"]
            body = []
            for r in self.rows:
                body.append([r["name"], r["kind"], r["n"] if r["quantized"] else "INT8",
                             r["K"], r["N"], r["P"], r["macs"],
                             r["int8_energy_pj"] / 1e6, r["dnateq_energy_pj"] / 1e6,
                             r["energy_ratio"], r["int8_latency_s"] * 1e6,
                             r["dnateq_latency_s"] * 1e6, r["speedup"],
                             f"{r['int8_bound']} / {r['dnateq_bound']}"])
            out += [markdown_table(hdr, body), ""]
        hdr = ["design (estimate)", "energy uJ", "latency us", "area mm2", "DRAM KB", "SRAM KB",
               "perf/area (1/s/mm2)"] + [f"{k} uJ" for k in ENERGY_TERMS]
        body = []
        for d in DESIGNS:
            td = t[d]
            body.append([_LABEL[d], td["energy_pj"] / 1e6, td["latency_s"] * 1e6,
                         td["area_mm2"], td["dram_bytes"] / 1e3, td["sram_bytes"] / 1e3,
                         td["perf_per_area"]]
                        + [td[f"energy_{k}_pj"] / 1e6 for k in ENERGY_TERMS])
        out += [markdown_table(hdr, body), ""]
        out += [
            f"- energy ratio DNA-TEQ / INT8 (lower is better): **{t['energy_ratio']:.3f}** "
            f"({(1 - t['energy_ratio']):.1%} less energy)",
            f"- speedup INT8 time / DNA-TEQ time: **{t['speedup']:.3f}x**",
            f"- area DNA-TEQ / INT8: {t['dnateq']['area_mm2']:.3f} / {t['int8']['area_mm2']:.3f} "
            f"mm2 = {t['area_ratio']:.3f}",
            f"- operation-count view (operations + each tensor moved once, no dataflow, no "
            f"static energy): energy ratio {t['op_energy_ratio']:.3f}",
            f"- layers: {t['layers']} ({t['quantized_layers']} DNA-TEQ, the rest INT8 on both)",
        ]
        for n in self.notes:
            out.append(f"- note: {n}")
        return "\n".join(out) + "\n"

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        t = self.totals
        return (f"<HWEstimate (analytical estimate) of {t['layers']} layers: energy ratio "
                f"{t['energy_ratio']:.3f}, speedup {t['speedup']:.3f}x, area "
                f"{t['dnateq']['area_mm2']:.3f} vs {t['int8']['area_mm2']:.3f} mm2>")

    # -- plot -----------------------------------------------------------------------
    def plot(self, path: Any = None, figsize: Optional[Sequence[float]] = None):
        """Per-layer energy and latency of both designs and the energy breakdown.

        Returns a ``matplotlib.figure.Figure`` (no pyplot state, any backend);
        ``path`` also saves it (format from the extension)."""
        from matplotlib.figure import Figure

        names = [r["name"] for r in self.rows]
        x = list(range(len(names)))
        w = 0.4
        fig = Figure(figsize=tuple(figsize) if figsize else (max(9.0, 0.45 * len(names) + 6), 8.0))
        gs = fig.add_gridspec(2, 2, width_ratios=[3, 1])
        ax_e = fig.add_subplot(gs[0, 0])
        ax_t = fig.add_subplot(gs[1, 0], sharex=ax_e)
        ax_b = fig.add_subplot(gs[:, 1])
        colors = {"int8": "#4c72b0", "dnateq": "#dd8452"}
        for i, d in enumerate(DESIGNS):
            xs = [v + (i - 0.5) * w for v in x]
            ax_e.bar(xs, [r[f"{d}_energy_pj"] / 1e3 for r in self.rows], w, label=_LABEL[d],
                     color=colors[d])
            ax_t.bar(xs, [r[f"{d}_latency_s"] * 1e6 for r in self.rows], w, label=_LABEL[d],
                     color=colors[d])
        ax_e.set_ylabel("energy (nJ, estimate)")
        ax_e.set_title("per layer")
        ax_e.legend()
        ax_t.set_ylabel("latency (us, estimate)")
        ax_t.set_xticks(x)
        ax_t.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        for lbl in ax_e.get_xticklabels():
            lbl.set_visible(False)
        # stacked breakdown of the totals
        bottoms = [0.0, 0.0]
        palette = ["#55a868", "#c44e52", "#8172b2", "#937860", "#da8bc3", "#ccb974",
                   "#64b5cd", "#8c8c8c"]
        for k, col in zip(ENERGY_TERMS, palette):
            vals = [self.totals[d][f"energy_{k}_pj"] / 1e6 for d in DESIGNS]
            ax_b.bar([0, 1], vals, 0.6, bottom=bottoms, label=k, color=col)
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        ax_b.set_xticks([0, 1])
        ax_b.set_xticklabels([_LABEL[d] for d in DESIGNS])
        ax_b.set_ylabel("energy (uJ, estimate)")
        ax_b.set_title("total by term")
        ax_b.legend(fontsize=8)
        t = self.totals
        fig.suptitle(f"DNA-TEQ vs INT8 accelerator (analytical estimate): energy ratio "
                     f"{t['energy_ratio']:.3f}, speedup {t['speedup']:.3f}x, area "
                     f"{t['dnateq']['area_mm2']:.2f} vs {t['int8']['area_mm2']:.2f} mm2")
        fig.tight_layout()
        save_figure(fig, path)
        return fig


def _consumer_bits(shapes: List[LayerShape], i: int, design: str, cfg: HWConfig,
                   bits: Optional[int]) -> int:
    """Storage bits of layer ``i``'s outputs: the input format of the next layer
    in execution order; ``output_bits`` for the last layer and Q/K/V projections."""
    cur = shapes[i]
    if cur.to_attention or i + 1 >= len(shapes):
        return cfg.output_bits
    nxt = shapes[i + 1]
    if design == "dnateq" and nxt.quantized:
        n = bits if bits is not None else nxt.bits
        return storage_bits(n, nxt.a_signed, cfg.count_sign_bit)
    return 8


def evaluate(shapes: List[LayerShape], config: HWConfig, *, bits: Optional[int] = None,
             notes: Sequence[str] = (), input_desc: str = "") -> HWEstimate:
    """The cost model on already traced layers (what :func:`estimate` and
    :func:`dnateq.hw.sweep` call per configuration)."""
    cfg = config
    area = {d: cfg.area_mm2(d) for d in DESIGNS}
    rows: List[Dict[str, Any]] = []
    for i, L in enumerate(shapes):
        mapping = choose_mapping(L, cfg)
        n = (bits if bits is not None else L.bits) if L.quantized else None
        row: Dict[str, Any] = dict(
            name=L.name, kind=L.kind, module=L.module, quantized=L.quantized, n=n, K=L.K,
            N=L.N, P=L.P, macs=L.K * L.N * L.P, a_signed=L.a_signed, w_signed=L.w_signed,
            zero_frac=L.zero_frac, mapping=mapping)
        for d in DESIGNS:
            # A layer left in float runs on an INT8 path whichever the design, so
            # its static energy is charged at the INT8 design's area on both.
            a = area[d] if L.quantized else area["int8"]
            c = layer_cost(L, cfg, d, n=n if d == "dnateq" else None,
                           out_bits=_consumer_bits(shapes, i, d, cfg, bits),
                           area_mm2=a, mapping=mapping)
            for k, v in c.items():
                row[f"{d}_{k}"] = v
        row["energy_ratio"] = row["dnateq_energy_pj"] / row["int8_energy_pj"]
        row["speedup"] = row["int8_latency_s"] / row["dnateq_latency_s"]
        rows.append(row)

    totals: Dict[str, Any] = {}
    for d in DESIGNS:
        td = {k: sum(r[f"{d}_{k}"] for r in rows) for k in _SUMMED}
        td["area_mm2"] = area[d]
        td["throughput_per_s"] = 1.0 / td["latency_s"]
        td["perf_per_area"] = td["throughput_per_s"] / area[d]
        td["energy_delay_pj_s"] = td["energy_pj"] * td["latency_s"]
        totals[d] = td
    totals["energy_ratio"] = totals["dnateq"]["energy_pj"] / totals["int8"]["energy_pj"]
    totals["speedup"] = totals["int8"]["latency_s"] / totals["dnateq"]["latency_s"]
    totals["area_ratio"] = area["dnateq"] / area["int8"]
    totals["op_energy_ratio"] = totals["dnateq"]["op_energy_pj"] / totals["int8"]["op_energy_pj"]
    totals["layers"] = len(rows)
    totals["quantized_layers"] = sum(1 for L in shapes if L.quantized)

    out_notes = list(notes)
    if totals["quantized_layers"] == 0:
        out_notes.append("no DNA-TEQ quantized layer: both designs run every layer as INT8 "
                         "(quantize with dnateq.quantize to compare)")
    elif totals["quantized_layers"] < len(shapes):
        flt = sorted({L.name.split("[call ")[0] for L in shapes if not L.quantized})
        out_notes.append("left in float, run as INT8 on both designs (the DNA-TEQ "
                         "accelerator is assumed to keep an INT8 path; its area is not added): "
                         + ", ".join(flt))
    neg = [L.name for L in shapes if L.quantized and not L.a_signed and L.input_negative]
    if neg:
        out_notes.append("unsigned layers that received negative inputs count C2 directly "
                         "(costed as signed counting): " + ", ".join(neg))
    return HWEstimate(rows, totals, cfg, out_notes, input_desc, bits)


def estimate(qmodel: nn.Module, example_input: Any, config: Any = None, *,
             bits: Optional[int] = None) -> HWEstimate:
    """Analytical energy, latency and area of ``qmodel`` on the DNA-TEQ accelerator
    and on an INT8 one (SPEC section 8).

    Args:
        qmodel: a model from :func:`dnateq.quantize` (its ``ExpLinear`` /
            ``ExpConv2d`` run on Counter-Sets at their own bits) or any float model
            (its ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention``
            projections run as INT8 on both designs).
        example_input: what the model is called with, once, to trace the layer
            shapes: a tensor (``qmodel(x)``), a tuple/list (``qmodel(*x)``) or a
            dict (``qmodel(**x)``). Its batch is part of the workload.
        config: ``None`` (:data:`dnateq.hw.DEFAULT_CONFIG`, the seed's 16 PEs x 16
            units, 300 MHz, 16 vaults x 10 GB/s, 2.5 KiB SRAM per PE), an
            :class:`HWConfig`, or a dict of field overrides.
        bits: what-if: run every DNA-TEQ layer at ``n = bits`` (2..7) instead of
            its own.

    Returns:
        :class:`HWEstimate`: ``.energy_ratio`` (DNA-TEQ / INT8), ``.speedup``
        (INT8 time / DNA-TEQ time), ``.rows``, ``.totals``, ``.to_markdown()``,
        ``.to_dict()``, ``.to_csv()``, ``.plot()``.

    Raises:
        TypeError / ValueError naming the argument: ``qmodel`` not a module or
        without a layer the accelerator runs, ``example_input`` of the wrong
        kind, an invalid ``config`` field, ``bits`` outside 2..7;
        RuntimeError when the model cannot take ``example_input``.
    """
    who = "dnateq.hw.estimate"
    cfg = as_config(config, who)
    bits = check_bits(bits, who)
    shapes, notes = trace_layers(qmodel, example_input, who)
    return evaluate(shapes, cfg, bits=bits, notes=notes, input_desc=describe(example_input))
