"""Several accelerator designs on the same layers, and one-at-a-time sensitivities.

- :func:`compare_designs`: INT8, INT4, LightPE-1 / LightPE-2 (QAPPA, seed 003)
  and DNA-TEQ on already traced layers, at equal units per PE or at **equal
  area** (``iso_area=True``: each design gets the most units per PE that fit
  the INT8 design's predicted area). Uniform designs run every layer at their
  own bits (a float layer included); DNA-TEQ runs its quantized layers at
  their ``n`` and float layers on an INT8 path.
- :func:`sensitivity`: speedup, energy ratio and area ratio (DNA-TEQ / INT8)
  as one :class:`HWConfig` field at a time takes each of a list of values --
  how the headline figures depend on every choice the seeds do not fix.

Both are analytical estimates (:mod:`dnateq.hw`), labelled as such.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from ._fmt import markdown_table
from .config import HWConfig, as_config
from .model import ENERGY_TERMS, choose_mapping, layer_cost, storage_bits
from .shapes import LayerShape
from .units import ALL_DESIGNS, LABELS, UNIFORM_DESIGNS, area_mm2, iso_area_units

__all__ = ["compare_designs", "DesignComparison", "sensitivity", "SENSITIVITY_AXES",
           "LEGACY_ONLY"]


def _check_shapes(shapes: Any, who: str, need_quantized: bool) -> List[LayerShape]:
    if not isinstance(shapes, (list, tuple)) or not shapes or \
            not all(isinstance(s, LayerShape) for s in shapes):
        raise TypeError(f"{who}: shapes must be a non-empty list of LayerShape "
                        f"(dnateq.hw.trace_layers(model, x)[0]), got {type(shapes).__name__}")
    if need_quantized and not any(s.quantized for s in shapes):
        raise ValueError(f"{who}: shapes has no DNA-TEQ quantized layer (LayerShape.quantized "
                         "is False for every row): quantize the network with "
                         "dnateq.quantize first, or leave 'dnateq' out of designs")
    return list(shapes)


def _out_bits(shapes: List[LayerShape], i: int, design: str, cfg: HWConfig,
              bits: Optional[int]) -> float:
    cur = shapes[i]
    if cur.to_attention or i + 1 >= len(shapes):
        return cfg.output_bits
    nxt = shapes[i + 1]
    if design == "dnateq":
        if nxt.quantized:
            n = bits if bits is not None else nxt.bits
            return storage_bits(n, nxt.a_signed, cfg.count_sign_bit)
        return 8
    return UNIFORM_DESIGNS[design][1]


def _run(shapes: List[LayerShape], cfg: HWConfig, design: str, bits: Optional[int]
         ) -> Dict[str, Any]:
    area = area_mm2(cfg, design) if cfg.predicted_units else cfg.area_mm2(design)
    tot: Dict[str, float] = {"energy_pj": 0.0, "latency_s": 0.0, "dram_bytes": 0.0}
    for k in ENERGY_TERMS:
        tot[f"energy_{k}_pj"] = 0.0
    for i, L in enumerate(shapes):
        mapping = choose_mapping(L, cfg)
        n = (bits if bits is not None else L.bits) if (L.quantized and design == "dnateq") \
            else None
        c = layer_cost(L, cfg, design, n=n, out_bits=_out_bits(shapes, i, design, cfg, bits),
                       area_mm2=area, mapping=mapping)
        for k in tot:
            tot[k] += c[k]
    tot["area_mm2"] = area
    tot["perf_per_area"] = 1.0 / tot["latency_s"] / area
    return tot


class DesignComparison:
    """The result of :func:`compare_designs`: ``rows`` (one per design: label,
    units per PE, area, energy, latency, DRAM bytes, perf/area, and the ratios
    to INT8), ``config``, ``iso_area``. An analytical estimate."""

    def __init__(self, rows: List[Dict[str, Any]], config: HWConfig, iso_area: bool):
        self.rows, self.config, self.iso_area = rows, config, iso_area

    def row(self, design: str) -> Dict[str, Any]:
        for r in self.rows:
            if r["design"] == design:
                return r
        raise KeyError(design)

    def to_markdown(self) -> str:
        hdr = ["design (estimate)", "units/PE", "area mm2", "energy uJ", "latency us",
               "DRAM MB", "speedup vs INT8", "energy vs INT8", "perf/area vs INT8"]
        body = [[r["label"], r["units_per_pe"], r["area_mm2"], r["energy_pj"] / 1e6,
                 r["latency_s"] * 1e6, r["dram_bytes"] / 1e6, r["speedup"], r["energy_ratio"],
                 r["perf_area_ratio"]] for r in self.rows]
        what = ("at equal area (each design: the most units per PE within the INT8 design's "
                "predicted area)" if self.iso_area else "at equal units per PE")
        return (f"Designs compared {what}; analytical estimate (dnateq.hw).\n\n"
                + markdown_table(hdr, body) + "\n")

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> Dict[str, Any]:
        return {"estimate": True, "iso_area": self.iso_area, "rows": [dict(r) for r in self.rows],
                "config": self.config.to_dict()}


def compare_designs(shapes: Sequence[LayerShape], config: Any = None, *,
                    designs: Sequence[str] = ALL_DESIGNS, iso_area: bool = False,
                    bits: Optional[int] = None) -> DesignComparison:
    """Evaluate ``designs`` (names of :data:`dnateq.hw.units.ALL_DESIGNS`) on ``shapes``.

    ``iso_area=True`` gives each design its own ``units_per_pe``: the most that
    keep its predicted area within the INT8 design's (needs
    ``predicted_units=True``). Raises ``ValueError`` for an unknown design, or
    when ``'dnateq'`` is asked for and no layer is quantized."""
    who = "dnateq.hw.compare_designs"
    cfg = as_config(config, who)
    designs = list(designs)
    bad = [d for d in designs if d not in ALL_DESIGNS]
    if bad or not designs:
        raise ValueError(f"{who}: designs must be a non-empty list of {ALL_DESIGNS}, got "
                         f"{designs!r}")
    shapes = _check_shapes(shapes, who, "dnateq" in designs)
    if iso_area and not cfg.predicted_units:
        raise ValueError(f"{who}: iso_area needs HWConfig.predicted_units=True (the areas of "
                         "INT4 / LightPE units come from the synthesis regression)")
    if "int8" not in designs:
        designs = ["int8"] + designs
    target = area_mm2(cfg, "int8") if cfg.predicted_units else cfg.area_mm2("int8")
    rows = []
    for d in designs:
        c = cfg
        if iso_area:
            c = cfg.replace(units_per_pe=iso_area_units(cfg, d, target))
        t = _run(shapes, c, d, bits)
        t.update(design=d, label=LABELS[d], units_per_pe=c.units_per_pe)
        rows.append(t)
    ref = rows[[r["design"] for r in rows].index("int8")]
    for r in rows:
        r["speedup"] = ref["latency_s"] / r["latency_s"]
        r["energy_ratio"] = r["energy_pj"] / ref["energy_pj"]
        r["perf_area_ratio"] = r["perf_per_area"] / ref["perf_per_area"]
    return DesignComparison(rows, cfg, iso_area)


#: The choices the seeds leave open, with the values :func:`sensitivity` sweeps by default.
SENSITIVITY_AXES: Dict[str, List[Any]] = {
    "fp_units_per_pe": [1, 2, 4, 8, 16, 32],
    "double_buffered_counters": [True, False],
    "offline_terms": [True, False],
    "stream_prefetch": [False, True],
    "dram_open_page": [False, True],
    "sram_kb_per_pe": [1.0, 2.5, 8.0, 32.0],
    "resident_fraction": [0.25, 0.5, 0.75],
    "vault_bandwidth_gbs": [2.5, 5.0, 10.0, 20.0],
    "count_sign_bit": [True, False],
    "noc_pj_per_bit_hop": [0.0, 0.1, 0.5],
    "static_mw_per_mm2": [0.0, 20.0, 50.0],
    "sram_array_efficiency": [0.2, 0.4, 0.7],
    "mux_cost_of_bit": [0.1, 0.25, 0.5],
    "adder_share_of_bit": [0.3, 0.5, 0.7],
    "controller_bits": [0.0, 16.0, 64.0],
    "control_overhead": [0.0, 0.1, 0.3],
    "e_reg_pj_per_byte": [0.0125, 0.025, 0.05],
    "accumulator_bits": [24, 32],
    "skip_empty_bins": [False, True],
    "noc_cycles_per_hop": [1.0, 2.0, 4.0],
    "dram_model": [True, False],
    "predicted_units": [True, False],
}
#: Choice fields that only the earlier model (``dram_model=False`` or
#: ``predicted_units=False``) reads, so :data:`SENSITIVITY_AXES` leaves them out.
LEGACY_ONLY = ("e_count_lut_mul_pj", "e_compare_pj", "e_dram_pj_per_bit")


def sensitivity(shapes: Sequence[LayerShape], config: Any = None, *,
                axes: Optional[Mapping[str, Sequence[Any]]] = None,
                bits: Optional[int] = None) -> List[Dict[str, Any]]:
    """One row per (field, value): ``speedup``, ``energy_ratio`` and
    ``area_ratio`` of DNA-TEQ against INT8, all other fields at ``config``.
    ``axes`` defaults to :data:`SENSITIVITY_AXES`."""
    from .estimate import evaluate
    who = "dnateq.hw.sensitivity"
    cfg = as_config(config, who)
    shapes = _check_shapes(shapes, who, True)
    axes = dict(SENSITIVITY_AXES if axes is None else axes)
    rows = []
    for field, values in axes.items():
        for v in values:
            try:
                c = cfg.replace(**{field: v})
            except (TypeError, ValueError) as e:
                raise type(e)(f"{who}: {field}={v!r}: {e}") from e
            est = evaluate(shapes, c, bits=bits)
            rows.append(dict(field=field, value=v, default=getattr(cfg, field) == v,
                             speedup=est.speedup, energy_ratio=est.energy_ratio,
                             area_ratio=est.area_ratio))
    return rows


def sensitivity_markdown(rows: List[Dict[str, Any]]) -> str:
    hdr = ["field", "value", "speedup", "energy ratio", "area ratio"]
    body = [[r["field"], f"{r['value']}" + (" (default)" if r["default"] else ""),
             r["speedup"], r["energy_ratio"], r["area_ratio"]] for r in rows]
    return markdown_table(hdr, body) + "\n"
