"""Cost terms of one layer on the INT8 or the DNA-TEQ accelerator (SPEC section 8).

Every function here is a closed formula of a :class:`~dnateq.hw.shapes.LayerShape`
and an :class:`~dnateq.hw.config.HWConfig`, so each term can be checked by
hand. Notation: ``K`` inputs per output, ``N`` output channels, ``P`` output
positions, ``steps = P*N*K`` (MACs for INT8, counting steps for DNA-TEQ),
``U`` units per PE, ``n`` exponent bits.

**Operations** (per layer).

- INT8: one multiply-accumulate per step (8-bit multiply, 32-bit add, write of
  the accumulator register); per output one FP16 multiply (de-quantization
  scale) and one FP16 add (bias); per input element one FP16 multiply and two
  comparisons (quantization with clamping).
- DNA-TEQ (SPEC section 4, Eq. 8): per step one ``(n+1)``-bit exponent add and
  the counter updates of C1 and C3; C2 too when the activations are signed.
  Unsigned layers take C2/C4 offline and correct them at run time for the
  zero activations: ``sum over outputs of min(z, K - z)`` further C2 updates
  (``LayerShape.corr_updates``). A counter update reads, increments and writes
  a ``counter_bits`` entry. C4 is the sum of the C2 bins (``2^n - 2`` integer
  adds per output) whenever C2 is counted at run time.
  Post-processing per output, for each bin of each run-time term, one count x
  LUT product (an integer times an FP16 entry, ``e_count_lut_mul_pj``) and one
  FP16 accumulation -- ``2^(n+1) - 3`` bins for C1, ``2^n - 1`` for C3 and for
  C2 (C2 only at run time) -- then four FP16 coefficient multiplies and four
  adds (three terms, the C4 term, the bias); the bins' counts and LUT entries
  are register reads. ``fp_mul`` / ``fp_add`` count all of these.
  Quantization of each input element: ``rounds`` rounds of up to
  ``quant_comparators`` comparisons against the ``2^n - 2`` sorted thresholds;
  a round splits the remaining interval into ``comparators + 1`` parts.
- Layers left in float run as INT8 on both designs.

**Dataflow and traffic** (output stationary: a unit owns one output until its
dot product is done). A PE works on *tiles* of ``U`` outputs, either ``U``
channels at one position (``"channels"``: the activation is read once and
broadcast to the units) or ``U`` positions of one channel (``"positions"``:
the weight is broadcast). The mapping with fewer cycles is used (ties: less
INT8 traffic); it is the same for both designs. Each design then takes the
loop order with less DRAM traffic:

- ``"weights-resident"``: a tile group's weights stay in the resident share
  ``R = resident_fraction x SRAM per PE``; what does not fit is re-streamed for
  every tile; the inputs stream once per group;
- ``"inputs-resident"``: a tile's input windows stay; the weights stream once
  per tile.

Simplifications, all on the same footing for both designs: no inter-PE
multicast (PEs that share a tile group each fetch its resident part), inputs
stream once per pass (the overlap of conv windows is reused within a pass,
halos ignored), the aggregate bandwidth of all vaults serves every PE, and
DRAM is charged per bit moved (no row-buffer effects).

DRAM bytes = that operand traffic + parameters (LUT, thresholds, scales per
active PE; biases and offline terms once) + outputs once. Tensors move at
their storage bits: INT8 8 bits; DNA-TEQ ``n + 1`` for a signed tensor and
``n`` for an unsigned one (``count_sign_bit=False``: ``n``). A layer's
outputs are stored at the bits of the next layer's input (``output_bits``
after the last layer and for Q/K/V projections). SRAM bytes = the fills, the
operand reads of every cycle and the outputs written and read once.

With ``dram_model=True`` (the default) the traffic, latency and DRAM energy
come from :mod:`dnateq.hw.memory` instead (bursts, vault placement, halos, the
tile schedule and buffer-limited overlap, DRAMSim3's energies); the paragraphs
above and below describe the earlier model (``dram_model=False``), which the
hand-computed tests pin. Unit energies come from :mod:`dnateq.hw.units` when
``predicted_units=True``.

**Latency** (roofline per layer, ``dram_model=False``): ``compute = max(counting, post-processing,
quantization) cycles / frequency`` -- the three pipelined stages of the
paper's unit -- with ``counting = ceil(tiles / PEs) x K``; ``memory = DRAM
bytes / (vaults x GB/s)``; ``latency = max(compute, memory)``.

**Energy** = operations x per-operation energies + SRAM bytes x pJ/B + DRAM
bits x pJ/bit + static power (``static_mw_per_mm2 x area``) x latency.

``op_energy_pj`` is the paper's operation-count view (its main text): the
operations plus every tensor moved once from DRAM, with no dataflow, no SRAM
and no static energy.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

from .config import HWConfig
from .shapes import LayerShape

__all__ = ["storage_bits", "lut_bins", "quant_rounds", "num_thresholds", "choose_mapping",
           "operand_traffic", "layer_cost", "DESIGNS", "ENERGY_TERMS"]

DESIGNS = ("int8", "dnateq")
#: Energy components of every row and total, in this order.
ENERGY_TERMS = ("compute", "postproc", "quant", "sram", "dram", "dram_static", "noc", "static")
#: Row fields that scale with the number of identical calls (``LayerShape.repeat``).
_EXTENSIVE = ("steps", "counter_updates", "fp_mul", "fp_add", "int_adds", "comparisons",
              "reg_bytes", "weight_bytes", "input_bytes", "output_bytes", "param_bytes",
              "dram_bytes", "dram_payload_bytes", "sram_bytes", "cycles", "count_cycles",
              "post_cycles", "quant_cycles", "compute_s", "memory_s", "latency_s",
              "halo_bytes", "remote_bytes", "activations", "energy_pj", "op_energy_pj")
_INT8_BITS = 8


def storage_bits(n: int, signed: bool, count_sign_bit: bool = True) -> int:
    """Bits one DNA-TEQ element takes in memory: ``n`` exponent bits plus the sign
    bit when the tensor is signed (SPEC section 1's packed format)."""
    return int(n) + (1 if (signed and count_sign_bit) else 0)


def lut_bins(n: int) -> Tuple[int, int]:
    """Bins of the counts of Eq. 8: ``(2^(n+1) - 3, 2^n - 1)`` for C1 and for C2/C3."""
    return (1 << (n + 1)) - 3, (1 << n) - 1


def num_thresholds(n: int) -> int:
    """Sorted thresholds of an ``n``-bit quantizer: ``2E = 2^n - 2`` (SPEC section 1)."""
    return (1 << n) - 2


def quant_rounds(n: int, comparators: int) -> int:
    """Rounds of the comparator quantization unit: the smallest ``r >= 1`` with
    ``(comparators + 1)^r >= 2^n - 1`` intervals."""
    intervals = (1 << n) - 1
    r, reach = 1, comparators + 1
    while reach < intervals:
        r += 1
        reach *= comparators + 1
    return r


def _tiles(layer: LayerShape, cfg: HWConfig, mapping: str) -> int:
    U = cfg.units_per_pe
    if mapping == "channels":
        return math.ceil(layer.N / U) * layer.P
    return layer.N * math.ceil(layer.P / U)


def operand_traffic(layer: LayerShape, cfg: HWConfig, mapping: str, w_bits: float,
                    a_bits: float) -> Tuple[float, str]:
    """DRAM bytes read for weights and inputs, and the loop order that gives them
    (see the module doc). ``w_bits`` / ``a_bits``: storage bits per element."""
    U, PEs = cfg.units_per_pe, cfg.num_pes
    R = cfg.resident_fraction * cfg.sram_bytes_per_pe
    N, P, K = layer.N, layer.P, layer.K
    W = layer.weights * w_bits / 8.0
    I = layer.in_elems * a_bits / 8.0
    if mapping == "channels":
        G = math.ceil(N / U)                      # channel groups (tiles per position)
        Wg = W / G                                # weights one tile group needs
        rep = 1 if G >= PEs else max(1, min(PEs // G, P))   # PEs sharing a group
        wres = G * rep * min(Wg, R) + G * max(0.0, Wg - R) * P + G * I
        Ip = K * a_bits / 8.0                     # one position's window
        ires = P * min(Ip, R) + P * max(0.0, Ip - R) * G + W * P
    elif mapping == "positions":
        Q = math.ceil(P / U)                      # position groups
        Wc = W / N                                # one channel's weights
        rep = 1 if N >= PEs else max(1, min(PEs // N, Q))
        wres = N * rep * min(Wc, R) + N * max(0.0, Wc - R) * Q + N * I
        Ib = min(U, P) * K * a_bits / 8.0         # the windows of one tile
        ires = Q * min(Ib, R) + Q * max(0.0, Ib - R) * N + W * Q
    else:
        raise ValueError(f"dnateq.hw: mapping must be 'channels' or 'positions', got {mapping!r}")
    if wres <= ires:
        return wres, "weights-resident"
    return ires, "inputs-resident"


def choose_mapping(layer: LayerShape, cfg: HWConfig) -> str:
    """``"channels"`` or ``"positions"``: fewer counting cycles, then less INT8 traffic.
    Independent of the bits, so both designs (and every bit-width) share it."""
    best: Optional[Tuple[int, float, str]] = None
    for m in ("channels", "positions"):
        cyc = math.ceil(_tiles(layer, cfg, m) / cfg.num_pes) * layer.K
        tr, _ = operand_traffic(layer, cfg, m, _INT8_BITS, _INT8_BITS)
        key = (cyc, tr, m)
        if best is None or key[:2] < best[:2]:
            best = key
    return best[2]


def layer_cost(layer: LayerShape, cfg: HWConfig, design: str, *, n: Optional[int],
               out_bits: float, area_mm2: float, mapping: str) -> Dict[str, Any]:
    """All cost terms of ``layer`` on ``design`` ("int8", "int4", "lightpe1",
    "lightpe2" or "dnateq"; see :data:`dnateq.hw.units.ALL_DESIGNS`).

    ``n``: the exponent bits a DNA-TEQ layer runs at (None, or a float layer, or
    a uniform design: that design's formulas; float layers run as INT8 on the
    DNA-TEQ design). ``out_bits``: storage bits of the
    layer's outputs (the consumer's input format). ``area_mm2``: the design's
    area, for the static energy. Returns a flat dict (counts, bytes, cycles,
    seconds, pJ per energy term, ``energy_pj``, ``latency_s``, ``bound``)."""
    from .units import ALL_DESIGNS, UNIFORM_DESIGNS, unit_costs
    if design not in ALL_DESIGNS:
        raise ValueError(f"dnateq.hw: design must be one of {ALL_DESIGNS}, got {design!r}")
    exp = design == "dnateq" and layer.quantized and n is not None
    uc = unit_costs(cfg) if cfg.predicted_units else None
    K, N, P = layer.K, layer.N, layer.P
    U, PEs = cfg.units_per_pe, cfg.num_pes
    outputs = N * P
    steps = outputs * K
    tiles = _tiles(layer, cfg, mapping)
    pe_rounds = math.ceil(tiles / PEs)
    lanes = PEs * U
    pb = cfg.param_bits / 8.0
    c: Dict[str, Any] = {}

    if not exp:
        udesign = design if design in UNIFORM_DESIGNS else "int8"
        w_bits, a_bits, unit = UNIFORM_DESIGNS[udesign]
        if uc is not None:
            e_step = uc["mac8" if unit == "mac" and w_bits == 8 else
                        "mac4" if unit == "mac" else unit]["energy_pj"]
        else:
            if udesign != "int8":
                raise ValueError(f"dnateq.hw: design {design!r} needs predicted_units=True "
                                 "(its unit costs come from the synthesis regression)")
            e_step = (cfg.e_int8_mul_pj + cfg.e_int32_add_pj
                      + cfg.accumulator_bits / 8.0 * cfg.e_reg_pj_per_byte)
        counter_updates = 0
        fp_mul = outputs + layer.in_elems          # de-quantize outputs, quantize inputs
        fp_add = outputs                           # bias
        int_adds = 0
        comparisons = 2 * layer.in_elems           # clamp to the INT8 range
        reg_bytes = 0.0
        fp_per_output = 1                          # one fused multiply-add
        rounds = 1
        shared_params = 2 * pb                     # activation and weight scales
        channel_params = layer.bias * pb
        e_compute = steps * e_step
        e_post = outputs * (cfg.e_fp16_mul_pj + cfg.e_fp16_add_pj)
        e_cmp = uc["comparator"]["energy_pj"] if uc is not None else cfg.e_compare_pj
        e_quant = layer.in_elems * (cfg.e_fp16_mul_pj + 2 * e_cmp)
        fmt = {"int8": "INT8", "int4": "INT4", "lightpe1": "LightPE-1 (W4A8)",
               "lightpe2": "LightPE-2 (W8A8)"}[udesign]
    else:
        n = int(n)
        w_bits = storage_bits(n, layer.w_signed, cfg.count_sign_bit)
        a_bits = storage_bits(n, layer.a_signed, cfg.count_sign_bit)
        # A negative input reaching an unsigned layer makes it count C2 directly
        # (SPEC section 1); so do signed layers.
        signed_count = layer.a_signed or layer.input_negative or not cfg.offline_terms
        corr = 0 if signed_count else int(layer.corr_updates)
        term2_runtime = signed_count or corr > 0
        b1, be = lut_bins(n)
        if cfg.skip_empty_bins:
            b1, be = min(b1, K), min(be, K)
        bins = b1 + be + (be if term2_runtime else 0)
        counter_updates = steps * (3 if signed_count else 2) + corr
        if uc is not None:
            e_update = (2 * cfg.counter_bits / 8.0 * cfg.e_reg_pj_per_byte
                        + uc["counter_update"]["energy_pj"])
            # exponent adder of n + 1 bits and the unit's clock/control share
            e_step = (n + 1) * uc["exp_adder_bit"]["energy_pj"] + \
                uc["counter_set"]["energy_pj"] - uc["counter_update"]["energy_pj"]
        else:
            e_update = (2 * cfg.counter_bits / 8.0 * cfg.e_reg_pj_per_byte
                        + cfg.counter_bits / 8.0 * cfg.e_int8_add_pj)
            e_step = (n + 1) / 8.0 * cfg.e_int8_add_pj            # exponent adder
        fp_mul = outputs * (bins + 4)
        fp_add = outputs * (bins + 4)
        int_adds = outputs * max(0, be - 1) if term2_runtime else 0
        rounds = quant_rounds(n, cfg.quant_comparators)
        comparisons = layer.in_elems * rounds * min(cfg.quant_comparators, num_thresholds(n))
        # each bin reads its count and its LUT entry; each comparison a threshold
        reg_post = outputs * bins * (cfg.counter_bits / 8.0 + pb)
        reg_quant = comparisons * pb
        reg_bytes = reg_post + reg_quant
        fp_per_output = bins + 4
        shared_params = (lut_bins(n)[0] + num_thresholds(n) + 4) * pb
        channel_params = layer.bias * pb + (0 if signed_count else 2 * N * pb)
        need = (lut_bins(n)[0] + 2 * lut_bins(n)[1]) * cfg.counter_bits / 8.0
        if need > cfg.counter_sram_bytes_per_unit:
            from .memory import PlacementError
            raise PlacementError(
                f"dnateq.hw: layer {layer.name!r} at n = {n} cannot be placed: its Array "
                f"Counters need {need:g} B per Counter-Set (C1 {lut_bins(n)[0]} + C2/C3 "
                f"2 x {lut_bins(n)[1]} bins x {cfg.counter_bits} bits), more than "
                f"HWConfig.counter_sram_bytes_per_unit = {cfg.counter_sram_bytes_per_unit:g} B")
        e_compute = steps * e_step + counter_updates * e_update
        e_lut = uc["count_lut_mul"]["energy_pj"] if uc is not None else cfg.e_count_lut_mul_pj
        e_i32 = uc["int32_add"]["energy_pj"] if uc is not None else cfg.e_int32_add_pj
        e_cmp = uc["comparator"]["energy_pj"] if uc is not None else cfg.e_compare_pj
        e_post = (outputs * bins * e_lut + outputs * 4 * cfg.e_fp16_mul_pj
                  + fp_add * cfg.e_fp16_add_pj + int_adds * e_i32
                  + reg_post * cfg.e_reg_pj_per_byte)
        e_quant = comparisons * e_cmp + reg_quant * cfg.e_reg_pj_per_byte
        fmt = f"n={n}"

    if cfg.dram_model:
        _dram_path(c, layer, cfg, exp=exp, w_bits=w_bits, a_bits=a_bits, out_bits=out_bits,
                   steps=steps, outputs=outputs, fp_per_output=fp_per_output, rounds=rounds,
                   shared_params=shared_params, channel_params=channel_params,
                   area_mm2=area_mm2, mapping=mapping, e_compute=e_compute, e_post=e_post,
                   e_quant=e_quant)
    else:
        _roofline_path(c, layer, cfg, exp=exp, w_bits=w_bits, a_bits=a_bits,
                       out_bits=out_bits, steps=steps, outputs=outputs, tiles=tiles,
                       pe_rounds=pe_rounds, lanes=lanes, fp_per_output=fp_per_output,
                       rounds=rounds, shared_params=shared_params,
                       channel_params=channel_params, area_mm2=area_mm2, mapping=mapping,
                       e_compute=e_compute, e_post=e_post, e_quant=e_quant)
    c.update(format=fmt, w_bits=w_bits, a_bits=a_bits, out_bits=out_bits, steps=steps,
             counter_updates=counter_updates, fp_mul=fp_mul, fp_add=fp_add,
             int_adds=int_adds, comparisons=comparisons, reg_bytes=reg_bytes)
    # The operation-count view of the paper's main text: operations plus each
    # tensor moved once, no dataflow, no static energy.
    compulsory = (c["weight_bytes"] + c["input_bytes"] + c["output_bytes"] + channel_params
                  + shared_params)
    c["op_energy_pj"] = e_compute + e_post + e_quant + compulsory * 8.0 * cfg.e_dram_pj_per_bit
    rep = int(getattr(layer, "repeat", 1) or 1)
    c["repeat"] = rep
    if rep != 1:
        for k in _EXTENSIVE:
            if k in c:
                c[k] = c[k] * rep
        for k in ENERGY_TERMS:
            c[f"energy_{k}_pj"] *= rep
    return c


def _roofline_path(c, layer, cfg, *, exp, w_bits, a_bits, out_bits, steps, outputs, tiles,
                   pe_rounds, lanes, fp_per_output, rounds, shared_params, channel_params,
                   area_mm2, mapping, e_compute, e_post, e_quant) -> None:
    """The earlier model (``dram_model=False``): aggregate bandwidth, perfect
    overlap (``max(compute, memory)``), DRAM energy per bit moved."""
    PEs, K = cfg.num_pes, layer.K
    reads, order = operand_traffic(layer, cfg, mapping, w_bits, a_bits)
    active_pes = min(PEs, tiles)
    params = shared_params * active_pes + channel_params
    w_bytes = layer.weights * w_bits / 8.0
    i_bytes = layer.in_elems * a_bits / 8.0
    o_bytes = layer.out_elems * out_bits / 8.0
    dram = reads + params + o_bytes
    if mapping == "channels":
        operand_reads = steps * w_bits / 8.0 + tiles * K * a_bits / 8.0
    else:
        operand_reads = steps * a_bits / 8.0 + tiles * K * w_bits / 8.0
    sram = reads + params + operand_reads + 2 * o_bytes
    count_cycles = pe_rounds * K
    U = cfg.units_per_pe
    post_cycles = pe_rounds * math.ceil(U * fp_per_output / cfg.fp_units_per_pe)
    quant_cycles = math.ceil(layer.in_elems / lanes) * rounds
    cycles = max(count_cycles, post_cycles, quant_cycles)
    t_compute = cycles / cfg.frequency_hz
    t_memory = dram / cfg.bandwidth_bytes_per_s
    latency = max(t_compute, t_memory)
    stage = max((count_cycles, "counting" if exp else "MAC"), (post_cycles, "post-processing"),
                (quant_cycles, "quantization"), key=lambda t: t[0])[1]
    bound = "memory" if t_memory > t_compute else stage
    e = dict(compute=e_compute, postproc=e_post, quant=e_quant,
             sram=sram * cfg.e_sram_pj_per_byte, dram=dram * 8.0 * cfg.e_dram_pj_per_bit,
             dram_static=0.0, noc=0.0,
             static=cfg.static_mw_per_mm2 * 1e-3 * area_mm2 * latency * 1e12)
    c.update(weight_bytes=w_bytes, input_bytes=i_bytes, output_bytes=o_bytes,
             param_bytes=params, dram_bytes=dram, dram_payload_bytes=dram, sram_bytes=sram,
             order=order, tiles=tiles, cycles=cycles, count_cycles=count_cycles,
             post_cycles=post_cycles, quant_cycles=quant_cycles, compute_s=t_compute,
             memory_s=t_memory, latency_s=latency, bound=bound, halo_bytes=0.0,
             remote_bytes=0.0, activations=0.0, row_hit_rate=0.0, double_buffered=True,
             split="", tile="")
    for k in ENERGY_TERMS:
        c[f"energy_{k}_pj"] = e[k]
    c["energy_pj"] = sum(e.values())


def _dram_path(c, layer, cfg, *, exp, w_bits, a_bits, out_bits, steps, outputs,
               fp_per_output, rounds, shared_params, channel_params, area_mm2, mapping,
               e_compute, e_post, e_quant) -> None:
    """The 3D-stacked DRAM model (``dram_model=True``, :mod:`dnateq.hw.memory`)."""
    from .memory import plan_layer
    K, U, PEs = layer.K, cfg.units_per_pe, cfg.num_pes
    tc = min(U, layer.N)
    tp = max(1, min(U // tc, layer.P))
    outs_tile = tc * tp
    post_tile = math.ceil(outs_tile * fp_per_output / cfg.fp_units_per_pe)
    overlap = cfg.double_buffered_counters or not exp
    tile_cycles = max(K, post_tile) if overlap else K + post_tile
    quant_pe = math.ceil(layer.in_elems / (PEs * U)) * rounds
    pl = plan_layer(layer, cfg, w_bits=w_bits, a_bits=a_bits, out_bits=out_bits,
                    params_per_pe=shared_params, channel_params=channel_params,
                    tile_cycles=tile_cycles, quant_cycles_pe=quant_pe)
    tiles = pl["tiles_pe"] * pl["active_pes"]
    w_bytes = layer.weights * w_bits / 8.0
    i_bytes = layer.in_elems * a_bits / 8.0
    o_bytes = layer.out_elems * out_bits / 8.0
    # SRAM: every DRAM burst is written into the buffer; every cycle each unit
    # reads its streamed operand and the tile's broadcast operand is read once;
    # outputs are written and read once.
    operand_reads = steps * w_bits / 8.0 + math.ceil(layer.P / tp) * math.ceil(
        layer.N / tc) * K * a_bits / 8.0
    sram = pl["dram_bytes"] + operand_reads + 2 * o_bytes
    latency = pl["latency_s"]
    ed = pl["dram_energy"]
    count_cycles = pl["tiles_pe"] * K
    post_cycles = pl["tiles_pe"] * post_tile
    stage = "counting" if exp else "MAC"
    if post_tile > K:
        stage = "post-processing"
    bound = pl["bound"]
    if bound == "compute":
        bound = stage if quant_pe <= pl["tiles_pe"] * tile_cycles else "quantization"
    e = dict(compute=e_compute, postproc=e_post, quant=e_quant,
             sram=sram * cfg.e_sram_pj_per_byte,
             dram=ed["act"] + ed["read"] + ed["write"],
             dram_static=ed["refresh"] + ed["background"], noc=pl["noc_pj"],
             static=cfg.static_mw_per_mm2 * 1e-3 * area_mm2 * latency * 1e12)
    c.update(weight_bytes=w_bytes, input_bytes=i_bytes, output_bytes=o_bytes,
             param_bytes=pl["param_traffic"], dram_bytes=pl["dram_bytes"],
             dram_payload_bytes=pl["dram_payload_bytes"], sram_bytes=sram, order=pl["order"],
             tiles=tiles, cycles=pl["tiles_pe"] * tile_cycles, count_cycles=count_cycles,
             post_cycles=post_cycles, quant_cycles=quant_pe, compute_s=pl["compute_s"],
             memory_s=max(pl["vault_s"], pl["pe_s"] - pl["compute_s"]), latency_s=latency,
             bound=bound, halo_bytes=pl["halo_bytes"], remote_bytes=pl["remote_bytes"],
             activations=pl["activations"], row_hit_rate=pl["row_hit_rate"],
             double_buffered=pl["double_buffered"], split="x".join(map(str, pl["split"])),
             tile="x".join(map(str, pl["tile"])), weight_traffic=pl["weight_traffic"],
             input_traffic=pl["input_traffic"], output_traffic=pl["output_traffic"],
             busiest_vault_bytes=pl["busiest_vault_bytes"], vault_s=pl["vault_s"],
             pe_s=pl["pe_s"])
    for k in ENERGY_TERMS:
        c[f"energy_{k}_pj"] = e[k]
    c["energy_pj"] = sum(e.values())
