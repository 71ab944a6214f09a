"""The 3D-stacked memory system and the tile schedule of one layer (``dram_model=True``).

The seed's accelerator (seed 000) sits on the logic die of a 4 GB, 4-die
3D-stacked DRAM with 4 x 4 vaults, one PE per vault, 10 GB/s per vault, and the
paper estimates the memory with DRAMSim3. This module follows DRAMSim3's
``HMC_4GB_4Lx16.ini`` (the configuration of exactly that stack: 16 channels =
vaults of 16 banks, 4 dies, 256 B rows, 64 B blocks, 32-bit 1.25 GHz DDR vault
bus = 10 GB/s) and DRAMSim3's energy formulas (``Config::InitPowerParams``):

- ACT (+PRE) ``VDD (IDD0 tRC - (IDD3N tRAS + IDD2N tRP))``, read / write burst
  ``VDD (IDD4R|IDD4W - IDD3N) burst_cycles``, refresh ``VDD (IDD5AB - IDD3N) tRFC``
  every ``tREFI``, background ``VDD IDD2N`` per cycle (``IDD3N`` while a row is
  open), per vault (one 32-bit device per rank), in pJ with cycles x ``tCK`` ns;
- every access moves whole bursts (``dram_burst_bytes``): a contiguous run of
  ``b`` bytes costs ``ceil(b / burst)`` bursts (the minimum access size);
- address interleaving as DRAMSim3's ``rocorabgbach`` (vault bits lowest, then
  bank): a stream spreads over the vaults burst by burst, so under the config's
  CLOSE_PAGE policy every burst is a row miss (an ACT); with
  ``dram_open_page=True`` the bursts of one stream that share a row hit it;
- refresh steals ``tRFC / tREFI`` of every vault's time; ACTs are limited to
  four per ``tFAW`` per vault.

**Placement.** Weights are placed offline in the vault of the PE that uses them
(replicated where several PEs share a channel group), so they are local;
activations are interleaved over all vaults, so a PE finds ``1 / vaults`` of
them locally and the rest travels the logic die's mesh (``noc_pj_per_bit_hop``
per bit and hop, the mean hop count of a ``sqrt(vaults)``-square mesh). A
layer's memory time is bounded by its busiest vault, not by the aggregate.

**Tiles.** A PE computes tiles of ``U`` outputs (``tc`` channels x ``tp``
positions, output stationary), ``K`` cycles each. The layer's channel groups
and position tiles are split over the PEs (``pg`` x ``pp``; the split with the
fewest cycles, then the least traffic). Per PE, two loop orders:

- *weights-resident*: a group's weights stay in the resident share
  (``resident_fraction``) and the inputs of the PE's spatial block stream past
  them, once per group when ``kh`` input rows fit the rest of the buffer (a line
  buffer), else every tile re-reads its windows; weights that do not fit are
  re-streamed per tile;
- *inputs-resident*: the block's inputs are cut into chunks that fit the
  resident share (each chunk re-reads the ``kh - stride`` halo rows of its
  neighbour) and every chunk streams all the PE's weights.

The spatial blocks of neighbouring PEs overlap by their halos, which are read
twice (``halo_bytes``). Outputs are written once.

**Overlap.** Per PE, each tile's streamed bytes are fetched while the previous
tile computes only if two tiles' chunks fit the stream share of the buffer
(double buffering); otherwise the tile waits for its data (``compute +
fetch``). Resident data (a group's weights, an input chunk) is fetched before
its tiles start; it hides behind the previous group only when two fit.
The layer takes ``max(slowest PE, busiest vault)``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from .config import HWConfig
from .shapes import LayerShape

__all__ = ["dram_energies", "plan_layer", "bursts", "mesh_mean_hops", "PlacementError"]


class PlacementError(ValueError):
    """A layer the mapper cannot place on the configured accelerator."""


def bursts(run_bytes: float, count: float, cfg: HWConfig) -> float:
    """Bursts to move ``count`` contiguous runs of ``run_bytes`` each."""
    if run_bytes <= 0 or count <= 0:
        return 0.0
    return count * math.ceil(run_bytes / cfg.dram_burst_bytes - 1e-9)


def mesh_mean_hops(n: int) -> float:
    """Mean Manhattan distance between two distinct nodes of the most square
    ``a x b`` mesh with ``a b = n`` (``4 x 4``: 2.67)."""
    if n <= 1:
        return 0.0
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    b = n // a
    # mean |dx| over all ordered pairs of a line of length L is (L^2 - 1) / (3 L)
    tot = (a * a - 1) / (3 * a) + (b * b - 1) / (3 * b)
    return tot * n / (n - 1)          # exclude the pairs of a node with itself


def dram_energies(cfg: HWConfig) -> Dict[str, float]:
    """DRAMSim3's per-command energies (pJ) and per-vault powers (mW) of the configured stack."""
    tck = cfg.dram_tck_ns
    trc = cfg.dram_tras + cfg.dram_trp
    vdd = cfg.dram_vdd
    burst_cycles = cfg.dram_burst_bytes / (cfg.dram_bus_bits / 8.0) / 2.0     # DDR
    act = vdd * (cfg.dram_idd0 * trc - (cfg.dram_idd3n * cfg.dram_tras
                                        + cfg.dram_idd2n * cfg.dram_trp)) * tck
    rd = vdd * (cfg.dram_idd4r - cfg.dram_idd3n) * burst_cycles * tck
    wr = vdd * (cfg.dram_idd4w - cfg.dram_idd3n) * burst_cycles * tck
    ref = vdd * (cfg.dram_idd5ab - cfg.dram_idd3n) * cfg.dram_trfc * tck
    return dict(act_pj=max(0.0, act), read_pj=max(0.0, rd), write_pj=max(0.0, wr),
                refresh_pj=max(0.0, ref),
                refresh_mw=max(0.0, ref) / (cfg.dram_trefi * tck),          # pJ/ns = mW
                background_mw=vdd * cfg.dram_idd2n, active_extra_mw=vdd * max(
                    0.0, cfg.dram_idd3n - cfg.dram_idd2n),
                burst_cycles=burst_cycles,
                refresh_fraction=min(0.999, cfg.dram_trfc / cfg.dram_trefi))


# ---------------------------------------------------------------------------
# geometry helpers
# ---------------------------------------------------------------------------

def _conv_geom(layer: LayerShape) -> Optional[Dict[str, Any]]:
    if layer.kind != "Conv2d" or len(layer.in_shape) != 4 or len(layer.out_shape) != 4:
        return None
    B, C, H, W = layer.in_shape
    _, O, Ho, Wo = layer.out_shape
    _, Cg, kh, kw = layer.w_shape
    g = layer.geometry or {}
    stride = g.get("stride", [1, 1])
    dil = g.get("dilation", [1, 1])
    return dict(B=B, C=C, H=H, W=W, O=O, Ho=Ho, Wo=Wo, Cg=Cg, kh=kh, kw=kw,
                sh=stride[0], dh=dil[0], groups=g.get("groups", 1))


def _tile_shape(layer: LayerShape, U: int) -> Tuple[int, int]:
    """``(tc, tp)``: channels and positions of one tile of at most ``U`` outputs."""
    tc = min(U, layer.N)
    tp = max(1, min(U // tc, layer.P))
    return tc, tp


def _splits(G: int, Q: int, pes: int) -> List[Tuple[int, int]]:
    out = []
    pg = 1
    while pg <= pes:
        pp = pes // pg
        if pg <= G or pg == 1:
            out.append((min(pg, G), max(1, min(pp, Q))))
        pg *= 2
    if pes not in [a * b for a, b in out]:
        out.append((min(pes, G), max(1, min(pes // max(1, min(pes, G)), Q))))
    return sorted(set(out))


# ---------------------------------------------------------------------------
# the plan of one layer
# ---------------------------------------------------------------------------

def _input_block(layer: LayerShape, geo: Optional[Dict[str, Any]], positions: int,
                 chans: int, ab: float) -> Dict[str, float]:
    """Bytes of the inputs a block of ``positions`` consecutive output positions
    (raster order) needs, for ``chans`` input channels, and its line-buffer and
    run geometry."""
    if geo is None:                                    # Linear: rows of K
        return dict(bytes=positions * layer.K * ab / 8.0, run=layer.K * ab / 8.0,
                    runs=positions, line_buffer=layer.K * ab / 8.0,
                    window_run=layer.K * ab / 8.0, window_runs_per_pos=1,
                    row_bytes=layer.K * ab / 8.0, halo_rows=0, rows=positions)
    row_bytes = geo["W"] * chans * ab / 8.0            # one input row, NHWC
    per_img = geo["Ho"] * geo["Wo"]
    if positions >= per_img:
        imgs = positions / per_img
        rows = imgs * geo["H"]
    else:
        r = math.ceil(positions / geo["Wo"])
        rows = min(geo["H"], (r - 1) * geo["sh"] + (geo["kh"] - 1) * geo["dh"] + 1)
    return dict(bytes=rows * row_bytes, run=row_bytes, runs=rows,
                line_buffer=((geo["kh"] - 1) * geo["dh"] + 1) * row_bytes,
                window_run=geo["kw"] * chans * ab / 8.0,
                window_runs_per_pos=geo["kh"],
                row_bytes=row_bytes, halo_rows=max(0, (geo["kh"] - 1) * geo["dh"] + 1
                                                   - geo["sh"]), rows=rows)


def plan_layer(layer: LayerShape, cfg: HWConfig, *, w_bits: float, a_bits: float,
               out_bits: float, params_per_pe: float, channel_params: float,
               tile_cycles: float, quant_cycles_pe: float, who: str = "dnateq.hw"
               ) -> Dict[str, Any]:
    """The schedule, traffic, time and DRAM energy of ``layer`` (one call; the
    caller multiplies by ``layer.repeat``). ``tile_cycles``: compute cycles of
    one tile (counting, with the post-processing added or overlapped);
    ``quant_cycles_pe``: cycles of the quantization stage per PE (pipelined)."""
    U, PEs, V = cfg.units_per_pe, cfg.num_pes, cfg.num_vaults
    Bbuf = cfg.sram_bytes_per_pe
    burst = cfg.dram_burst_bytes
    if Bbuf < 3 * burst:
        raise PlacementError(
            f"{who}: layer {layer.name!r} cannot be placed: a PE's data buffer "
            f"(HWConfig.sram_kb_per_pe = {cfg.sram_kb_per_pe:g} KiB = {Bbuf:g} B) must hold at "
            f"least one DRAM burst each of weights, inputs and outputs "
            f"(3 x HWConfig.dram_burst_bytes = {3 * burst:g} B)")
    R = cfg.resident_fraction * Bbuf
    geo = _conv_geom(layer)
    tc, tp = _tile_shape(layer, U)
    G = math.ceil(layer.N / tc)
    Q = math.ceil(layer.P / tp)
    K = layer.K
    if geo is not None:
        per_group = max(1, geo["O"] // max(1, geo["groups"]))
        chans = min(geo["C"], geo["Cg"] * math.ceil(tc / per_group))
    else:
        chans = K
    Wg = tc * K * w_bits / 8.0
    freq = cfg.frequency_hz
    e = dram_energies(cfg)
    bw_vault = cfg.vault_bandwidth_gbs * 1e9 * (1.0 - e["refresh_fraction"])
    t_burst = burst / bw_vault
    best = None
    for pg, pp in _splits(G, Q, PEs):
        gpe = math.ceil(G / pg)
        qpe = math.ceil(Q / pp)
        tiles_pe = gpe * qpe
        cyc = tiles_pe * tile_cycles
        blk = _input_block(layer, geo, min(layer.P, qpe * tp), chans, a_bits)
        I_total = _input_block(layer, geo, layer.P, chans, a_bits)["bytes"]
        # ---- weights-resident
        w_fit = Wg <= R
        lb_fit = blk["line_buffer"] <= Bbuf - min(Wg, R)
        if w_fit:
            w_wr = bursts(Wg, gpe, cfg)
        else:
            w_wr = bursts(R, gpe, cfg) + bursts(Wg - R, gpe * qpe, cfg)
        if lb_fit:
            i_wr = bursts(blk["run"], blk["runs"] * gpe, cfg)
        else:
            pos = min(layer.P, qpe * tp)
            i_wr = bursts(blk["window_run"], pos * blk["window_runs_per_pos"] * gpe, cfg)
        res_wr = min(Wg, R)
        stream_wr = (i_wr * burst + (0 if w_fit else (Wg - R) * gpe * qpe)) / max(1, tiles_pe)
        # ---- inputs-resident
        nch = max(1, math.ceil(blk["bytes"] / max(R, 1.0)))
        halo_extra = (nch - 1) * blk["halo_rows"] * blk["row_bytes"]
        chunk = min(blk["bytes"], R)
        pos = min(layer.P, qpe * tp)
        ir = None
        if geo is None or chunk >= blk["line_buffer"]:
            # chunks of whole input rows; each re-reads its neighbour's halo rows
            i_ir = bursts(blk["run"], blk["runs"], cfg) + (bursts(
                blk["row_bytes"], halo_extra / blk["row_bytes"], cfg) if blk["row_bytes"] else 0)
            ir = (i_ir, bursts(Wg, gpe * nch, cfg), chunk, nch)
        else:
            # the rows do not fit: chunks of whole windows (K inputs per position)
            win = K * a_bits / 8.0
            per_chunk = int(R // max(win, 1e-9))
            if per_chunk >= tp:
                nwin = max(1, math.ceil(pos / per_chunk))
                i_ir = bursts(blk["window_run"], pos * blk["window_runs_per_pos"], cfg)
                ir = (i_ir, bursts(Wg, gpe * nwin, cfg), per_chunk * win, nwin)
        if ir is not None:
            i_ir, w_ir, res_ir, nch = ir
            stream_ir = w_ir * burst / max(1, tiles_pe)
        orders = [("weights-resident", w_wr, i_wr, res_wr, stream_wr, gpe)]
        if ir is not None:
            orders.append(("inputs-resident", w_ir, i_ir, res_ir, stream_ir, nch))
        for name, wb_, ib_, res, stream, n_res in orders:
            cand = dict(pg=pg, pp=pp, gpe=gpe, qpe=qpe, tiles_pe=tiles_pe,
                        order=name, w_bursts_pe=wb_, i_bursts_pe=ib_, resident=res,
                        stream_per_tile=stream, n_resident=n_res, blk=blk,
                        I_total=I_total, line_buffer_fits=lb_fit, weights_fit=w_fit)
            out = _finish(cand, layer, cfg, tc=tc, tp=tp, Wg=Wg, out_bits=out_bits,
                          w_bits=w_bits, a_bits=a_bits, params_per_pe=params_per_pe,
                          channel_params=channel_params, tile_cycles=tile_cycles,
                          quant_cycles_pe=quant_cycles_pe, R=R, e=e, bw_vault=bw_vault)
            key = (out["latency_s"], out["dram_bursts"], cyc)
            if best is None or key < best[0]:
                best = (key, out)
    return best[1]


def _finish(b, layer, cfg, *, tc, tp, Wg, out_bits, w_bits, a_bits, params_per_pe,
            channel_params, tile_cycles, quant_cycles_pe, R, e, bw_vault):
    """Traffic, placement, time and DRAM energy of one candidate schedule."""
    PEs, V = cfg.num_pes, cfg.num_vaults
    Bbuf = cfg.sram_bytes_per_pe
    burst = cfg.dram_burst_bytes
    freq = cfg.frequency_hz
    t_burst = burst / bw_vault
    active = min(PEs, b["pg"] * b["pp"])
    # ---- outputs, parameters
    out_run = b["qpe"] * tp * tc * out_bits / 8.0       # one group's block, blocked layout
    o_bursts_pe = bursts(out_run, b["gpe"], cfg)
    p_bursts_pe = bursts(params_per_pe, 1, cfg) + bursts(channel_params / active, 1, cfg)
    # ---- totals over PEs
    w_b = b["w_bursts_pe"] * active
    i_b = b["i_bursts_pe"] * active
    o_b = o_bursts_pe * active
    p_b = p_bursts_pe * active
    read_b = w_b + i_b + p_b
    total_b = read_b + o_b
    payload = (layer.weights * w_bits + layer.in_elems * a_bits + layer.out_elems * out_bits
               ) / 8.0 + params_per_pe * active + channel_params
    halo = max(0.0, b["blk"]["bytes"] * b["pp"] - b["I_total"]) * b["pg"]
    # ---- placement: weights local, activations interleaved
    act_b = i_b + o_b
    remote_b = act_b * (V - 1) / V
    per_vault = [0.0] * V
    for pe in range(active):
        per_vault[pe % V] += b["w_bursts_pe"] + p_bursts_pe
    for v in range(V):
        per_vault[v] += act_b / V
    busiest = max(per_vault)
    # ---- row buffer
    if cfg.dram_open_page:
        # bursts of one stream that share a row: a run of r bytes spreads over
        # V vaults x banks; a (vault, bank) row gets ceil(r / (V * banks * burst)) of its
        # row_bytes / burst columns
        stride = V * cfg.dram_banks_per_vault * burst
        cols = max(1, int(cfg.dram_row_bytes // burst))

        def hits(run, n):
            per_row = min(cols, max(1, math.ceil(run / stride)))
            return n * (1 - 1 / per_row)
        run_w = Wg
        hit_frac = (hits(run_w, w_b) + hits(b["blk"]["run"], i_b) + hits(out_run, o_b)) / \
            max(1.0, w_b + i_b + o_b)
    else:
        hit_frac = 0.0
    acts = total_b * (1.0 - hit_frac)
    # ---- time
    t_tile = tile_cycles / freq
    stream_tile = b["stream_per_tile"] + o_bursts_pe * burst / max(1, b["tiles_pe"])
    stream_share = Bbuf - b["resident"]
    hops = mesh_mean_hops(V)
    if cfg.stream_prefetch:
        # burst-granular streaming: requests in flight are bounded by the stream
        # share (Little's law: bandwidth <= outstanding bytes / access latency; the
        # close-page access is PRE + ACT (tRCD = tRP = 17 in the config) + CL + burst)
        lat = ((cfg.dram_trp + cfg.dram_trp + cfg.dram_cl + e["burst_cycles"])
               * cfg.dram_tck_ns * 1e-9 + hops * cfg.noc_cycles_per_hop / freq)
        double_buffered = stream_share >= 2 * burst
        bw_pe = min(bw_vault, stream_share / lat) if double_buffered else bw_vault
    else:
        # tile-granular double buffering: the next tile's data is fetched during
        # this tile only when both fit the stream share; else the tile waits
        double_buffered = 2 * stream_tile <= stream_share
        bw_pe = bw_vault
    f_tile = stream_tile / bw_pe
    per_tile = max(t_tile, f_tile) if double_buffered else t_tile + f_tile
    res_load = b["resident"] / bw_vault
    res_hidden = 2 * b["resident"] <= R + 1e-9 and double_buffered
    exposed = res_load * (1 if res_hidden else b["n_resident"])
    t_params = p_bursts_pe * t_burst
    t_pe = t_params + exposed + b["tiles_pe"] * per_tile + (f_tile if double_buffered else 0)
    t_pe = max(t_pe, quant_cycles_pe / freq)
    t_act_limit = acts / V * (cfg.dram_tfaw / 4.0) * cfg.dram_tck_ns * 1e-9
    t_vault = max(busiest * t_burst, t_act_limit)
    latency = max(t_pe, t_vault)
    compute_s = b["tiles_pe"] * t_tile
    if t_vault >= t_pe:
        bound = "memory (vault)"
    elif double_buffered and f_tile <= t_tile:
        bound = "compute"       # steady state: every fetch hides behind a tile
    elif t_vault >= t_pe:
        bound = "memory (vault)"
    elif not double_buffered:
        bound = "memory (tile waits)"
    else:
        bound = "memory (buffer)" if bw_pe < bw_vault else "memory (port)"
    # ---- energy (pJ)
    reads = read_b
    writes = o_b
    row_open_s = min(latency, (total_b / V) * t_burst)
    e_dram = dict(
        act=acts * e["act_pj"], read=reads * e["read_pj"], write=writes * e["write_pj"],
        refresh=e["refresh_mw"] * V * latency * 1e12 * 1e-3,
        background=(e["background_mw"] * latency + e["active_extra_mw"] * row_open_s)
        * V * 1e-3 * 1e12)
    e_noc = remote_b * burst * 8.0 * hops * cfg.noc_pj_per_bit_hop
    return dict(
        tile=[tc, tp], split=[b["pg"], b["pp"]], active_pes=active, tiles_pe=b["tiles_pe"],
        order=b["order"], line_buffer_fits=b["line_buffer_fits"],
        weights_fit=b["weights_fit"], double_buffered=double_buffered,
        dram_bursts=total_b, dram_bytes=total_b * burst, dram_payload_bytes=payload,
        weight_traffic=w_b * burst, input_traffic=i_b * burst, output_traffic=o_b * burst,
        param_traffic=p_b * burst, halo_bytes=halo, remote_bytes=remote_b * burst,
        busiest_vault_bytes=busiest * burst, row_hit_rate=hit_frac, activations=acts,
        compute_s=compute_s, pe_s=t_pe, vault_s=t_vault, latency_s=latency, bound=bound,
        exposed_fill_s=exposed, dram_energy=e_dram, noc_pj=e_noc,
        sram_fill_bytes=total_b * burst)
