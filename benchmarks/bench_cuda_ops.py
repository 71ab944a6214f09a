"""CUDA operator benchmarks: each dnateq op against peers measured in the same
run (cuBLAS fp16/bf16/fp32 through F.linear, an elementwise int8 quantizer,
and, where installed, bitsandbytes NF4 and torchao int4 weight-only), as
ratios, plus bandwidth figures against the device's HBM peak and against a
copy bandwidth measured in the same run.

    python benchmarks/bench_cuda_ops.py [--quick] [--json PATH] [--peak-bw B/s]
        [--sections bandwidth,quantize,gemv,gemm,count,peers] [--no-graph]
        [--no-kernel-time] [--repeat N] [--strict]
    python benchmarks/bench_cuda_ops.py --merge A.json B.json [--json OUT]

On the GPU machine: build the extension with its CUDA kernels first
(``DNATEQ_CUDA=1 pip install --no-build-isolation -e .``), then
``python benchmarks/bench_cuda_ops.py --quick`` (about a minute, a smoke
run) and ``python benchmarks/bench_cuda_ops.py`` (the target shapes), and
commit the JSON it writes. ``--cpu-dry-run`` runs every section on the CPU
with tiny shapes, to check the script itself where there is no GPU.

Prints a table and writes JSON (default
benchmarks/results/cuda_ops.<device-name-slug>.json, ``.quick.json`` with
--quick) with the device name, compute capability, torch / CUDA / driver
versions, every figure, and a "targets" section (value, threshold, met).
Without a CUDA device it exits with status 2 and says so.

Targets (issues 5 and 17, H100/H200; ratios against peers in the same run):
  packed-weight GEMV, K = N = 8192, batch 1, n = 3..5: >= 70 % of HBM peak
      on bytes moved (packed weights + x + y); n = 3 also >= 70 % of the copy
      bandwidth measured in the same run (gemv_bw_pct_copy_n3)
  gemv_speedup_vs_cublas_fp16 (n = 3, i.e. 4 stored bits with sign): >= 2.5
  LUT GEMM, M = N = K = 4096, fp16: >= 0.7x cuBLAS fp16 throughput
  exp_linear_count: >= 5e11 counter updates per second
  exp_quantize (64M elements): >= 80 % of HBM peak

Timing: CUDA events around a loop of back-to-back calls after warm-up, the
median of --repeat samples (each sample lasts at least --min-time seconds).
The weights (and other large read-only operands) are rotated over enough
copies that the working set is at least 3x the L2 cache, so reads come from
HBM, not L2 (H100: 50 MB of L2; a 4-bit 8192 x 8192 weight is 32 MB). These
"eager" times include the host-side cost of each call (argument checks,
table construction, allocations), which is what a caller sees; where an op
can be captured (no host synchronization) the same loop is also replayed as
a CUDA graph ("graph" figures, suffix ``_graph``), which removes the host
cost. Kernel time (suffix ``_kernel``) is the device time of the kernels,
memcpys and memsets the calls launch, from torch.profiler's CUDA activity
(summed, divided by the calls): no host cost and no gaps between kernels.
The copy bandwidth is measured the same three ways in the same run, and each
"% of copy" figure divides by the copy bandwidth of the same kind (eager by
eager, kernel by kernel). Targets are judged on the eager figure; the graph
and kernel figures are shown beside it (value_graph, value_kernel).

--merge combines the JSONs of several runs (e.g. the two halves that
scripts/gpu_check.sh runs, so that a timeout loses only one): figures,
checks, rows, peers, errors and shapes are merged (a later file wins on a
duplicate key, except that the first measured copy bandwidth is kept), and
the targets are evaluated again on the merged figures.

Peak bandwidth: --peak-bw if given, else 2 * memory_clock_rate (kHz) * 1e3 *
memory_bus_width / 8 from torch.cuda.get_device_properties (double data rate
HBM), else a table of spec-sheet values by device name (PEAK_BW_TABLE). The
JSON records which source was used and both candidate values.

Counter updates (same definition as benchmarks/bench_cpu_ops.py): per pair
of nonzero codes one C1 and one C3 update, plus C2 updates: one per pair when
counting directly, or, with the precomputed weight terms, one per zero
activation and weight row instead. The op decides per activation row whether
to use the terms (no negative code and fewer zeros than nonzeros); the count
follows that rule row by row. The activations here are ReLU-like with about
40 % zeros, so every row takes the terms path when they are given.

Optional peers are imported lazily; if absent (or failing) the JSON says
"unavailable: <reason>". To have them on a GPU machine without network,
carry their wheels (``pip download bitsandbytes torchao`` elsewhere, then
``pip install --no-index --find-links wheels/ bitsandbytes torchao``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# Spec-sheet HBM bandwidths (bytes/s), matched in order against the lower-case
# device name (the first match wins, so specific names come first).
PEAK_BW_TABLE = [
    (r"\bh200\b", 4.8e12),                 # H200 SXM, 141 GB HBM3e
    (r"\bh100\b.*\bnvl\b", 3.9e12),        # H100 NVL, 94 GB HBM3
    (r"\bh100\b.*\bpcie\b", 2.0e12),       # H100 PCIe, 80 GB HBM2e
    (r"\bh100\b", 3.35e12),                # H100 SXM5, 80 GB HBM3 ("H100 80GB HBM3")
    (r"\ba100\b.*\b80gb\b", 2.0e12),       # A100 80 GB (SXM 2.04, PCIe 1.94 TB/s)
    (r"\ba100\b", 1.555e12),               # A100 40 GB
    (r"\bl40s\b", 0.864e12),
    (r"\ba10g\b", 0.6e12),
    (r"\bl4\b", 0.3e12),
]

# (name, figure key, threshold, what): every figure is "higher is better".
TARGETS = [
    ("gemv_bw_pct_peak_n3", "gemv_bw_pct_peak_n3", 70.0,
     "packed GEMV K=N=8192 batch 1 n=3: % of HBM peak on bytes moved"),
    ("gemv_bw_pct_peak_n4", "gemv_bw_pct_peak_n4", 70.0,
     "packed GEMV K=N=8192 batch 1 n=4: % of HBM peak on bytes moved"),
    ("gemv_bw_pct_peak_n5", "gemv_bw_pct_peak_n5", 70.0,
     "packed GEMV K=N=8192 batch 1 n=5: % of HBM peak on bytes moved"),
    ("gemv_bw_pct_copy_n3", "gemv_bw_pct_copy_n3", 70.0,
     "packed GEMV K=N=8192 batch 1 n=3: % of the copy bandwidth measured in the same run"),
    ("gemv_speedup_vs_cublas_fp16", "gemv_speedup_vs_cublas_fp16", 2.5,
     "packed GEMV n=3 (4 stored bits) vs cuBLAS fp16 GEMV, batch 1: speedup"),
    ("lut_gemm_vs_cublas_fp16", "lut_gemm_vs_cublas_fp16", 0.7,
     "LUT GEMM M=N=K=4096 fp16: throughput relative to cuBLAS fp16"),
    ("count_linear_updates_per_s", "count_linear_updates_per_s", 5e11,
     "exp_linear_count n=4, direct: counter updates per second"),
    ("count_linear_wterms_updates_per_s", "count_linear_wterms_updates_per_s", 5e11,
     "exp_linear_count n=4, precomputed weight terms: counter updates per second"),
    ("exp_quantize_fp32_pct_peak", "exp_quantize_fp32_pct_peak", 80.0,
     "exp_quantize 64M fp32 (check_finite=True): % of HBM peak"),
    ("exp_quantize_fp16_pct_peak", "exp_quantize_fp16_pct_peak", 80.0,
     "exp_quantize 64M fp16 (check_finite=True): % of HBM peak"),
]

SECTIONS = ("bandwidth", "quantize", "gemv", "gemm", "count", "peers")

# Shapes per mode. "full" are the targets' shapes; "tiny" is only for
# --cpu-dry-run (tests: every code path on the CPU, numbers meaningless).
SIZES = {
    "full": dict(bw_n=256 << 20, quant_n=1 << 26, gemv_kn=8192, gemm=4096,
                 count=(256, 4096, 4096), count_bits=(3, 4, 5, 7)),
    "quick": dict(bw_n=64 << 20, quant_n=1 << 24, gemv_kn=4096, gemm=2048,
                  count=(32, 2048, 2048), count_bits=(4,)),
    "tiny": dict(bw_n=1 << 16, quant_n=1 << 12, gemv_kn=256, gemm=64,
                 count=(4, 64, 32), count_bits=(4,)),
}


# ---------------------------------------------------------------------------
# Pure helpers (no GPU needed; tested in tests/test_bench_cuda.py).

def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    return s or "unknown-device"


def default_json_path(device_name: str, quick: bool = False) -> str:
    suffix = ".quick.json" if quick else ".json"
    return os.path.join(RESULTS, f"cuda_ops.{slugify(device_name)}{suffix}")


def peak_bw_from_table(device_name: str):
    """Spec-sheet bandwidth (bytes/s) for a device name, or None."""
    n = str(device_name).lower()
    for pattern, bw in PEAK_BW_TABLE:
        if re.search(pattern, n):
            return bw
    return None


def peak_bw_from_properties(memory_clock_khz, bus_width_bits):
    """Double-data-rate bandwidth 2 * clock * bus_width / 8 (bytes/s), or None
    when either value is missing or the result is implausible."""
    try:
        clock = float(memory_clock_khz)
        bus = float(bus_width_bits)
    except (TypeError, ValueError):
        return None
    if not (clock > 0 and bus > 0):
        return None
    bw = 2.0 * clock * 1e3 * bus / 8.0
    return bw if 1e10 <= bw <= 5e13 else None


def resolve_peak_bw(cli_value, device_name, memory_clock_khz=None, bus_width_bits=None):
    """(value, source, details): --peak-bw, else device properties, else table."""
    from_props = peak_bw_from_properties(memory_clock_khz, bus_width_bits)
    from_table = peak_bw_from_table(device_name)
    details = dict(properties=from_props, table=from_table,
                   memory_clock_khz=memory_clock_khz, memory_bus_width_bits=bus_width_bits)
    if cli_value is not None:
        if not cli_value > 0:
            raise ValueError(f"--peak-bw must be positive bytes/s, got {cli_value}")
        return float(cli_value), "--peak-bw", details
    if from_props is not None:
        return from_props, ("device properties: 2 * memory_clock_rate * memory_bus_width / 8"), details
    if from_table is not None:
        return from_table, f"spec table by device name ({device_name})", details
    return None, "unknown (pass --peak-bw)", details


def packed_row_bytes(K: int, bits: int, signed: bool = True) -> int:
    """Bytes of one packed row (SPEC section 1): 4 * ceil(K * b / 32)."""
    b = bits + 1 if signed else bits
    return 4 * ((K * b + 31) // 32)


def gemv_bytes(M: int, K: int, N: int, bits: int, signed: bool = True,
               x_elem: int = 2, out_elem: int = 2) -> int:
    """Bytes a packed-weight GEMV must move: the packed weights (N rows), the
    activations [M, K] and the output [M, N]. The format has per-tensor
    parameters only, so there is no per-row metadata."""
    return N * packed_row_bytes(K, bits, signed) + M * K * x_elem + M * N * out_elem


def dense_gemv_bytes(M: int, K: int, N: int, elem: int = 2) -> int:
    """Bytes of a dense GEMV/GEMM in one dtype: W [N, K] + x [M, K] + y [M, N]."""
    return (N * K + M * K + M * N) * elem


def quantize_bytes(numel: int, in_elem: int) -> int:
    """exp_quantize: read the input, write one int8 code per element."""
    return numel * in_elem + numel


def rotation_sets(set_bytes: int, l2_bytes, factor: int = 3, cap: int = 32) -> int:
    """Copies of an operand so that cycling through them touches at least
    factor x L2 bytes (so each call reads from HBM)."""
    if not l2_bytes or set_bytes <= 0:
        return 1
    return int(max(1, min(cap, math.ceil(factor * l2_bytes / set_bytes))))


def count_updates(a_codes: torch.Tensor, w_codes: torch.Tensor, use_terms: bool) -> dict:
    """Counter updates of exp_linear_count on these codes (see module doc).

    a_codes [M, K], w_codes [N, K] int8 codes. Returns pairs (nonzero x
    nonzero), updates, and how many activation rows take the terms path."""
    a = a_codes.reshape(-1, a_codes.shape[-1])
    w = w_codes.reshape(w_codes.shape[0], -1)
    M, K = a.shape
    N = w.shape[0]
    a_mag = a.to(torch.int16) & 0x7F
    a_nz = a_mag != 0
    a_neg = ((a.to(torch.int16) & 0x80) != 0) & a_nz
    w_nz = (w.to(torch.int16) & 0x7F) != 0
    col_w = w_nz.sum(0).to(torch.float64)                       # [K]
    pairs_row = (a_nz.to(torch.float64) @ col_w).round().to(torch.int64)  # exact: < 2^53
    zeros_row = (K - a_nz.sum(1)).to(torch.int64)
    if use_terms:
        terms_row = (~a_neg.any(1)) & (zeros_row < K - zeros_row)
    else:
        terms_row = torch.zeros(M, dtype=torch.bool, device=a.device)
    upd = torch.where(terms_row, 2 * pairs_row + zeros_row * N, 3 * pairs_row)
    return dict(pairs=int(pairs_row.sum()), updates=int(upd.sum()),
                rows_with_terms=int(terms_row.sum()), rows=M,
                zero_fraction=float(zeros_row.sum()) / max(1, M * K))


def evaluate_targets(figures: dict, note: str = "") -> list:
    """One entry per target: value (eager), value_graph, value_kernel,
    threshold, met (None where the figure was not measured)."""
    out = []
    for name, key, thr, what in TARGETS:
        v = figures.get(key)
        vg = figures.get(key + "_graph")
        vk = figures.get(key + "_kernel")
        e = dict(name=name, figure=key, what=what, threshold=thr, op=">=",
                 value=v, met=None if v is None else bool(v >= thr),
                 value_graph=vg, met_graph=None if vg is None else bool(vg >= thr),
                 value_kernel=vk, met_kernel=None if vk is None else bool(vk >= thr))
        if note:
            e["note"] = note
        out.append(e)
    return out


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _clean(obj):
    """JSON-safe copy: non-finite floats -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return _finite_or_none(obj)
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    return str(obj)


def cuda_unavailable_reason():
    """None if a CUDA device and dnateq's CUDA kernels are usable, else why not."""
    if not torch.cuda.is_available():
        return (f"no CUDA device: torch.cuda.is_available() is False (torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}); "
                f"run this benchmark on a machine with an NVIDIA GPU")
    return None


def kernel_seconds(events, calls: int, device_type: str = "cuda"):
    """Device seconds per call from profiler events: the summed durations of
    the events that ran on `device_type` (kernels, memcpys, memsets: leaves,
    so nothing is counted twice), divided by `calls`. None when there were
    none (e.g. a profiler without CUDA activity)."""
    total_us = 0.0
    found = False
    for e in events:
        dt = getattr(e, "device_type", None)
        name = str(getattr(dt, "name", dt)).lower()
        if name != device_type:
            continue
        if device_type == "cpu" and getattr(e, "cpu_parent", None) is not None:
            continue  # CPU events nest: count the top-level ones only
        tr = getattr(e, "time_range", None)
        us = tr.elapsed_us() if tr is not None else getattr(e, "device_time", 0.0)
        total_us += float(us)
        found = True
    if not found or calls <= 0:
        return None
    return total_us * 1e-6 / calls


def merge_results(docs: list) -> dict:
    """One results document from several runs' JSONs (see --merge)."""
    if not docs:
        raise ValueError("nothing to merge")
    out = dict(meta=dict(docs[0].get("meta", {})), figures={}, peers={}, checks={}, rows=[],
               errors={}, graph_errors=[])
    out["meta"]["merged_from"] = [d.get("meta", {}).get("argv") for d in docs]
    out["meta"]["sections"] = []
    out["meta"]["shapes"] = {}
    keep_first = ("copy_bw_Bps", "copy_bw_kernel_Bps", "copy_bw_graph_Bps", "read_bw_Bps",
                  "copy_bw_pct_peak", "read_bw_pct_peak", "peak_bw_Bps")
    for i, d in enumerate(docs):
        figs = d.get("figures", {})
        for k, v in figs.items():
            if k in keep_first and k in out["figures"]:
                out["figures"][f"{k}_run{i + 1}"] = v
                continue
            out["figures"][k] = v
        out["peers"].update(d.get("peers", {}))
        out["checks"].update(d.get("checks", {}))
        out["rows"] += d.get("rows", [])
        out["errors"].update({f"{k} (run {i + 1})" if k in out["errors"] else k: v
                              for k, v in d.get("errors", {}).items()})
        out["graph_errors"] += d.get("graph_errors", [])
        m = d.get("meta", {})
        out["meta"]["sections"] += [s for s in m.get("sections", [])
                                    if s not in out["meta"]["sections"]]
        out["meta"]["shapes"].update(m.get("shapes", {}))
        if out["meta"].get("measured_copy_bw_Bps") is None:
            out["meta"]["measured_copy_bw_Bps"] = m.get("measured_copy_bw_Bps")
    note = next((t.get("note") for d in docs for t in d.get("targets", []) if t.get("note")), "")
    out["targets"] = evaluate_targets(out["figures"], note or "")
    return out


# ---------------------------------------------------------------------------
# Timing (CUDA events).

class Ctx:
    def __init__(self, args, dev):
        self.args = args
        self.quick = args.quick
        self.dev = dev
        self.cuda = dev.type == "cuda"
        self.size = SIZES["tiny" if not self.cuda else ("quick" if args.quick else "full")]
        if self.cuda:
            self.props = torch.cuda.get_device_properties(dev)
            self.l2 = int(getattr(self.props, "L2_cache_size", 0) or 0) or 50 * (1 << 20)
        else:
            self.props = None
            self.l2 = 0  # no rotation
        self.repeat = args.repeat
        self.min_time = args.min_time
        self.graphs = not args.no_graph and self.cuda
        self.kernel_time = not args.no_kernel_time
        self.peak = None      # bytes/s
        self.copy_bw = None   # bytes/s, measured (eager)
        self.copy_bw_kernel = None  # bytes/s, measured (kernel time)
        self.copy_bw_graph = None   # bytes/s, measured (graph replay)
        self.rows = []
        self.figs = {}
        self.peers = {}
        self.checks = {}      # correctness checks: name -> bool or error
        self.shapes = {}
        self.graph_errors = []


def sync(ctx):
    if ctx.cuda:
        torch.cuda.synchronize(ctx.dev)


def free_cache(ctx):
    if ctx.cuda:
        torch.cuda.empty_cache()


def _loop_seconds(ctx, calls, n):
    k = len(calls)
    if not ctx.cuda:  # --cpu-dry-run
        t0 = time.perf_counter()
        for i in range(n):
            calls[i % k]()
        return time.perf_counter() - t0
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n):
        calls[i % k]()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def time_calls(ctx, calls, repeat=None, warmup=2):
    """Median seconds per call of a loop cycling through `calls`."""
    calls = list(calls) if isinstance(calls, (list, tuple)) else [calls]
    repeat = repeat or ctx.repeat
    for _ in range(warmup):
        for c in calls:
            c()
    sync(ctx)
    n = len(calls)
    while True:
        t = _loop_seconds(ctx, calls, n)
        if t >= ctx.min_time or n >= 1 << 14:
            break
        n *= 2
    return statistics.median(_loop_seconds(ctx, calls, n) / n for _ in range(repeat))


def time_graph(ctx, calls, repeat=None):
    """Median seconds per call replaying a CUDA graph of the same loop; None
    (and the reason in ctx.graph_errors) when the calls cannot be captured."""
    if not ctx.graphs:
        return None
    calls = list(calls) if isinstance(calls, (list, tuple)) else [calls]
    k = len(calls) * max(1, math.ceil(16 / len(calls)))
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(k):
                calls[i % len(calls)]()
        t = time_calls(ctx, [g.replay], repeat=repeat, warmup=1) / k
        del g
        return t
    except Exception as e:  # noqa: BLE001 - recorded, never fatal
        ctx.graph_errors.append(f"{type(e).__name__}: {str(e)[:300]}")
        sync(ctx)
        return None


def time_kernels(ctx, calls, n=None):
    """Device seconds per call of the kernels the calls launch (see the module
    doc); None when off or when the profiler fails (reason recorded). In the
    CPU dry run the same code runs with the profiler's CPU activity (the
    top-level operators' time), only to check the plumbing."""
    if not ctx.kernel_time:
        return None
    calls = list(calls) if isinstance(calls, (list, tuple)) else [calls]
    n = n or max(len(calls), 8)
    try:
        from torch.profiler import ProfilerActivity, profile
        for c in calls:
            c()
        sync(ctx)
        act = ProfilerActivity.CUDA if ctx.cuda else ProfilerActivity.CPU
        with profile(activities=[act]) as prof:
            for i in range(n):
                calls[i % len(calls)]()
            sync(ctx)
        t = kernel_seconds(prof.events(), n, "cuda" if ctx.cuda else "cpu")
        if t is None:
            ctx.graph_errors.append("kernel time: the profiler recorded no device activity")
        return t
    except Exception as e:  # noqa: BLE001 - recorded, never fatal
        ctx.graph_errors.append(f"kernel time: {type(e).__name__}: {str(e)[:300]}")
        sync(ctx)
        return None


def fit(x, bits, alpha=None, sample=1 << 20):
    """exp_fit on a CPU subsample of x (the fit itself runs on the CPU)."""
    import dnateq
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // sample)
    sub = flat[::step][:sample].float().cpu()
    a, s, b, _ = dnateq.exp_fit(sub, bits, alpha=alpha)
    return a, s, b


def rel_err(out, ref):
    ref = ref.double()
    d = (out.double() - ref).abs().max()
    return float(d / ref.abs().max().clamp_min(1e-30))


def tol(dt):
    """Max-normalized error allowed against the float64 reference (SPEC: rtol
    1e-4 in float32, about 1e-2 in half precision; TF32 matmuls if enabled)."""
    if dt == torch.float32:
        return 5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
    return 1e-2 if dt == torch.float16 else 2e-2


def lut_reference(x, wp, N, K, a, sa, ba, sw, bw, bits):
    """Float64 x_hat @ w_hat^T through the public quantize/unpack/dequantize ops."""
    import dnateq
    xq = dnateq.exp_dequantize(dnateq.exp_quantize(x, a, sa, ba, bits, "nearest", False),
                               a, sa, ba, bits, torch.float32)
    wq = dnateq.exp_dequantize(dnateq.exp_unpack(wp, bits, True, [N, K]), a, sw, bw, bits,
                               torch.float32)
    return xq.double() @ wq.double().T


def add_row(ctx, **r):
    base = dict(op="", shape="", bits=None, dtype="", ms=None, ms_graph=None, ms_kernel=None,
                bytes=None,
                gbps=None, pct_peak=None, pct_copy=None, rate=None, rate_unit="",
                peer="-", peer_ms=None, speedup=None, target="-", ok=None, note="")
    base.update(r)
    ctx.rows.append(base)
    return base


def bw_figures(ctx, nbytes, t, kind="eager"):
    """(bytes/s, % of peak, % of the copy bandwidth of the same kind)."""
    if t is None:
        return None, None, None
    bw = nbytes / t
    pp = 100 * bw / ctx.peak if ctx.peak else None
    copy = dict(eager=ctx.copy_bw, kernel=ctx.copy_bw_kernel, graph=ctx.copy_bw_graph)[kind]
    pc = 100 * bw / copy if copy else None
    return bw, pp, pc


def ms(t):
    return None if t is None else t * 1e3


# ---------------------------------------------------------------------------
# Sections.

def bench_bandwidth(ctx):
    n = ctx.size["bw_n"]  # float32 elements: 1 GiB (quick: 256 MiB)
    src = torch.empty(n, device=ctx.dev).uniform_()
    dst = torch.empty_like(src)
    t_copy = time_calls(ctx, lambda: dst.copy_(src))
    t_read = time_calls(ctx, lambda: src.sum())
    t_copy_k = time_kernels(ctx, lambda: dst.copy_(src))
    t_copy_g = time_graph(ctx, lambda: dst.copy_(src))
    ctx.copy_bw = 2 * n * 4 / t_copy
    ctx.copy_bw_kernel = None if t_copy_k is None else 2 * n * 4 / t_copy_k
    ctx.copy_bw_graph = None if t_copy_g is None else 2 * n * 4 / t_copy_g
    ctx.figs.update(copy_bw_kernel_Bps=ctx.copy_bw_kernel, copy_bw_graph_Bps=ctx.copy_bw_graph)
    read_bw = n * 4 / t_read
    ctx.figs.update(copy_bw_Bps=ctx.copy_bw, read_bw_Bps=read_bw, peak_bw_Bps=ctx.peak,
                    copy_bw_pct_peak=100 * ctx.copy_bw / ctx.peak if ctx.peak else None,
                    read_bw_pct_peak=100 * read_bw / ctx.peak if ctx.peak else None)
    for op, t, nbytes in (("copy_ (read+write)", t_copy, 2 * n * 4), ("sum (read)", t_read, n * 4)):
        bw, pp, pc = bw_figures(ctx, nbytes, t)
        add_row(ctx, op=op, shape=f"{n} fp32", dtype="float32", ms=t * 1e3, bytes=nbytes,
                ms_kernel=ms(t_copy_k) if op.startswith("copy") else None,
                ms_graph=ms(t_copy_g) if op.startswith("copy") else None,
                gbps=bw / 1e9, pct_peak=pp, pct_copy=pc, note="reference bandwidth")


def _quantize_peer(x, scale):
    """torch.quantize_per_tensor where CUDA supports it for x's dtype, else an
    elementwise round/clamp/cast (several kernels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.quantize_per_tensor(x[:1024], scale, 0, torch.qint8)
        if x.is_cuda:
            torch.cuda.synchronize()
        return "torch.quantize_per_tensor", lambda: torch.quantize_per_tensor(x, scale, 0, torch.qint8)
    except Exception:  # noqa: BLE001
        inv = 1.0 / scale
        return ("round(x/s).clamp.to(int8)",
                lambda: torch.round(x * inv).clamp_(-128, 127).to(torch.int8))


def bench_quantize(ctx):
    import dnateq
    n = ctx.size["quant_n"]
    for dt, tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        x = torch.randn(n, device=ctx.dev, dtype=dt)
        elem = x.element_size()
        R = rotation_sets(n * elem, ctx.l2)
        xs = [x] + [x.clone() for _ in range(R - 1)]
        scale = float(x.abs().max()) / 127
        peer_name, peer = _quantize_peer(x, scale)
        t_peer = time_calls(ctx, peer)
        nbytes = quantize_bytes(n, elem)
        for bits in ((4,) if tag == "fp16" else (4, 7)):
            a, s, b = fit(x, bits)
            ref = dnateq.exp_quantize(x[: 1 << 16].cpu(), a, s, b, bits)
            got = dnateq.exp_quantize(x[: 1 << 16], a, s, b, bits).cpu()
            ctx.checks[f"exp_quantize_{tag}_n{bits}_matches_cpu"] = bool(torch.equal(ref, got))
            for check in (True, False):
                calls = [lambda xi=xi, c=check: dnateq.exp_quantize(xi, a, s, b, bits, "nearest", c)
                         for xi in xs]
                t = time_calls(ctx, calls)
                tg = None if check else time_graph(ctx, calls)
                bw, pp, pc = bw_figures(ctx, nbytes, t)
                _, ppg, _ = bw_figures(ctx, nbytes, tg)
                key = f"exp_quantize_{tag}" + ("" if bits == 4 else f"_n{bits}") + \
                      ("" if check else "_nocheck")
                ctx.figs.update({f"{key}_ms": t * 1e3, f"{key}_gbps": bw / 1e9,
                                 f"{key}_pct_peak": pp, f"{key}_pct_copy": pc,
                                 f"{key}_vs_peer": t_peer / t})
                if tg is not None:
                    ctx.figs.update({f"{key}_ms_graph": tg * 1e3, f"{key}_pct_peak_graph": ppg})
                target = bits == 4 and check
                add_row(ctx, op="exp_quantize" + ("" if check else " (check_finite=False)"),
                        shape=f"{n}", bits=bits, dtype=tag, ms=t * 1e3,
                        ms_graph=None if tg is None else tg * 1e3, bytes=nbytes,
                        gbps=bw / 1e9, pct_peak=pp, pct_copy=pc, peer=peer_name,
                        peer_ms=t_peer * 1e3, speedup=t_peer / t,
                        target=">= 80 % peak" if target else "-",
                        ok=(pp >= 80.0) if (target and pp is not None) else None)
        ctx.figs[f"quantize_peer_{tag}_ms"] = t_peer * 1e3
        ctx.figs[f"quantize_peer_{tag}"] = peer_name
        del x, xs


def _dense_peer(ctx, M, K, N, dt, cache, w_float):
    """cuBLAS through F.linear in dtype dt: (eager s, graph s, kernel s), cached
    per (M, dt)."""
    key = (M, dt)
    if key not in cache:
        w = w_float.to(dt)
        R = rotation_sets(w.numel() * w.element_size(), ctx.l2)
        ws = [w] + [w.clone() for _ in range(R - 1)]
        x = torch.randn(M, K, device=ctx.dev, dtype=dt)
        calls = [lambda wi=wi: F.linear(x, wi) for wi in ws]
        cache[key] = (time_calls(ctx, calls), time_graph(ctx, calls), time_kernels(ctx, calls))
        del ws, w
    return cache[key]


def bench_gemv(ctx):
    import dnateq
    K = N = ctx.size["gemv_kn"]
    dt = torch.float16
    w = torch.randn(N, K, device=ctx.dev) / math.sqrt(K)
    x_all = torch.randn(16, K, device=ctx.dev)
    peer_cache = {}
    for bits in (3, 4, 5):
        a, sa, ba = fit(x_all, bits)
        _, sw, bw = fit(w, bits, alpha=a)
        wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, bits), bits, True)
        assert wp.numel() == N * packed_row_bytes(K, bits, True)
        R = rotation_sets(wp.numel(), ctx.l2)
        wps = [wp] + [wp.clone() for _ in range(R - 1)]
        for M in ((1, 2, 4, 8, 16) if bits == 3 else (1,)):
            x = x_all[:M].to(dt).contiguous()

            def op(p, x=x):
                return dnateq.exp_linear_lut(x, p, [N, K], a, sa, ba, sw, bw, bits,
                                             True, True, "nearest", None)
            err = rel_err(op(wp), lut_reference(x, wp, N, K, a, sa, ba, sw, bw, bits))
            ctx.checks[f"gemv_n{bits}_m{M}_rel_err"] = err
            ctx.checks[f"gemv_n{bits}_m{M}_ok"] = err <= tol(dt)
            calls = [lambda p=p: op(p) for p in wps]
            t = time_calls(ctx, calls)
            tg = time_graph(ctx, calls)
            tk = time_kernels(ctx, calls)
            t_cb, tg_cb, tk_cb = _dense_peer(ctx, M, K, N, dt, peer_cache, w)
            nbytes = gemv_bytes(M, K, N, bits, True, 2, 2)
            bwv, pp, pc = bw_figures(ctx, nbytes, t)
            _, ppg, pcg = bw_figures(ctx, nbytes, tg)
            sfx = f"_n{bits}" if M == 1 else f"_n{bits}_m{M}"
            ctx.figs.update({f"gemv_ms{sfx}": t * 1e3, f"gemv_gbps{sfx}": bwv / 1e9,
                             f"gemv_bw_pct_peak{sfx}": pp, f"gemv_bw_pct_copy{sfx}": pc,
                             f"gemv_speedup_vs_cublas_fp16{sfx}": t_cb / t})
            if tg is not None:
                ctx.figs.update({f"gemv_ms{sfx}_graph": tg * 1e3,
                                 f"gemv_bw_pct_peak{sfx}_graph": ppg,
                                 f"gemv_bw_pct_copy{sfx}_graph": pcg})
                if tg_cb is not None:
                    ctx.figs[f"gemv_speedup_vs_cublas_fp16{sfx}_graph"] = tg_cb / tg
            if tk is not None:
                _, ppk, pck = bw_figures(ctx, nbytes, tk, "kernel")
                ctx.figs.update({f"gemv_ms{sfx}_kernel": tk * 1e3,
                                 f"gemv_bw_pct_peak{sfx}_kernel": ppk,
                                 f"gemv_bw_pct_copy{sfx}_kernel": pck})
                if tk_cb is not None:
                    ctx.figs[f"gemv_speedup_vs_cublas_fp16{sfx}_kernel"] = tk_cb / tk
            if tg is not None:
                ctx.figs[f"gemv_bw_pct_copy{sfx}_graph"] = bw_figures(ctx, nbytes, tg, "graph")[2]
            if M == 1 and bits == 3:
                ctx.figs["gemv_speedup_vs_cublas_fp16"] = t_cb / t
                if tg is not None and tg_cb is not None:
                    ctx.figs["gemv_speedup_vs_cublas_fp16_graph"] = tg_cb / tg
                if tk is not None and tk_cb is not None:
                    ctx.figs["gemv_speedup_vs_cublas_fp16_kernel"] = tk_cb / tk
            if M == 1:
                tgt, ok = ">= 70 % peak", (pp >= 70.0 if pp is not None else None)
                if bits == 3:
                    tgt += ", >= 2.5x cuBLAS"
                    ok = None if ok is None else (ok and t_cb / t >= 2.5)
            else:
                tgt, ok = "-", None
            add_row(ctx, op="exp_linear_lut GEMV" + (" (GEMM path, M > 8)" if M > 8 else ""),
                    shape=f"M={M} K={K} N={N}", bits=bits, dtype="fp16", ms=t * 1e3,
                    ms_graph=ms(tg), ms_kernel=ms(tk), bytes=nbytes, gbps=bwv / 1e9,
                    pct_peak=pp, pct_copy=pc, peer="cuBLAS fp16", peer_ms=t_cb * 1e3,
                    speedup=t_cb / t, target=tgt, ok=ok,
                    note="" if err <= tol(dt) else f"WRONG: rel err {err:.2e}")
        if bits == 3:
            # The unfused alternative through the public ops: dequantize the
            # packed weights (and fake-quantize x) to fp16, then cuBLAS.
            x = x_all[:1].to(dt).contiguous()

            def split(p, x=x):
                xq = dnateq.exp_dequantize(dnateq.exp_quantize(x, a, sa, ba, bits, "nearest", False),
                                           a, sa, ba, bits, dt)
                wq = dnateq.exp_dequantize(dnateq.exp_unpack(p, bits, True, [N, K]), a, sw, bw,
                                           bits, dt)
                return F.linear(xq, wq)
            ts = time_calls(ctx, [lambda p=p: split(p) for p in wps])
            t1 = ctx.figs["gemv_ms_n3"] / 1e3
            ctx.figs.update(gemv_split_public_ms_n3=ts * 1e3, gemv_fused_vs_split_speedup_n3=ts / t1)
            add_row(ctx, op="GEMV split: unpack+dequantize+cuBLAS", shape=f"M=1 K={K} N={N}",
                    bits=bits, dtype="fp16", ms=ts * 1e3, peer="fused exp_linear_lut",
                    peer_ms=t1 * 1e3, speedup=t1 / ts,
                    note="public ops, 2 host syncs; speedup < 1 = fused is faster")
        del wps, wp
        free_cache(ctx)
    for (M, _), (t_cb, tg_cb, tk_cb) in sorted(peer_cache.items(), key=lambda kv: kv[0][0]):
        nbytes = dense_gemv_bytes(M, K, N, 2)
        bwv, pp, pc = bw_figures(ctx, nbytes, t_cb)
        sfx = "" if M == 1 else f"_m{M}"
        ctx.figs.update({f"cublas_fp16_gemv_ms{sfx}": t_cb * 1e3,
                         f"cublas_fp16_gemv_bw_pct_peak{sfx}": pp})
        if tg_cb is not None:
            ctx.figs[f"cublas_fp16_gemv_ms{sfx}_graph"] = tg_cb * 1e3
        if tk_cb is not None:
            ctx.figs[f"cublas_fp16_gemv_ms{sfx}_kernel"] = tk_cb * 1e3
            ctx.figs[f"cublas_fp16_gemv_bw_pct_copy{sfx}_kernel"] = bw_figures(
                ctx, nbytes, tk_cb, "kernel")[2]
        add_row(ctx, op="cuBLAS fp16 GEMV (F.linear)", shape=f"M={M} K={K} N={N}", dtype="fp16",
                ms=t_cb * 1e3, ms_graph=ms(tg_cb), ms_kernel=ms(tk_cb), bytes=nbytes,
                gbps=bwv / 1e9, pct_peak=pp, pct_copy=pc, note="peer")
    ctx.shapes["gemv"] = dict(K=K, N=N, dtype="float16", batches=[1, 2, 4, 8, 16])


def bench_gemm(ctx, bits=4):
    import dnateq
    M = N = K = ctx.size["gemm"]
    flops = 2.0 * M * N * K
    x32 = torch.randn(M, K, device=ctx.dev)
    w = torch.randn(N, K, device=ctx.dev) / math.sqrt(K)
    a, sa, ba = fit(x32, bits)
    _, sw, bw = fit(w, bits, alpha=a)
    wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, bits), bits, True)
    R = rotation_sets(wp.numel(), ctx.l2)
    wps = [wp] + [wp.clone() for _ in range(R - 1)]
    times = {}
    for dt, tag in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        x = x32.to(dt)

        def op(p, x=x):
            return dnateq.exp_linear_lut(x, p, [N, K], a, sa, ba, sw, bw, bits,
                                         True, True, "nearest", None)
        err = rel_err(op(wp), lut_reference(x, wp, N, K, a, sa, ba, sw, bw, bits))
        ctx.checks[f"lut_gemm_{tag}_rel_err"] = err
        ctx.checks[f"lut_gemm_{tag}_ok"] = err <= tol(dt)
        t = time_calls(ctx, [lambda p=p: op(p) for p in wps])
        tk = time_kernels(ctx, [lambda p=p: op(p) for p in wps[:2]], n=4)
        wd = w.to(dt)
        Rd = rotation_sets(wd.numel() * wd.element_size(), ctx.l2)
        wds = [wd] + [wd.clone() for _ in range(Rd - 1)]
        t_mm = time_calls(ctx, [lambda wi=wi: F.linear(x, wi) for wi in wds])
        tk_mm = time_kernels(ctx, [lambda wi=wi: F.linear(x, wi) for wi in wds[:2]], n=4)
        if tk is not None and tk_mm is not None:
            ctx.figs.update({f"lut_gemm_ms_{tag}_kernel": tk * 1e3,
                             f"cublas_{tag}_gemm_ms_kernel": tk_mm * 1e3,
                             f"lut_gemm_vs_cublas_{tag}_kernel": tk_mm / tk})
        times[tag] = (t, t_mm)
        ctx.figs.update({f"lut_gemm_ms_{tag}": t * 1e3, f"lut_gemm_tflops_{tag}": flops / t / 1e12,
                         f"cublas_{tag}_gemm_ms": t_mm * 1e3,
                         f"cublas_{tag}_gemm_tflops": flops / t_mm / 1e12,
                         f"lut_gemm_vs_cublas_{tag}": t_mm / t,
                         f"lut_gemm_dequant_overhead_ms_{tag}": (t - t_mm) * 1e3})
        tgt = tag == "fp16"
        add_row(ctx, op="exp_linear_lut GEMM", shape=f"M={M} N={N} K={K}", bits=bits, dtype=tag,
                ms=t * 1e3, ms_kernel=ms(tk), rate=flops / t / 1e12, rate_unit="TFLOP/s",
                peer=f"cuBLAS {tag}" + (" (no TF32)" if dt == torch.float32 else ""),
                peer_ms=t_mm * 1e3, speedup=t_mm / t, target=">= 0.7x cuBLAS" if tgt else "-",
                ok=(t_mm / t >= 0.7) if tgt else None,
                note="" if err <= tol(dt) else f"WRONG: rel err {err:.2e}")
        del wds, wd
    t16 = times["fp16"][0]
    t32mm = times["fp32"][1]
    ctx.figs["lut_gemm_vs_fp32_matmul"] = t32mm / t16
    ctx.figs["lut_gemm_fp32_vs_fp32_matmul"] = times["fp32"][1] / times["fp32"][0]
    ctx.figs["fp32_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    add_row(ctx, op="exp_linear_lut GEMM fp16 vs fp32 matmul", shape=f"M={M} N={N} K={K}",
            bits=bits, dtype="fp16", ms=t16 * 1e3, rate=flops / t16 / 1e12, rate_unit="TFLOP/s",
            peer="cuBLAS fp32", peer_ms=t32mm * 1e3, speedup=t32mm / t16)
    # Split through the public ops (the op itself runs: fake-quant x, decode
    # the packed weights, cuBLAS; this shows what the one-call op saves).
    x = x32.to(torch.float16)

    def split(p):
        xq = dnateq.exp_dequantize(dnateq.exp_quantize(x, a, sa, ba, bits, "nearest", False),
                                   a, sa, ba, bits, torch.float16)
        wq = dnateq.exp_dequantize(dnateq.exp_unpack(p, bits, True, [N, K]), a, sw, bw, bits,
                                   torch.float16)
        return F.linear(xq, wq)
    ts = time_calls(ctx, [lambda p=p: split(p) for p in wps])
    ctx.figs.update(lut_gemm_split_public_ms_fp16=ts * 1e3, lut_gemm_vs_split_public_fp16=ts / t16)
    add_row(ctx, op="GEMM split: quantize/unpack+dequantize+cuBLAS", shape=f"M={M} N={N} K={K}",
            bits=bits, dtype="fp16", ms=ts * 1e3, rate=flops / ts / 1e12, rate_unit="TFLOP/s",
            peer="exp_linear_lut", peer_ms=t16 * 1e3, speedup=t16 / ts,
            note="public ops, 2 host syncs")
    ctx.shapes["gemm"] = dict(M=M, N=N, K=K, bits=bits)
    del wps, wp, x32, w
    free_cache(ctx)


def bench_count(ctx):
    import dnateq
    M, K, N = ctx.size["count"]
    x = torch.relu(torch.randn(M, K, device=ctx.dev) + 0.25)  # ~40 % zeros
    w = torch.randn(N, K, device=ctx.dev)
    for bits in ctx.size["count_bits"]:
        a, sa, ba = fit(x, bits)
        _, sw, bw = fit(w, bits, alpha=a)
        ac = dnateq.exp_quantize(x, a, sa, ba, bits)
        wc = dnateq.exp_quantize(w, a, sw, bw, bits)
        terms = dnateq.weight_terms(wc, bits)
        outs = {}
        for use_terms in (False, True):
            info = count_updates(ac, wc, use_terms)

            def call(ut=use_terms):
                return dnateq.exp_linear_count(ac, wc, a, sa, ba, sw, bw, bits, None, None,
                                               terms if ut else None)
            outs[use_terms] = call()
            t = time_calls(ctx, call, repeat=min(ctx.repeat, 5), warmup=1)
            rate = info["updates"] / t
            name = "count_linear" + ("_wterms" if use_terms else "")
            ctx.figs.update({f"{name}_updates_per_s_n{bits}": rate,
                             f"{name}_pairs_per_s_n{bits}": info["pairs"] / t,
                             f"{name}_ms_n{bits}": t * 1e3})
            if bits == 4:
                ctx.figs[f"{name}_updates_per_s"] = rate
            add_row(ctx, op="exp_linear_count" + (" +w_terms" if use_terms else ""),
                    shape=f"M={M} K={K} N={N}", bits=bits, dtype="int8", ms=t * 1e3,
                    rate=rate, rate_unit="updates/s",
                    target=">= 5e11 updates/s" if bits == 4 else "-",
                    ok=(rate >= 5e11) if bits == 4 else None,
                    note=f"{info['updates']:.3g} updates, {info['rows_with_terms']}/{M} rows "
                         f"use terms, zeros {info['zero_fraction']:.0%}")
        ctx.checks[f"count_n{bits}_terms_equal_direct"] = bool(torch.equal(outs[False], outs[True]))
    ctx.shapes["count"] = dict(M=M, K=K, N=N)


def _bnb_peer(ctx, K, N, Mg):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bF
    res = dict(version=getattr(bnb, "__version__", "?"), quant_type="nf4", blocksize=64)
    w = (torch.randn(N, K, device=ctx.dev) / math.sqrt(K)).half()
    wq, st = bF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    qbytes = wq.numel() * wq.element_size() + st.absmax.numel() * st.absmax.element_size()
    R = rotation_sets(qbytes, ctx.l2)
    sets = [(wq, st)] + [bF.quantize_4bit(w, blocksize=64, quant_type="nf4") for _ in range(R - 1)]
    x = torch.randn(1, K, device=ctx.dev, dtype=torch.float16)
    y = bnb.matmul_4bit(x, wq.t(), quant_state=st)
    res["gemv_rel_err_vs_fp16"] = rel_err(y, F.linear(x, w))
    t = time_calls(ctx, [lambda q=q, s=s: bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in sets])
    nbytes = qbytes + 2 * K + 2 * N
    res.update(gemv_ms=t * 1e3, gemv_bytes=nbytes, gemv_bw_pct_peak=bw_figures(ctx, nbytes, t)[1])
    del sets, wq, st, w
    wg = (torch.randn(Mg, Mg, device=ctx.dev) / math.sqrt(Mg)).half()
    wqg, stg = bF.quantize_4bit(wg, blocksize=64, quant_type="nf4")
    xg = torch.randn(Mg, Mg, device=ctx.dev, dtype=torch.float16)
    tg = time_calls(ctx, lambda: bnb.matmul_4bit(xg, wqg.t(), quant_state=stg))
    res.update(gemm_ms=tg * 1e3, gemm_tflops=2.0 * Mg ** 3 / tg / 1e12)
    return res


def _torchao_linear(K, N, dev, dtype=torch.bfloat16):
    """nn.Linear quantized by torchao int4 weight-only; tries the newer and
    the older config names. Returns (module, config description)."""
    from torchao.quantization import quantize_
    cands = []
    try:
        from torchao.quantization import Int4WeightOnlyConfig
        cands += [("Int4WeightOnlyConfig(group_size=128)",
                   lambda: Int4WeightOnlyConfig(group_size=128)),
                  ("Int4WeightOnlyConfig(group_size=128, int4_packing_format='tile_packed_to_4d')",
                   lambda: Int4WeightOnlyConfig(group_size=128,
                                                int4_packing_format="tile_packed_to_4d")),
                  ("Int4WeightOnlyConfig(group_size=128, version=1)",
                   lambda: Int4WeightOnlyConfig(group_size=128, version=1))]
    except ImportError:
        pass
    try:
        from torchao.quantization import int4_weight_only
        cands.append(("int4_weight_only(group_size=128)", lambda: int4_weight_only(group_size=128)))
    except ImportError:
        pass
    if not cands:
        raise ImportError("torchao has neither Int4WeightOnlyConfig nor int4_weight_only")
    base = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    x = torch.randn(1, K, device=dev, dtype=dtype)
    errors = []
    for name, make in cands:
        try:
            m = copy.deepcopy(base)
            quantize_(m, make())
            with torch.no_grad():
                y = m(x)
                err = rel_err(y, base(x))
            if x.is_cuda:
                torch.cuda.synchronize()
            return m, name, err
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
    raise RuntimeError("; ".join(errors))


def _torchao_peer(ctx, K, N, Mg):
    import torchao
    res = dict(version=getattr(torchao, "__version__", "?"), dtype="bfloat16")
    m, cfg, err = _torchao_linear(K, N, ctx.dev)
    res.update(config=cfg, gemv_rel_err_vs_bf16=err)
    wbytes = sum(t.numel() * t.element_size() for t in _tensors_of(m.weight))
    R = rotation_sets(wbytes or N * K // 2, ctx.l2)
    mods = [m] + [_torchao_linear(K, N, ctx.dev)[0] for _ in range(R - 1)]
    x = torch.randn(1, K, device=ctx.dev, dtype=torch.bfloat16)
    with torch.no_grad():
        t = time_calls(ctx, [lambda mi=mi: mi(x) for mi in mods])
        res.update(gemv_ms=t * 1e3, weight_bytes=wbytes or None)
        if wbytes:
            nbytes = wbytes + 2 * K + 2 * N
            res.update(gemv_bytes=nbytes, gemv_bw_pct_peak=bw_figures(ctx, nbytes, t)[1])
        del mods, m
        mg = _torchao_linear(Mg, Mg, ctx.dev)[0]
        xg = torch.randn(Mg, Mg, device=ctx.dev, dtype=torch.bfloat16)
        tg = time_calls(ctx, lambda: mg(xg))
    res.update(gemm_ms=tg * 1e3, gemm_tflops=2.0 * Mg ** 3 / tg / 1e12)
    return res


def _tensors_of(t):
    """Plain tensors inside a (possibly subclassed) quantized weight."""
    try:
        names, _ = t.__tensor_flatten__()
        out = []
        for n in names:
            out += _tensors_of(getattr(t, n))
        return out
    except Exception:  # noqa: BLE001
        return [t] if isinstance(t, torch.Tensor) else []


def bench_peers(ctx):
    K = N = ctx.size["gemv_kn"]
    Mg = ctx.size["gemm"]
    gemv_ms = ctx.figs.get("gemv_ms_n3")
    gemm_ms = ctx.figs.get("lut_gemm_ms_fp16")
    for name, fn in (("bitsandbytes_nf4", _bnb_peer), ("torchao_int4_weight_only", _torchao_peer)):
        try:
            res = fn(ctx, K, N, Mg)
            res["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - absence is a result, not an error
            res = dict(status=f"unavailable: {type(e).__name__}: {str(e)[:500]}")
            sync(ctx)
        ctx.peers[name] = res
        short = "bnb_nf4" if name.startswith("bitsandbytes") else "torchao_int4"
        if res["status"] != "ok":
            add_row(ctx, op=f"{name}", shape="-", note=res["status"][:60])
            continue
        ctx.figs[f"{short}_gemv_ms"] = res["gemv_ms"]
        ctx.figs[f"{short}_gemm_ms"] = res["gemm_ms"]
        if gemv_ms:
            ctx.figs[f"gemv_speedup_vs_{short}"] = res["gemv_ms"] / gemv_ms
        if gemm_ms:
            ctx.figs[f"lut_gemm_vs_{short}"] = res["gemm_ms"] / gemm_ms
        add_row(ctx, op=f"{name} GEMV", shape=f"M=1 K={K} N={N}", bits=4,
                dtype="fp16" if short == "bnb_nf4" else "bf16", ms=res["gemv_ms"],
                pct_peak=res.get("gemv_bw_pct_peak"), peer="dnateq n=3 GEMV",
                peer_ms=gemv_ms, speedup=(gemv_ms / res["gemv_ms"]) if gemv_ms else None,
                note="speedup < 1 = dnateq faster")
        add_row(ctx, op=f"{name} GEMM", shape=f"M=N=K={Mg}", bits=4,
                dtype="fp16" if short == "bnb_nf4" else "bf16", ms=res["gemm_ms"],
                rate=res["gemm_tflops"], rate_unit="TFLOP/s", peer="dnateq LUT GEMM fp16",
                peer_ms=gemm_ms, speedup=(gemm_ms / res["gemm_ms"]) if gemm_ms else None,
                note="speedup < 1 = dnateq faster")
        free_cache(ctx)


# ---------------------------------------------------------------------------

def driver_version():
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0].strip()
    except Exception:  # noqa: BLE001
        pass
    return None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows, targets):
    header = (f"{'op':44} {'shape':22} {'n':>2} {'dtype':5} {'ms':>9} {'graph ms':>9} "
              f"{'kern ms':>9} "
              f"{'GB/s':>7} {'%peak':>6} {'%copy':>6} {'rate':>9} {'peer':>26} {'peer ms':>9} "
              f"{'x peer':>6}  target")
    print(header)
    print("-" * len(header))
    for r in rows:
        ok = {True: "ok", False: "MISS", None: ""}[r["ok"]]
        print(f"{r['op'][:44]:44} {r['shape'][:22]:22} {fmt(r['bits'], '>2')} {r['dtype']:5} "
              f"{fmt(r['ms'], '9.4f')} {fmt(r['ms_graph'], '9.4f')} "
              f"{fmt(r.get('ms_kernel'), '9.4f')} {fmt(r['gbps'], '7.0f')} "
              f"{fmt(r['pct_peak'], '6.1f')} {fmt(r['pct_copy'], '6.1f')} "
              f"{fmt(r['rate'], '9.3g')} {str(r['peer'])[:26]:>26} {fmt(r['peer_ms'], '9.4f')} "
              f"{fmt(r['speedup'], '6.2f')}  {r['target']} {ok} {r['note']}")
    print()
    print(f"{'target':36} {'threshold':>10} {'value':>10} {'graph':>10} {'kernel':>10}  met")
    for t in targets:
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"{t['name']:36} {t['threshold']:>10.3g} {fmt(t['value'], '10.3g')} "
              f"{fmt(t['value_graph'], '10.3g')} {fmt(t.get('value_kernel'), '10.3g')}  {met}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--json", default=None,
                    help="output path (default benchmarks/results/cuda_ops.<device>.json)")
    ap.add_argument("--peak-bw", type=float, default=None,
                    help="HBM peak in bytes/s (e.g. 3.35e12); default from the device")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--repeat", type=int, default=7, help="timed samples per figure (median)")
    ap.add_argument("--min-time", type=float, default=0.02,
                    help="seconds each timed sample lasts at least")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--no-kernel-time", action="store_true",
                    help="skip the profiler kernel-time figures")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge these results files into one (--json, default: the first "
                         "file's device path) and evaluate the targets again; runs nothing")
    ap.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run every section on the CPU with tiny shapes to check the script "
                         "itself (for tests; the numbers mean nothing)")
    args = ap.parse_args(argv)
    secs = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in secs if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    args.sections = secs
    if args.quick:
        args.repeat = min(args.repeat, 3)
        args.min_time = min(args.min_time, 0.005)
    if args.cpu_dry_run:
        args.repeat, args.min_time = 1, 0.0
    return args


def device_meta(ctx):
    """Device part of the JSON meta."""
    if not ctx.cuda:
        return dict(device="cpu (--cpu-dry-run: code paths only, numbers meaningless)",
                    device_slug="cpu-dry-run", compute_capability=None, sm_count=None,
                    total_memory_bytes=None, l2_cache_bytes=None, driver=None)
    p = ctx.props
    return dict(device=p.name, device_slug=slugify(p.name),
                compute_capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                total_memory_bytes=p.total_memory, l2_cache_bytes=ctx.l2,
                driver=driver_version(),
                cuda_driver_api=getattr(torch._C, "_cuda_getDriverVersion", lambda: None)())


def main_merge(args):
    docs = []
    for p in args.merge:
        with open(p) as f:
            docs.append(json.load(f))
    out = merge_results(docs)
    path = args.json or default_json_path(out["meta"].get("device", "unknown"),
                                          bool(out["meta"].get("quick")))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(out), f, indent=1)
    print_table(out["rows"], out["targets"])
    print(f"\nwrote {path} (merged {len(docs)} files)")
    bad_checks = [k for k, v in out["checks"].items() if v is False]
    return 1 if (out["errors"] or bad_checks) else 0


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return main_merge(args)
    if args.cpu_dry_run:
        dev = torch.device("cpu")
    else:
        reason = cuda_unavailable_reason()
        if reason is not None:
            print(reason, file=sys.stderr)
            return 2
        dev = torch.device("cuda", torch.cuda.current_device())
    import dnateq
    if dev.type == "cuda":
        try:
            dnateq.exp_quantize(torch.ones(4, device=dev), 2.0, 1.0, 0.0, 3)
            torch.cuda.synchronize()
        except (RuntimeError, NotImplementedError) as e:
            first = (str(e).splitlines() or [""])[0][:200]
            print(f"no CUDA kernels in dnateq: it was built without CUDA (DNATEQ_CUDA=0 or no "
                  f"nvcc); rebuild it on a CUDA machine ({type(e).__name__}: {first})",
                  file=sys.stderr)
            return 2
    torch.manual_seed(0)
    ctx = Ctx(args, dev)
    dmeta = device_meta(ctx)
    p = ctx.props
    ctx.peak, peak_src, peak_details = resolve_peak_bw(
        args.peak_bw, dmeta["device"], getattr(p, "memory_clock_rate", None),
        getattr(p, "memory_bus_width", None))
    errors = {}
    benches = dict(bandwidth=bench_bandwidth, quantize=bench_quantize, gemv=bench_gemv,
                   gemm=bench_gemm, count=bench_count, peers=bench_peers)
    order = [s for s in SECTIONS if s in args.sections]
    if "bandwidth" not in order:
        print("note: bandwidth section skipped, so no % of measured copy bandwidth",
              file=sys.stderr)
    for name in order:
        t0 = time.perf_counter()
        try:
            benches[name](ctx)
        except Exception:  # noqa: BLE001 - keep the other sections' figures
            errors[name] = traceback.format_exc()
            print(f"section {name} failed:\n{errors[name]}", file=sys.stderr)
            sync(ctx)
        free_cache(ctx)
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    note = ("CPU dry run: code paths only, the numbers mean nothing" if args.cpu_dry_run else
            "quick run: smaller shapes than the target's, indicative only" if args.quick else "")
    targets = evaluate_targets(ctx.figs, note)
    print_table(ctx.rows, targets)
    meta = dict(
        dmeta,
        torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if ctx.cuda else None,
        dnateq=dnateq.__version__, python=platform.python_version(),
        host=platform.node(), date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        quick=args.quick, cpu_dry_run=args.cpu_dry_run,
        argv=sys.argv[1:] if argv is None else list(argv),
        sections=order, shapes=ctx.shapes,
        peak_bw_Bps=ctx.peak, peak_bw_source=peak_src, peak_bw_candidates=peak_details,
        measured_copy_bw_Bps=ctx.copy_bw,
        measured_copy_bw_kernel_Bps=ctx.copy_bw_kernel,
        timing=(f"CUDA events around back-to-back calls after warm-up, median of "
                f"{args.repeat} samples of >= {args.min_time} s; large read-only operands "
                f"rotated over copies totalling >= 3x L2; '_graph' figures replay the same "
                f"loop as a CUDA graph (no host overhead); '_kernel' figures are the device "
                f"time of the launched kernels from torch.profiler (no host cost, no gaps)"),
        bytes_moved=dict(gemv="packed weight bytes + M*K*2 (x fp16) + M*N*2 (y fp16)",
                         exp_quantize="numel * input element size + numel (int8 codes)",
                         copy="2 * bytes (read + write)"),
        counter_updates="per pair of nonzero codes: C1 + C3, plus C2 per pair (direct) or per "
                        "zero activation x weight row (rows that use the weight terms)")
    out = dict(meta=meta, figures=ctx.figs, targets=targets, peers=ctx.peers, checks=ctx.checks,
               rows=ctx.rows, errors=errors, graph_errors=ctx.graph_errors)
    if args.json:
        path = args.json
    elif args.cpu_dry_run:
        path = os.path.join(tempfile.gettempdir(), "cuda_ops.cpu-dry-run.json")
    else:
        path = default_json_path(dmeta["device"], args.quick)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(out), f, indent=1)
    print(f"\nwrote {path}")
    bad_checks = [k for k, v in ctx.checks.items() if v is False]
    if bad_checks:
        print(f"WARNING: correctness checks failed: {bad_checks}", file=sys.stderr)
    if errors or bad_checks:
        return 1
    if args.strict and any(t["met"] is False for t in targets):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
