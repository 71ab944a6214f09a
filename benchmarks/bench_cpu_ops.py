"""CPU operator benchmarks: each dnateq op against a peer measured in the same
run (torch.quantize_per_tensor, native F.linear / F.conv2d), as ratios.

    python benchmarks/bench_cpu_ops.py [--quick] [--json PATH] [--threads N]

Prints a table and writes JSON (default benchmarks/results/cpu_ops.local.json).
Targets (issue 2, 2-core machine):
  exp_quantize <= 2x torch.quantize_per_tensor (same tensor)
  LUT linear / conv <= 1.3x native float32 for batch >= 64
  count path >= 1e9 counter updates per second
  exp_error on 1e6 elements <= 1 ms per candidate after the sort
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import dnateq


def _loops(fn, min_time):
    """Calls per sample so that one sample lasts at least min_time."""
    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_time or n >= 1 << 12:
            return n
        n *= 2


def _sample(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def timeit(fn, repeat=7, min_time=0.05):
    """Median seconds per call; each sample loops until it lasts min_time."""
    n = _loops(fn, min_time)
    return statistics.median(_sample(fn, n) for _ in range(repeat))


def timeit_vs(fn, peer, repeat=9, min_time=0.05):
    """(seconds of fn, seconds of peer, ratio) with the samples interleaved,
    fn then peer, so that a change in machine load hits both alike; the ratio
    is the median of the per-pair ratios."""
    n, m = _loops(fn, min_time), _loops(peer, min_time)
    pairs = [(_sample(fn, n), _sample(peer, m)) for _ in range(repeat)]
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[0] / p[1] for p in pairs))


def fitted(x, bits, alpha=None):
    a, s, b, _ = dnateq.exp_fit(x, bits, alpha=alpha)
    return a, s, b


def bench_quantize(rows, quick):
    x = torch.randn(1 << 20 if quick else 1 << 22)
    scale = float(x.abs().max()) / 127

    def peer():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.quantize_per_tensor(x, scale, 0, torch.qint8)

    for bits in range(2, 8):
        a, s, b = fitted(x[:65536], bits)
        t, t_peer, ratio = timeit_vs(lambda: dnateq.exp_quantize(x, a, s, b, bits), peer)
        rows.append(dict(op="exp_quantize", shape=f"{x.numel()}", bits=bits, ms=t * 1e3,
                         peer="quantize_per_tensor", peer_ms=t_peer * 1e3, ratio=ratio,
                         target="<= 2.0", ok=ratio <= 2.0))


def bench_linear(rows, quick, bits=4):
    shapes = [(1, 4096, 4096), (64, 1024, 1024), (256, 4096, 1024)]
    if quick:
        shapes = [(1, 1024, 1024), (64, 1024, 1024)]
    for M, K, N in shapes:
        x = torch.relu(torch.randn(M, K))
        w = torch.randn(N, K) / K ** 0.5
        a, sa, ba = fitted(x, bits)
        _, sw, bw = fitted(w, bits, alpha=a)
        wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, bits), bits, True)
        t, t_peer, ratio = timeit_vs(
            lambda: dnateq.exp_linear_lut(x, wp, [N, K], a, sa, ba, sw, bw, bits, False, True,
                                          "nearest", None),
            lambda: F.linear(x, w))
        target = M >= 64
        rows.append(dict(op="exp_linear_lut", shape=f"M={M} K={K} N={N}", bits=bits,
                         ms=t * 1e3, peer="F.linear fp32", peer_ms=t_peer * 1e3,
                         ratio=ratio, target="<= 1.3" if target else "(batch < 64)",
                         ok=(ratio <= 1.3) if target else None))


def bench_conv(rows, quick, bits=4):
    # A ResNet-50 3x3 conv (stage 3: 256 -> 256 channels at 14x14), batch 64.
    B = 8 if quick else 64
    x = torch.relu(torch.randn(B, 256, 14, 14))
    w = torch.randn(256, 256, 3, 3) / 48
    a, sa, ba = fitted(x, bits)
    _, sw, bw = fitted(w, bits, alpha=a)
    wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, bits), bits, True)
    t, t_peer, ratio = timeit_vs(
        lambda: dnateq.exp_conv2d_lut(x, wp, list(w.shape), a, sa, ba, sw, bw, bits, False,
                                      True, "nearest", None, padding=1),
        lambda: F.conv2d(x, w, padding=1), repeat=5)
    rows.append(dict(op="exp_conv2d_lut", shape=f"N={B} 256x14x14 k3 -> 256", bits=bits,
                     ms=t * 1e3, peer="F.conv2d fp32", peer_ms=t_peer * 1e3, ratio=ratio,
                     target="<= 1.3", ok=ratio <= 1.3))


def bench_count(rows, quick):
    M, K, N = (16, 512, 256) if quick else (64, 1024, 512)
    x = torch.relu(torch.randn(M, K))  # post-ReLU: about half zeros
    w = torch.randn(N, K)
    for bits in (3, 4, 5, 7):
        a, sa, ba = fitted(x, bits)
        _, sw, bw = fitted(w, bits, alpha=a)
        ac = dnateq.exp_quantize(x, a, sa, ba, bits)
        wc = dnateq.exp_quantize(w, a, sw, bw, bits)
        terms = dnateq.weight_terms(wc, bits)
        # Counter updates the op performs: per pair of nonzero codes one C1
        # and one C3 update, plus C2 updates (direct: one per pair; with the
        # precomputed weight terms: one per zero activation instead).
        nz_a = int((ac != 0).sum())
        pairs = int(((ac != 0).to(torch.float32) @ (wc != 0).to(torch.float32).T).sum())
        zeros = M * K - nz_a
        for use_terms in (False, True):
            t = timeit(lambda: dnateq.exp_linear_count(ac, wc, a, sa, ba, sw, bw, bits, None,
                                                       None, terms if use_terms else None),
                       repeat=3)
            updates = 2 * pairs + (zeros * N if use_terms else pairs)
            rate = updates / t
            rows.append(dict(op="exp_linear_count" + (" +w_terms" if use_terms else ""),
                             shape=f"M={M} K={K} N={N}", bits=bits, ms=t * 1e3, peer="-",
                             peer_ms=None, ratio=None, updates_per_s=rate,
                             pairs_per_s=pairs / t, target=">= 1e9 updates/s",
                             ok=rate >= 1e9))


def bench_error(rows, quick):
    x = torch.randn(1_000_000)
    for bits in (3, 5, 7):
        a, s, b = fitted(x[:65536], bits)
        C = 200 if quick else 2000
        t1 = timeit(lambda: dnateq.exp_errors(x, [a], [s], [b], bits), repeat=3)
        tc = timeit(lambda: dnateq.exp_errors(x, [a] * C, [s] * C, [b] * C, bits), repeat=3)
        per = max(tc - t1, 0.0) / (C - 1)
        rows.append(dict(op="exp_error (per candidate, after sort)", shape="1e6", bits=bits,
                         ms=per * 1e3, peer="sort+prefix once", peer_ms=t1 * 1e3, ratio=None,
                         target="<= 1 ms", ok=per <= 1e-3))
        tf = timeit(lambda: dnateq.exp_fit(x, bits), repeat=3)
        rows.append(dict(op="exp_fit golden (whole)", shape="1e6", bits=bits, ms=tf * 1e3,
                         peer="-", peer_ms=None, ratio=None, target="-", ok=None))


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "cpu_ops.local.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for bench in (bench_quantize, bench_linear, bench_conv, bench_count, bench_error):
        bench(rows, args.quick)
    header = f"{'op':40} {'shape':26} {'n':>2} {'ms':>9} {'peer ms':>9} {'ratio':>6} {'rate':>9}  target"
    print(header)
    print("-" * len(header))
    for r in rows:
        rate = r.get("updates_per_s")
        ok = {True: "ok", False: "MISS", None: ""}[r["ok"]]
        print(f"{r['op']:40} {r['shape']:26} {r['bits']:>2} {r['ms']:9.3f} "
              f"{fmt(r['peer_ms'], '9.3f')} {fmt(r['ratio'], '6.2f')} {fmt(rate, '9.2e')}  "
              f"{r['target']} {ok}")
    meta = dict(torch=torch.__version__, dnateq=dnateq.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                quick=args.quick, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
