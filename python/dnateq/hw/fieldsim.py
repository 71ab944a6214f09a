"""Cross-check of the INT8 baseline against a field simulator: ZigZag.

ZigZag (``pip install zigzag-dse``; Mei et al., IEEE TC 2021; KU Leuven) is an
analytical design-space explorer: a memory hierarchy with per-level sizes,
ports and bandwidths, a spatially unrolled MAC array, and a search (LOMA) over
temporal mappings. :func:`zigzag_int8` describes the seed's INT8 baseline to it
-- a ``PEs x units`` MAC array, one ``sram_kb_per_pe`` buffer *per PE* (served
by that PE's units only), an output register per unit (output stationary) and
a DRAM level with the stack's aggregate bandwidth -- and runs one layer with the
same spatial unrolling the dnateq model chose (units over ``tc`` channels x
``tp`` positions, PEs over ``pg`` channel groups x ``pp`` position blocks).
It returns ZigZag's ideal and total cycles and its DRAM traffic per operand.

Why a cross-check and not the baseline itself: ZigZag has no DRAM bursts, rows,
refresh or background power, no vault placement, and no Counter-Set (its
operational array is a MAC array of one precision), so it cannot run the
DNA-TEQ design and would drop the memory mechanisms the comparison rests on.
What it does model faithfully -- the loop-nest reuse in a buffer hierarchy and
the cycles of an unrolled array -- is what the test pins (``tests/test_hw.py``:
compute cycles equal, DRAM bytes and latency within stated factors).
:func:`zigzag_layer` goes as far as ZigZag can towards the DNA-TEQ unit: a
custom operational array with the layer's storage bits as operand precisions
and a Counter-Set's energy per step; it checks DNA-TEQ's data movement at its
bits, not its post-processing.

SCALE-Sim (``pip install scalesim``) was evaluated too: version 3.0.0 from PyPI
fails inside its own memory model on this machine's numpy (``TypeError: only
0-dimensional arrays can be converted to Python scalars`` in
``double_buffered_scratchpad_mem.service_memory_requests``), and it models a
systolic array with three global scratchpads rather than 16 PEs with private
buffers, so it is not used.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
from typing import Any, Dict

from .config import HWConfig
from .shapes import LayerShape

__all__ = ["zigzag_available", "zigzag_int8", "zigzag_layer"]


def zigzag_available() -> bool:
    try:
        import zigzag.api  # noqa: F401
        return True
    except Exception:
        return False


def _hw_yaml(cfg: HWConfig, bits_per_cycle: int, w_bits: int = 8, a_bits: int = 8,
             unit_energy: float = 0.34) -> str:
    sram = int(cfg.sram_bytes_per_pe * 8)
    return f"""name: dnateq_int8_baseline
memories:
  reg_O:
    size: {cfg.accumulator_bits}
    r_cost: 0.1
    w_cost: 0.1
    area: 0
    latency: 1
    auto_cost_extraction: False
    operands: [O]
    ports:
      - name: r_port_1
        type: read
        bandwidth_min: {cfg.accumulator_bits}
        bandwidth_max: {cfg.accumulator_bits}
        allocation:
          - O, tl
      - name: r_port_2
        type: read
        bandwidth_min: {cfg.accumulator_bits}
        bandwidth_max: {cfg.accumulator_bits}
        allocation:
          - O, th
      - name: w_port_1
        type: write
        bandwidth_min: {cfg.accumulator_bits}
        bandwidth_max: {cfg.accumulator_bits}
        allocation:
          - O, fh
      - name: w_port_2
        type: write
        bandwidth_min: {cfg.accumulator_bits}
        bandwidth_max: {cfg.accumulator_bits}
        allocation:
          - O, fl
    served_dimensions: []
  sram:
    size: {sram}
    r_cost: 10
    w_cost: 10
    area: 0
    latency: 1
    operands: [I1, I2, O]
    ports:
      - name: rw_port_1
        type: read_write
        bandwidth_min: 8
        bandwidth_max: 4096
        allocation:
          - I1, tl
          - I2, tl
          - O, tl
          - O, fl
      - name: rw_port_2
        type: read_write
        bandwidth_min: 8
        bandwidth_max: 4096
        allocation:
          - I1, fh
          - I2, fh
          - O, fh
          - O, th
    served_dimensions: [D2]
  dram:
    size: 34359738368
    r_cost: 256
    w_cost: 256
    area: 0
    latency: 1
    operands: [I1, I2, O]
    ports:
      - name: rw_port_1
        type: read_write
        bandwidth_min: 8
        bandwidth_max: {bits_per_cycle}
        allocation:
          - I1, fh
          - I1, tl
          - I2, fh
          - I2, tl
          - O, fh
          - O, tl
          - O, fl
          - O, th
    served_dimensions: [D2]
operational_array:
  input_precision: [{a_bits}, {w_bits}]
  unit_energy: {unit_energy}
  unit_area: 1
  dimensions: [D1, D2]
  sizes: [{cfg.num_pes}, {cfg.units_per_pe}]
"""


def _workload_yaml(layer: LayerShape, w_bits: int = 8, a_bits: int = 8,
                   out_bits: int = 8) -> str:
    if layer.kind == "Linear":
        return f"""- id: 0
  name: {layer.name or 'layer'}
  operator_type: Gemm
  equation: O[b][k]+=I[b][c]*W[k][c]
  loop_dims: [B, K, C]
  loop_sizes: [{layer.P}, {layer.N}, {layer.K}]
  operand_precision:
    W: {w_bits}
    I: {a_bits}
    O: 16
    O_final: {out_bits}
  operand_source:
    I: 0
"""
    B, C, H, W = layer.in_shape
    _, O, Ho, Wo = layer.out_shape
    _, Cg, kh, kw = layer.w_shape
    g = layer.geometry or {}
    if g.get("groups", 1) != 1:
        raise ValueError("dnateq.hw.fieldsim: grouped convolutions are not described to ZigZag")
    sh, sw = g.get("stride", [1, 1])
    return f"""- id: 0
  name: {layer.name or 'layer'}
  operator_type: Conv
  equation: O[b][k][oy][ox]+=W[k][c][fy][fx]*I[b][c][iy][ix]
  dimension_relations: [ix={sw}*ox+1*fx, iy={sh}*oy+1*fy]
  loop_dims: [B, K, C, OY, OX, FY, FX]
  loop_sizes: [{B}, {O}, {C}, {Ho}, {Wo}, {kh}, {kw}]
  operand_precision:
    W: {w_bits}
    I: {a_bits}
    O: 16
    O_final: {out_bits}
  operand_source:
    I: 0
"""


def _mapping_yaml(layer: LayerShape, split, tile) -> str:
    tc, tp = tile
    pg, pp = split
    pos = "B" if layer.kind == "Linear" else "OX"
    d1 = []
    if pg > 1:
        d1.append(f"      - K, {pg}")
    if pp > 1:
        d1.append(f"      - {pos if layer.kind == 'Linear' else 'OY'}, {pp}")
    if not d1:
        d1.append("      - K, 1")
    d2 = [f"      - K, {tc}"] + ([f"      - {pos}, {tp}"] if tp > 1 else [])
    return ("- name: default\n  spatial_mapping:\n    D1:\n" + "\n".join(d1) + "\n    D2:\n"
            + "\n".join(d2) + "\n  memory_operand_links:\n    O: O\n    W: I2\n    I: I1\n")


def zigzag_int8(layer: LayerShape, cfg: HWConfig, *, split=None, tile=None,
                lpf_limit: int = 4) -> Dict[str, Any]:
    """:func:`zigzag_layer` with INT8 operands and outputs (the baseline)."""
    return zigzag_layer(layer, cfg, split=split, tile=tile, lpf_limit=lpf_limit)


def zigzag_layer(layer: LayerShape, cfg: HWConfig, *, w_bits: int = 8, a_bits: int = 8,
                 out_bits: int = 8, unit_energy: float = 0.34, split=None, tile=None,
                 lpf_limit: int = 4) -> Dict[str, Any]:
    """Run ZigZag on ``layer`` on the array of ``cfg`` with ``w_bits`` /
    ``a_bits``-bit operands and ``out_bits``-bit outputs in memory. With a DNA-TEQ
    layer's storage bits and a Counter-Set's energy per step as ``unit_energy``
    this is the closest ZigZag comes to the counting unit: its data movement at
    the layer's bits (ZigZag has no stage for the post-processing, so its cycles
    are the counting cycles only). Returns
    ``ideal_cycles``, ``cycles`` (with stalls), ``dram_bytes`` and per operand
    ``dram_w_bytes`` / ``dram_i_bytes`` / ``dram_o_bytes``. ``split`` / ``tile``:
    the PE and unit unrolling (default: the dnateq model's choice)."""
    from zigzag.api import get_hardware_performance_zigzag
    if split is None or tile is None:
        from .memory import plan_layer
        pl = plan_layer(layer, cfg.replace(predicted_units=False), w_bits=w_bits,
                        a_bits=a_bits, out_bits=out_bits, params_per_pe=0, channel_params=0, tile_cycles=layer.K,
                        quant_cycles_pe=0)
        split, tile = split or pl["split"], tile or pl["tile"]
    # one DRAM port per PE (its vault), as the dnateq model: no multicast between PEs
    bits_per_cycle = int(cfg.vault_bandwidth_gbs * 1e9 * 8 / cfg.frequency_hz)
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for name, text in (("hw", _hw_yaml(cfg, bits_per_cycle, w_bits, a_bits, unit_energy)),
                           ("wl", _workload_yaml(layer, w_bits, a_bits, out_bits)),
                           ("map", _mapping_yaml(layer, split, tile))):
            paths[name] = os.path.join(d, f"{name}.yaml")
            with open(paths[name], "w") as f:
                f.write(text)
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                _, _, cmes = get_hardware_performance_zigzag(
                    paths["wl"], paths["hw"], paths["map"], opt="latency",
                    dump_folder=os.path.join(d, "out"), loma_show_progress_bar=False,
                    lpf_limit=lpf_limit)
        finally:
            logging.getLogger().setLevel(level)
    cme = cmes[0][1][0][0]
    out: Dict[str, Any] = dict(ideal_cycles=float(cme.ideal_cycle),
                               cycles=float(cme.latency_total2), split=list(split),
                               tile=list(tile))
    tot = 0.0
    for op, pats in cme.mapping.unit_mem_data_movement.items():
        top = pats[-1].get_attribute(_attr("DATA_ELEM_MOVE_COUNT"))
        prec = pats[-1].get_attribute(_attr("DATA_PRECISION"))
        name = str(op)
        from zigzag.mapping.data_movement import DataDirection as DD
        dd = DD.WR_IN_BY_LOW if name == "O" else DD.RD_OUT_TO_LOW
        b = top.get(dd) * prec.get(dd) / 8.0
        out[f"dram_{name.lower()}_bytes"] = b
        tot += b
    out["dram_bytes"] = tot
    return out


def _attr(name: str):
    from zigzag.mapping.data_movement import DataMoveAttr
    return getattr(DataMoveAttr, name)
