"""The one table of constants of the hardware cost model (SPEC section 8).

Every number the model uses lives in :class:`HWConfig`, with its unit and its
source. The sources:

- **seed 000 / seed 001**: the DNA-TEQ evaluation section (16 PEs x 16 units,
  300 MHz, 16 vaults x 10 GB/s, 2.5 KB SRAM per PE, 0.59 vs 0.78 mm2 in 32 nm)
  and the paper's hardware unit (8 comparators, 8-bit counters, Array-Counter
  sizes, FP16 LUT of base powers);
- **DRAMSim3 HMC_4GB_4Lx16.ini**: the timings and currents of the seed's
  4 GB, 4-die, 16-vault stack and DRAMSim3's energy formulas
  (:mod:`dnateq.hw.memory`);
- **seed 002**: the synthesized 4/8/32-bit MACs that the unit-cost regression
  of :mod:`dnateq.hw.units` is fitted to (``predicted_units=True``);
- **Horowitz 2014**: M. Horowitz, ISSCC 2014 -- per-operation energies of a
  45 nm process (FP16 operations, SRAM; all energies when
  ``predicted_units=False``);
- **Intel 32 nm (IEDM 2008)**: the 0.171 um2 SRAM cell;
- **choice**: the seeds are silent; the value is ours, stated with its
  reasoning, overridable, and swept by :func:`dnateq.hw.sensitivity`
  (:data:`dnateq.hw.SENSITIVITY_AXES`).

The model's ratios (DNA-TEQ / INT8) are its point; absolute joules and
seconds are order-of-magnitude estimates. ``dram_model=False,
predicted_units=False`` is the earlier roofline model with the areas
back-solved from the seed.

Usage::

    from dnateq.hw import DEFAULT_CONFIG
    cfg = DEFAULT_CONFIG.replace(num_pes=64, vault_bandwidth_gbs=5.0)
    print(cfg.to_markdown())        # every field, value, unit and source
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["HWConfig", "DEFAULT_CONFIG", "as_config", "SOURCES"]

_HOROWITZ = "Horowitz 2014 (ISSCC, 45 nm)"
_SEED0 = "seed 000 (DNA-TEQ evaluation)"
_SEED1 = "seed 001 (DNA-TEQ paper, Sec. III-C)"
_SPEC = "SPEC section 1"
_DRAMSIM = "DRAMSim3 HMC_4GB_4Lx16.ini"
_INTEL32 = "Intel 32 nm (IEDM 2008)"
_CHOICE = "choice"

#: Full references of the short source names used in the table.
SOURCES: Dict[str, str] = {
    _HOROWITZ: "M. Horowitz, 'Computing's energy problem (and what we can do about it)', "
               "IEEE ISSCC 2014, pp. 10-14; energies of a 45 nm process at 0.9 V.",
    _SEED0: "DNA-TEQ, Sec. VI (later version): 3D-stacked accelerator vs INT8 baseline, "
            "16 PEs, 16 MAC/Counter-Set units per PE, 300 MHz, 16 vaults x 10 GB/s, "
            "about 2.5 KB SRAM per PE, +6 KB per PE for DNA-TEQ; 0.59 vs 0.78 mm2 "
            "(Counter-Sets 0.32 mm2, MACs 0.67 mm2) in 32 nm.",
    _SEED1: "DNA-TEQ, Sec. III-C: quantization unit with 8 comparators, Array Counters "
            "with 8-bit entries, FP16 LUT of base powers, three pipeline stages.",
    _SPEC: "dnateq SPEC section 1: packed codes take n + 1 bits when signed, n when not.",
    _DRAMSIM: "DRAMSim3 (Li et al., IEEE CAL 2020), configs/HMC_4GB_4Lx16.ini: the 4 GB, "
              "4-die, 16-vault stack of seed 000 (16 banks per vault, 65536 rows x 64 "
              "columns x 32 bits = 256 B rows, 64 B blocks, tCK 0.8 ns, 32-bit DDR vault bus "
              "= 10 GB/s, CLOSE_PAGE, address mapping rocorabgbach), and DRAMSim3's energy "
              "formulas (src/configuration.cc, Config::InitPowerParams).",
    _INTEL32: "S. Natarajan et al., 'A 32nm logic technology featuring 2nd-generation "
              "high-k + metal-gate transistors, enhanced channel strain and 0.171 um2 SRAM "
              "cell size in a 291Mb array', IEDM 2008.",
    "seed 002 (MAC synthesis)": "Course report (CPRE 482X): 4/8/32-bit MACs synthesized "
                                "with Cadence Genus at a 1.5 ns clock; 8-bit 455.4 um2 and "
                                "130.879 uW, 32-bit 4857.48 um2 and 1583.47 uW, 4-bit "
                                "47.0463 uW (Figs. 6-13).",
    _CHOICE: "our choice where the seeds are silent; the reasoning is in the field's doc.",
}

# Area figures of seed 000 (32 nm, 16 PEs x 16 units): the whole DNA-TEQ logic
# die 0.59 mm2, the INT8 baseline 0.78 mm2, all Counter-Sets 0.32 mm2, all MACs
# 0.67 mm2; DNA-TEQ has 6 KB more SRAM per PE. The seed breaks nothing else
# down, so the model attributes the whole difference of the non-MAC /
# non-Counter-Set parts, (0.59 - 0.32) - (0.78 - 0.67) = 0.16 mm2, to those
# 16 x 6 KB of SRAM, and the baseline's remainder after its 16 x 2.5 KB to
# per-PE logic both designs share. With these, the default configuration
# reproduces the seed's 0.78 and 0.59 mm2 exactly.
_SEED_UNITS = 16 * 16
_AREA_SRAM_MM2_PER_KB = ((0.59 - 0.32) - (0.78 - 0.67)) / (16 * 6.0)
_AREA_PE_OTHER_MM2 = ((0.78 - 0.67) - 16 * 2.5 * _AREA_SRAM_MM2_PER_KB) / 16


def _f(default, unit: str, source: str, doc: str, kind: str = "float", lo: float = 0.0,
       lo_open: bool = False, hi: Optional[float] = None):
    """A config field with its documentation and validation rule in metadata.

    ``kind``: "int" (integral), "float" or "bool"; values must be ``>= lo``
    (``> lo`` when ``lo_open``) and ``<= hi`` when given."""
    return field(default=default, metadata=dict(unit=unit, source=source, doc=doc, kind=kind,
                                                 lo=lo, lo_open=lo_open, hi=hi))


@dataclass(frozen=True)
class HWConfig:
    """Constants of the DNA-TEQ vs INT8 accelerator cost model (analytical estimate).

    Immutable and validated on construction: a bad value raises ``TypeError``
    (not a number / not a bool) or ``ValueError`` (out of range), naming the
    field, what it expects and what it got. ``replace(**overrides)`` returns a
    validated copy (an unknown field name is a ``ValueError`` that suggests the
    closest one); ``to_dict()`` / ``from_dict()`` round-trip; ``to_markdown()``
    prints the table. The field list with units and sources follows (generated
    from each field's metadata, the single source of truth).
    """

    # -- architecture (seed 000 unless marked) -----------------------------------
    num_pes: int = _f(16, "PEs", _SEED0,
                      "processing elements (one per vault: 4 x 4 vaults and PEs)",
                      kind="int", lo=1)
    units_per_pe: int = _f(16, "units", _SEED0,
                           "MAC units (INT8) or Counter-Set units (DNA-TEQ) per PE; each "
                           "takes one multiply-accumulate / one counting step per cycle",
                           kind="int", lo=1)
    frequency_mhz: float = _f(300.0, "MHz", _SEED0, "clock of the logic die", lo_open=True)
    num_vaults: int = _f(16, "vaults", _SEED0, "3D-stacked DRAM vaults feeding the PEs",
                         kind="int", lo=1)
    vault_bandwidth_gbs: float = _f(10.0, "GB/s per vault (1e9 B/s)", _SEED0,
                                    "internal bandwidth of one vault; the model uses the "
                                    "aggregate num_vaults x this", lo_open=True)
    sram_kb_per_pe: float = _f(2.5, "KiB per PE", _SEED0,
                               "on-chip data buffer of a PE (inputs, outputs, weights)",
                               lo_open=True)
    counter_sram_bytes_per_unit: float = _f(
        512.0, "B per Counter-Set", _SEED1,
        "Array-Counter SRAM of one DNA-TEQ unit, sized for 7-bit exponents: AC1 16 banks x 16 "
        "entries + AC2, AC3 16 x 8 entries of 8 bits = 256 + 128 + 128 B (seed 000's '6 KB "
        "more per PE' over 16 units would be 384 B, too small for 7-bit layers)")
    resident_fraction: float = _f(
        0.5, "fraction", _CHOICE,
        "share of a PE's data buffer that keeps the reused operand (a group's weights or a "
        "position's inputs) across tiles; the rest double-buffers the streamed operand and "
        "the outputs", lo_open=True, hi=1.0)
    fp_units_per_pe: int = _f(
        16, "FP16 mul+add per PE", _CHOICE,
        "FP16 multiply-add units of a PE for post-processing (DNA-TEQ: count x LUT products, "
        "coefficients) and de-quantization (INT8); the same number in both designs, as the "
        "seed's fair comparison keeps the FP multipliers equal. Default one per unit; the "
        "paper's 'small set of multipliers and accumulators' may be fewer (swept in "
        "dnateq.hw.sensitivity)", kind="int", lo=1)
    double_buffered_counters: bool = _f(
        True, "bool", _CHOICE,
        "two Array-Counter banks per Counter-Set, so the post-processing of a tile overlaps "
        "the counting of the next (per tile max(count, post) cycles); False: one bank, the "
        "tile counts then post-processes (count + post). The second bank's SRAM is charged "
        "in the area", kind="bool")
    offline_terms: bool = _f(
        True, "bool", _SEED1,
        "C2 and C4 of layers with unsigned activations are precomputed offline (the paper: "
        "'for the majority of DNN layers') and corrected at run time for the zero "
        "activations (SPEC section 4); False: every term is counted at run time",
        kind="bool")
    quant_comparators: int = _f(
        8, "comparators", _SEED1,
        "comparators of the DNA-TEQ quantization unit; each round compares against that "
        "many sorted thresholds and narrows the interval (n = 3 takes one round)",
        kind="int", lo=1)
    counter_bits: int = _f(8, "bits", _SEED1,
                           "width of an Array-Counter entry (the paper's 8 bits)",
                           kind="int", lo=1, hi=64)
    accumulator_bits: int = _f(32, "bits", _CHOICE,
                               "accumulator register of an INT8 MAC (products are 16-bit; "
                               "sums of thousands need 32)", kind="int", lo=1, hi=64)
    param_bits: int = _f(16, "bits", _SEED1,
                         "FP16 storage of LUT entries (alpha^k), quantization thresholds, "
                         "scales, coefficients and biases", kind="int", lo=1, hi=64)
    output_bits: int = _f(16, "bits", _SEED1,
                          "storage of activations no quantized layer consumes: the network "
                          "output and the Q/K/V projections' outputs (the attention core "
                          "takes FP16)", kind="int", lo=1, hi=64)
    dram_model: bool = _f(
        True, "bool", _CHOICE,
        "True: the 3D-stacked DRAM model (dnateq.hw.memory: vault placement, bursts, row "
        "buffer, refresh, background power, buffer-limited overlap of tiles); False: the "
        "earlier roofline (aggregate bandwidth, max(compute, memory), energy per bit)",
        kind="bool")
    count_sign_bit: bool = _f(True, "bool", _SPEC,
                              "True: a signed DNA-TEQ tensor moves n + 1 bits per element "
                              "(the packed format); False: the paper's n-only convention",
                              kind="bool")
    skip_empty_bins: bool = _f(False, "bool", _CHOICE,
                               "post-process at most K bins per term (a dot product of length "
                               "K fills at most K bins); False: every bin, as the paper's LUT "
                               "walk", kind="bool")

    # -- energy per operation (pJ) -------------------------------------------------
    e_int8_mul_pj: float = _f(0.2, "pJ", _HOROWITZ, "8-bit integer multiply")
    e_int8_add_pj: float = _f(0.03, "pJ", _HOROWITZ,
                              "8-bit integer add; the (n+1)-bit exponent adder is charged "
                              "(n+1)/8 of it, a counter increment counter_bits/8 of it")
    e_int32_add_pj: float = _f(0.1, "pJ", _HOROWITZ,
                               "32-bit integer add (INT8 accumulation; C4 from the C2 bins)")
    e_fp16_mul_pj: float = _f(1.1, "pJ", _HOROWITZ,
                              "FP16 multiply (Eq. 8 coefficients, de/quantization scales)")
    e_fp16_add_pj: float = _f(0.4, "pJ", _HOROWITZ, "FP16 add (post-processing sums, bias)")
    e_count_lut_mul_pj: float = _f(
        0.3, "pJ", _CHOICE,
        "one count x LUT product of the post-processing: a counter_bits-wide integer times an "
        "FP16 alpha^k needs only an 8 x 11-bit mantissa multiply (the exponent passes "
        "through): Horowitz's 8-bit multiply (0.2 pJ) scaled by 11/8, rounded up")
    e_compare_pj: float = _f(0.05, "pJ", _CHOICE,
                             "one FP16 threshold comparison: a 16-bit magnitude compare is a "
                             "16-bit integer subtraction, between Horowitz's 8-bit (0.03) and "
                             "32-bit (0.1) adds")
    e_reg_pj_per_byte: float = _f(
        0.025, "pJ/B", _CHOICE,
        "read or write of one byte of a register / small latch bank (accumulators, counter "
        "entries, LUT and threshold entries): about 3 fJ per bit, well below a byte of the "
        "smallest SRAM in Horowitz's table (1.25 pJ/B)")
    e_sram_pj_per_byte: float = _f(1.25, "pJ/B", _HOROWITZ,
                                   "PE data buffer access: Horowitz's 8 KB SRAM, 10 pJ per "
                                   "64-bit access (an upper figure for a 2.5 KB buffer)")
    e_dram_pj_per_bit: float = _f(
        4.0, "pJ/bit", _CHOICE,
        "3D-stacked DRAM access inside the stack (no off-package I/O): below Horowitz's "
        "10 pJ/bit floor for DRAM with improved off-chip I/O, the order HMC-class stacks "
        "are credited with")
    # -- 3D-stacked DRAM (dram_model=True; DRAMSim3 HMC_4GB_4Lx16.ini) ----------------
    dram_burst_bytes: float = _f(64.0, "B", _DRAMSIM,
                                 "access granularity (block_size): every access moves whole "
                                 "bursts", lo_open=True)
    dram_bus_bits: float = _f(32.0, "bits", _DRAMSIM, "vault data bus width (bus_width)",
                              lo_open=True)
    dram_row_bytes: float = _f(256.0, "B", _DRAMSIM,
                               "row (page) of one bank: 64 columns x 32 bits", lo_open=True)
    dram_banks_per_vault: int = _f(16, "banks", _DRAMSIM, "banks_per_group x bankgroups",
                                   kind="int", lo=1)
    dram_open_page: bool = _f(False, "bool", _DRAMSIM,
                              "row-buffer policy: False = CLOSE_PAGE (the config's: every "
                              "burst activates its row), True = open page (bursts of a "
                              "stream that share a row hit it)", kind="bool")
    dram_tck_ns: float = _f(0.8, "ns", _DRAMSIM, "DRAM clock period tCK (1.25 GHz)", lo_open=True)
    dram_tras: float = _f(34.0, "tCK", _DRAMSIM, "row active time tRAS", lo_open=True)
    dram_trp: float = _f(17.0, "tCK", _DRAMSIM, "precharge time tRP (tRCD is also 17)", lo_open=True)
    dram_trfc: float = _f(420.0, "tCK", _DRAMSIM, "refresh cycle time tRFC (all banks)")
    dram_trefi: float = _f(9364.0, "tCK", _DRAMSIM, "average refresh interval tREFI", lo_open=True)
    dram_tfaw: float = _f(27.0, "tCK", _DRAMSIM, "four-activate window tFAW (per vault)")
    dram_vdd: float = _f(1.2, "V", _DRAMSIM, "DRAM supply voltage VDD")
    dram_idd0: float = _f(25.0, "mA", _DRAMSIM, "IDD0, activate-precharge current")
    dram_idd2n: float = _f(19.0, "mA", _DRAMSIM, "IDD2N, precharge standby current")
    dram_idd3n: float = _f(21.0, "mA", _DRAMSIM, "IDD3N, active standby current")
    dram_idd4r: float = _f(64.0, "mA", _DRAMSIM, "IDD4R, burst read current")
    dram_idd4w: float = _f(61.0, "mA", _DRAMSIM, "IDD4W, burst write current")
    dram_idd5ab: float = _f(150.0, "mA", _DRAMSIM, "IDD5AB, all-bank refresh current")
    dram_cl: float = _f(17.0, "tCK", _DRAMSIM, "CAS latency CL (access latency of a read)")
    stream_prefetch: bool = _f(
        False, "bool", _CHOICE,
        "False: tile-granular double buffering (a tile's streamed data is fetched during the "
        "previous tile only if both fit the buffer's stream share, else the tile waits); "
        "True: burst-granular streaming whose bandwidth is bounded by the bytes in flight "
        "(stream share / access latency, Little's law)", kind="bool")
    noc_cycles_per_hop: float = _f(2.0, "logic cycles", _CHOICE,
                                   "router + link latency of one mesh hop (stream_prefetch)")
    noc_pj_per_bit_hop: float = _f(
        0.1, "pJ/bit/hop", _CHOICE,
        "logic-die mesh energy for remote-vault traffic (router + link of one hop at 28-45 nm "
        "is of this order; swept 0..0.5 in dnateq.hw.sensitivity)")
    static_mw_per_mm2: float = _f(
        20.0, "mW/mm2", _CHOICE,
        "leakage of the logic die per mm2 of modelled area (low-power 28/32 nm order); "
        "static energy = this x area x latency, so faster designs save it (set 0 to drop)")

    # -- unit costs predicted from synthesis points (dnateq.hw.units) ---------------
    predicted_units: bool = _f(
        True, "bool", _CHOICE,
        "True: unit energies and all areas predicted by the MAC regression of seed 002's "
        "synthesis points (dnateq.hw.units), anchored once to seed 000's 8-bit MAC area; "
        "False: Horowitz's per-operation energies and the areas back-solved from seed 000",
        kind="bool")
    adder_share_of_bit: float = _f(
        0.5, "fraction", _CHOICE,
        "share of one regression 'adder + register' bit that is the adder (a full-adder "
        "cell and a flip-flop are of similar size); swept 0.3..0.7", lo_open=True, hi=1.0)
    mux_cost_of_bit: float = _f(
        0.25, "fraction", _CHOICE,
        "a 2:1 multiplexer bit as a fraction of one 'adder + register' bit (half an adder "
        "bit); swept 0.1..0.5")
    controller_bits: float = _f(
        16.0, "adder+register bits", _CHOICE,
        "the Counter-Set's controller, as so many adder-and-register bits; swept 0..64")
    sram_bitcell_um2: float = _f(
        0.171, "um2 per bit", _INTEL32,
        "6T SRAM cell of Intel's 32 nm process (Natarajan et al., IEDM 2008: 0.171 um2)",
        lo_open=True)
    sram_array_efficiency: float = _f(
        0.4, "fraction", _CHOICE,
        "cell area / array area of KB-sized buffers (periphery, sense amplifiers and "
        "decoders dominate small arrays); swept 0.2..0.7", lo_open=True, hi=1.0)
    control_overhead: float = _f(
        0.1, "fraction", _CHOICE,
        "PE control, pipeline registers and interconnect as a fraction of the PE's logic "
        "(units, FP units, quantization); swept 0..0.3")

    # -- area (seed 000, 32 nm) ----------------------------------------------------
    area_mac_um2: float = _f(0.67e6 / _SEED_UNITS, "um2", _SEED0,
                             "one INT8 MAC unit: the seed's 0.67 mm2 of MACs over 16 x 16",
                             lo_open=True)
    area_counter_set_um2: float = _f(0.32e6 / _SEED_UNITS, "um2", _SEED0,
                                     "one Counter-Set: the seed's 0.32 mm2 over 16 x 16",
                                     lo_open=True)
    area_sram_mm2_per_kb: float = _f(
        _AREA_SRAM_MM2_PER_KB, "mm2/KiB", _SEED0 + ", derived",
        "SRAM area: the seed's non-unit area difference (0.59-0.32)-(0.78-0.67) = 0.16 mm2 "
        "over its 16 x 6 KB of extra Counter-Set SRAM")
    area_pe_other_mm2: float = _f(
        _AREA_PE_OTHER_MM2, "mm2 per PE", _SEED0 + ", derived",
        "per-PE logic both designs share (control, (de)quantization, FP units): the "
        "baseline's 0.78 - 0.67 mm2 less its 16 x 2.5 KB SRAM, over 16 PEs")

    # -------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check_field(f, getattr(self, f.name)))

    # -- derived quantities --------------------------------------------------------
    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Aggregate DRAM bandwidth, bytes per second."""
        return self.num_vaults * self.vault_bandwidth_gbs * 1e9

    @property
    def frequency_hz(self) -> float:
        return self.frequency_mhz * 1e6

    @property
    def sram_bytes_per_pe(self) -> float:
        return self.sram_kb_per_pe * 1024.0

    def area_mm2(self, design: str) -> float:
        """Logic-die area of ``design``, mm2. ``predicted_units=True``: the predicted
        breakdown of :func:`dnateq.hw.units.area_breakdown` (any design of
        :data:`dnateq.hw.units.ALL_DESIGNS`); False: per PE, the units, the data buffer
        (plus seed 000's 6 KB of Counter-Set SRAM for DNA-TEQ) and the shared logic,
        with the per-unit areas back-solved from seed 000."""
        if self.predicted_units:
            from .units import area_mm2
            return area_mm2(self, design)
        u = self.units_per_pe
        if design == "int8":
            unit = u * self.area_mac_um2 * 1e-6
            sram_kb = self.sram_kb_per_pe
        elif design == "dnateq":
            unit = u * self.area_counter_set_um2 * 1e-6
            sram_kb = self.sram_kb_per_pe + u * 384.0 / 1024.0     # seed 000: 6 KB / 16
        else:
            raise ValueError(f"dnateq.hw: design must be 'int8' or 'dnateq' with "
                         f"predicted_units=False, got {design!r}")
        return self.num_pes * (unit + sram_kb * self.area_sram_mm2_per_kb
                               + self.area_pe_other_mm2)

    # -- copies and views ----------------------------------------------------------
    def replace(self, **overrides: Any) -> "HWConfig":
        """A validated copy with ``overrides`` (field names of this class)."""
        _check_names(overrides, "HWConfig.replace")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HWConfig":
        if not isinstance(d, Mapping):
            raise TypeError(f"dnateq.hw: HWConfig.from_dict expects a mapping, got "
                            f"{type(d).__name__}")
        _check_names(d, "HWConfig.from_dict")
        return cls(**dict(d))

    @staticmethod
    def fields_table() -> List[Dict[str, Any]]:
        """One dict per field: name, default, unit, source, doc."""
        out = []
        for f in dataclasses.fields(HWConfig):
            md = f.metadata
            out.append(dict(name=f.name, default=f.default, unit=md["unit"],
                            source=md["source"], doc=md["doc"]))
        return out

    def to_markdown(self) -> str:
        """Every field with its value, unit, source and meaning."""
        lines = ["| field | value | unit | source | meaning |", "|---|---|---|---|---|"]
        for row in self.fields_table():
            v = getattr(self, row["name"])
            vs = f"{v:.6g}" if isinstance(v, float) else str(v)
            lines.append(f"| {row['name']} | {vs} | {row['unit']} | {row['source']} | "
                         f"{row['doc']} |")
        lines.append("")
        for k, v in SOURCES.items():
            lines.append(f"- {k}: {v}")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """One line: the architecture point."""
        return (f"{self.num_pes} PEs x {self.units_per_pe} units, {self.frequency_mhz:g} MHz, "
                f"{self.num_vaults} vaults x {self.vault_bandwidth_gbs:g} GB/s, "
                f"{self.sram_kb_per_pe:g} KiB SRAM per PE")


def _check_names(d: Mapping[str, Any], who: str) -> None:
    names = [f.name for f in dataclasses.fields(HWConfig)]
    for k in d:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"dnateq.hw: {who}: unknown HWConfig field {k!r}{hint}; "
                             f"the fields are: {', '.join(names)}")


def _check_field(f: "dataclasses.Field", v: Any) -> Any:
    md = f.metadata
    name = f"HWConfig.{f.name}"
    what = f"(unit: {md['unit']})"
    if md["kind"] == "bool":
        if not isinstance(v, bool):
            raise TypeError(f"dnateq.hw: {name} must be True or False, got {v!r} "
                            f"({type(v).__name__})")
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"dnateq.hw: {name} must be a number {what}, got {v!r} "
                        f"({type(v).__name__})")
    fv = float(v)
    if not math.isfinite(fv):
        raise ValueError(f"dnateq.hw: {name} must be finite {what}, got {v!r}")
    if md["kind"] == "int":
        if fv != math.floor(fv):
            raise ValueError(f"dnateq.hw: {name} must be an integer {what}, got {v!r}")
        v = int(fv)
    else:
        v = fv
    lo, hi = md["lo"], md["hi"]
    if md["lo_open"] and not v > lo:
        raise ValueError(f"dnateq.hw: {name} must be > {lo:g} {what}, got {v!r}")
    if not md["lo_open"] and not v >= lo:
        raise ValueError(f"dnateq.hw: {name} must be >= {lo:g} {what}, got {v!r}")
    if hi is not None and v > hi:
        raise ValueError(f"dnateq.hw: {name} must be <= {hi:g} {what}, got {v!r}")
    return v


def _field_doc() -> str:
    lines = ["", "    Fields (name: default unit -- source -- meaning):", ""]
    for row in HWConfig.fields_table():
        d = row["default"]
        ds = f"{d:.6g}" if isinstance(d, float) else str(d)
        lines.append(f"    - ``{row['name']}``: {ds} {row['unit']} -- {row['source']} -- "
                     f"{row['doc']}")
    return "\n".join(lines) + "\n"


HWConfig.__doc__ = (HWConfig.__doc__ or "") + _field_doc()

#: The seed's accelerator (16 PEs x 16 units, 300 MHz, 16 vaults x 10 GB/s,
#: 2.5 KiB SRAM per PE) with the documented per-operation energies and areas.
DEFAULT_CONFIG = HWConfig()


def as_config(config: Any, who: str) -> HWConfig:
    """``None`` -> :data:`DEFAULT_CONFIG`; an :class:`HWConfig` as is; a mapping ->
    ``DEFAULT_CONFIG.replace(**mapping)``; anything else is a ``TypeError``."""
    if config is None:
        return DEFAULT_CONFIG
    if isinstance(config, HWConfig):
        return config
    if isinstance(config, Mapping):
        _check_names(config, who)
        return DEFAULT_CONFIG.replace(**dict(config))
    raise TypeError(f"dnateq.hw: {who}: config must be None, an HWConfig or a dict of "
                    f"HWConfig fields, got {type(config).__name__}")
