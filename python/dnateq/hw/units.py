"""Bit-dependent unit costs from synthesis points (``predicted_units=True``).

QAPPA (seed 003) fits polynomial regressions of synthesized power, performance
and area over bit precision and PE type, so that a design point is *predicted*
rather than synthesized. The seeds give one set of synthesis points for the
arithmetic unit both accelerators are built from, a ``b x b`` multiplier with a
``b``-bit accumulator, synthesized with Cadence Genus at a 1.5 ns clock
(seed 002, Figs. 6-13):

====  ==============  ==============  ================
bits  area (um2)      power (uW)      energy / op (pJ)
====  ==============  ==============  ================
4     (lost in text)  47.0463         0.0706
8     455.400         130.879         0.1963
32    4857.480        1583.47         2.3752
====  ==============  ==============  ================

(energy per operation = power x 1.5 ns; the 8-bit point agrees with Horowitz's
0.2 pJ 8-bit multiply, ISSCC 2014). The regression keeps the physical form of
the circuit: ``area(b) = a2 b^2 + a1 b`` (the array multiplier grows with
``b^2``, the adder and its two registers with ``b``) and ``energy(b) = e2 b^2 +
e1 b + e0`` (``e0``: clock and control per operation). With the points above
both fits are exactly determined (2 and 3 points); :func:`fit` is an ordinary
least-squares fit, so further points make it a regression.

Every other unit is *composed* from the same three costs -- a multiplier bit
product (``a2``, ``e2``), an adder-and-register bit (``a1``, ``e1``, of which
``adder_share_of_bit`` is the adder) and a 2:1 multiplexer bit
(``mux_cost_of_bit`` x an adder-and-register bit) -- following each unit's
structure in the seeds:

- INT-``b`` MAC: ``b x b`` multiplier + ``accumulator_bits`` adder and registers;
- LightPE-1 (QAPPA: 8-bit activations, 4-bit power-of-two weights): one
  barrel shift (3 stages x 15 bits of muxes) + accumulator; LightPE-2 (8-bit
  weights as two power-of-two terms): two shifts, a 16-bit add, accumulator;
- DNA-TEQ Counter-Set (seed 001, Fig. 4): an ``(n_max + 1)``-bit exponent
  adder, three Array Counters (each a ``counter_bits`` adder with its register
  and two multiplexers), the C4 accumulator and a controller of
  ``controller_bits`` adder-and-register bits; its Array-Counter SRAM is sized
  by ``counter_sram_bytes_per_unit`` (x2 when double-buffered);
- FP16 multiplier: ``11 x 11`` mantissa multiplier + 5-bit exponent adder +
  16-bit result register; FP16 adder: alignment and normalization shifters
  (2 x 4 stages x 16 mux bits) + a 16-bit adder and register.

**One anchor.** The synthesis points are in seed 002's library; the areas are
scaled to the seed's 32 nm design by one factor, fixed so that the predicted
INT8 MAC (8 x 8 multiplier, 32-bit accumulator) equals seed 000's 8-bit MAC
(0.67 mm2 of MACs over 16 x 16 units). Every other unit, the Counter-Set
included, is predicted -- seed 000's 0.32 mm2 of Counter-Sets and its 0.59 /
0.78 mm2 totals are then *checks*, not inputs. SRAM area is
``bits x sram_bitcell_um2 / sram_array_efficiency`` (the 0.171 um2 6T cell of
Intel's 32 nm process; the efficiency of KB-sized arrays is a choice, swept).
Energies stay in seed 002's library (no scaling; the 8-bit point is the
anchor), FP16 operations use Horowitz's figures.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from .config import HWConfig

__all__ = ["MAC_POINTS", "CLOCK_NS", "fit", "unit_costs", "UNIFORM_DESIGNS", "ALL_DESIGNS",
           "design_bits", "area_breakdown", "area_mm2"]

#: Seed 002's synthesized MACs: bits -> (area um2 or None, power uW).
MAC_POINTS: Dict[int, Tuple[Optional[float], float]] = {
    4: (None, 47.0463), 8: (455.400, 130.879), 32: (4857.480, 1583.47)}
CLOCK_NS = 1.5
#: Seed 000: 16 x 16 INT8 MACs take 0.67 mm2 in 32 nm.
SEED_MAC_UM2 = 0.67e6 / 256
#: Seed 000's reported areas (checks, not inputs).
SEED_AREAS = dict(counter_sets_mm2=0.32, macs_mm2=0.67, int8_mm2=0.78, dnateq_mm2=0.59)

#: Uniform designs: (weight bits, activation bits, compute unit).
UNIFORM_DESIGNS = {"int8": (8, 8, "mac"), "int4": (4, 4, "mac"),
                   "lightpe1": (4, 8, "lightpe1"), "lightpe2": (8, 8, "lightpe2")}
ALL_DESIGNS = ("int8", "int4", "lightpe1", "lightpe2", "dnateq")
LABELS = {"int8": "INT8", "int4": "INT4", "lightpe1": "LightPE-1", "lightpe2": "LightPE-2",
          "dnateq": "DNA-TEQ"}


def _lstsq(rows, ys):
    import numpy as np
    A = np.asarray(rows, dtype=float)
    y = np.asarray(ys, dtype=float)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return [float(c) for c in coef], [float(v) for v in A @ coef - y]


_FIT_CACHE: Dict[str, float] = {}


def fit(points: Optional[Dict[int, Tuple[Optional[float], float]]] = None) -> Dict[str, float]:
    """Coefficients of the MAC regressions: ``a2, a1`` (um2) and ``e2, e1, e0`` (pJ),
    with the residuals of each point."""
    if points is None and _FIT_CACHE:
        return dict(_FIT_CACHE)
    pts = MAC_POINTS if points is None else points
    ar = [(b * b, b) for b, (a, _) in sorted(pts.items()) if a is not None]
    ay = [a for b, (a, _) in sorted(pts.items()) if a is not None]
    er = [(b * b, b, 1.0) for b in sorted(pts)]
    ey = [pts[b][1] * 1e-6 * CLOCK_NS * 1e-9 * 1e12 for b in sorted(pts)]   # uW x ns -> pJ
    if len(ar) < 2 or len(er) < 3:
        raise ValueError("dnateq.hw: the MAC regression needs >= 2 area and >= 3 power points")
    (a2, a1), ares = _lstsq(ar, ay)
    (e2, e1, e0), eres = _lstsq(er, ey)
    out = dict(a2=a2, a1=a1, e2=e2, e1=e1, e0=e0, area_residuals=ares, energy_residuals=eres)
    if points is None:
        _FIT_CACHE.update(out)
    return out


def unit_costs(cfg: HWConfig) -> Dict[str, Dict[str, float]]:
    """``{unit: {"area_um2": 32 nm area, "energy_pj": per operation}}`` for
    ``mac8, mac4, lightpe1, lightpe2, counter_set, fp16_mul, fp16_add,
    comparator, exp_adder_bit, counter_update``. ``counter_update`` is the
    logic energy of one Array-Counter increment (its SRAM read and write are
    charged separately); ``exp_adder_bit`` one bit of the exponent adder."""
    f = fit()
    a2, a1, e2, e1, e0 = f["a2"], f["a1"], f["e2"], f["e1"], f["e0"]
    mux = cfg.mux_cost_of_bit
    add_share = cfg.adder_share_of_bit
    acc = cfg.accumulator_bits

    def mac(b):
        return a2 * b * b + a1 * acc, e2 * b * b + e1 * acc + e0

    shift1 = 3 * 15 * mux                     # 8-bit operand, 0..7 positions
    lp1 = (a1 * (shift1 + acc), e1 * (shift1 + acc) + e0)
    lp2 = (a1 * (2 * shift1 + 16 * add_share + acc),
           e1 * (2 * shift1 + 16 * add_share + acc) + e0)
    cb = cfg.counter_bits
    exp_bits = 8                              # n_max + 1 with n_max = 7
    cs_bits = exp_bits + 3 * (cb + 2 * cb * mux) + cb + cfg.controller_bits
    counter = (a1 * cs_bits, None)
    fpm = a2 * 11 * 11 + a1 * (5 + 16)
    fpa = a1 * (2 * 4 * 16 * mux + 16)
    cmp16 = a1 * 16 * add_share
    m8 = mac(8)
    scale = SEED_MAC_UM2 / m8[0]              # the one anchor (seed 000's INT8 MAC)
    out = {
        "mac8": (m8[0], m8[1]), "mac4": mac(4), "lightpe1": lp1, "lightpe2": lp2,
        "counter_set": (counter[0], e1 * cb + e0),
        "counter_update": (0.0, e1 * cb), "exp_adder_bit": (a1, e1),
        "fp16_mul": (fpm, cfg.e_fp16_mul_pj), "fp16_add": (fpa, cfg.e_fp16_add_pj),
        "comparator": (cmp16, e1 * 16 * add_share),
        # count x LUT entry: a counter_bits x 11-bit mantissa product (the exponent
        # passes through) into a 16-bit register
        "count_lut_mul": (a2 * cb * 11 + a1 * 16, e2 * cb * 11 + e1 * 16),
        "int32_add": (a1 * 32 * add_share, e1 * 32 * add_share),
    }
    return {k: dict(area_um2=v[0] * scale, energy_pj=v[1]) for k, v in out.items()} | {
        "_scale": dict(area_um2=scale, energy_pj=1.0)}


def design_bits(design: str) -> Tuple[int, int]:
    """(weight bits, activation bits) of a uniform design."""
    if design not in UNIFORM_DESIGNS:
        raise ValueError(f"dnateq.hw: design must be one of {ALL_DESIGNS}, got {design!r}")
    return UNIFORM_DESIGNS[design][:2]


def _sram_mm2(nbytes: float, cfg: HWConfig) -> float:
    return nbytes * 8 * cfg.sram_bitcell_um2 / cfg.sram_array_efficiency * 1e-6


def area_breakdown(cfg: HWConfig, design: str, units_per_pe: Optional[int] = None
                   ) -> Dict[str, float]:
    """Predicted logic-die area of ``design`` by component, mm2 (all PEs)."""
    if design not in ALL_DESIGNS:
        raise ValueError(f"dnateq.hw: design must be one of {ALL_DESIGNS}, got {design!r}")
    u = cfg.units_per_pe if units_per_pe is None else int(units_per_pe)
    uc = unit_costs(cfg)
    P = cfg.num_pes
    unit = {"int8": "mac8", "int4": "mac4", "lightpe1": "lightpe1", "lightpe2": "lightpe2",
            "dnateq": "counter_set"}[design]
    d: Dict[str, float] = {}
    d["units"] = P * u * uc[unit]["area_um2"] * 1e-6
    d["fp_units"] = P * cfg.fp_units_per_pe * (uc["fp16_mul"]["area_um2"]
                                               + uc["fp16_add"]["area_um2"]) * 1e-6
    d["data_sram"] = P * _sram_mm2(cfg.sram_bytes_per_pe, cfg)
    if design == "dnateq":
        banks = 2 if cfg.double_buffered_counters else 1
        d["counter_sram"] = P * u * _sram_mm2(cfg.counter_sram_bytes_per_unit * banks, cfg)
        # quantization unit: comparators + a 256 B threshold buffer; the LUT of
        # alpha^k (2^(n+1) - 3 FP16 entries, 253 at n = 7)
        d["quant_unit"] = P * (cfg.quant_comparators * uc["comparator"]["area_um2"] * 1e-6
                               + _sram_mm2(256 + 253 * 2, cfg))
    else:
        d["counter_sram"] = 0.0
        d["quant_unit"] = P * 2 * uc["comparator"]["area_um2"] * 1e-6   # clamp to the range
    d["control"] = cfg.control_overhead * (d["units"] + d["fp_units"] + d["quant_unit"])
    d["total"] = sum(d.values())
    return d


def area_mm2(cfg: HWConfig, design: str, units_per_pe: Optional[int] = None) -> float:
    return area_breakdown(cfg, design, units_per_pe)["total"]


def iso_area_units(cfg: HWConfig, design: str, target_mm2: float) -> int:
    """The most units per PE with which ``design`` fits in ``target_mm2`` (>= 1)."""
    u = 1
    while area_mm2(cfg, design, u + 1) <= target_mm2 and u < 4096:
        u += 1
    return u


def regression_table(sizes: Sequence[int] = (2, 3, 4, 5, 6, 7, 8, 16, 32)) -> str:
    """Markdown: the fit and its prediction at each bit-width, seed points marked."""
    f = fit()
    lines = ["| bits | area um2 (seed 002 library) | energy pJ/op | synthesized |",
             "|---|---|---|---|"]
    for b in sizes:
        a = f["a2"] * b * b + f["a1"] * b
        e = f["e2"] * b * b + f["e1"] * b + f["e0"]
        pt = MAC_POINTS.get(b)
        tag = "" if pt is None else (f"area {pt[0]:g}, " if pt[0] else "area lost, ") + \
            f"{pt[1] * CLOCK_NS * 1e-3:.4f} pJ"
        lines.append(f"| {b} | {a:.1f} | {e:.4f} | {tag} |")
    return "\n".join(lines) + "\n"
