"""Calibration benchmark: ``dnateq.quantize`` on torchvision ResNet-50 (random
weights, CPU), time per phase and peak memory.

    python benchmarks/bench_calibration.py [--images 64] [--batch 8]
        [--batches 1,2,4,8] [--json PATH] [--threads N] [--quick]

One run of the whole ``dnateq.quantize`` on all the images gives the time per
phase (``qmodel.dnateq_info["timing"]``: tracing, the per-layer tables =
exponential RSS + ``exp_fit`` for n = 3..7 of every layer's W and A, and the
threshold search = building quantized layers + proxy evaluations) and its
peak memory. Tracing alone, for 1, 2, 4, 8 calibration batches, shows the
bounded trace: its peak must not grow with the batches beyond the first.
Each run is a fresh subprocess; the peak resident set (VmHWM) is reset
(``/proc/self/clear_refs``) after the model and the images are built, so
"peak +MiB" is what calibration adds on top.

Targets (issue 3, 2-core machine):
  per-layer tables of ResNet-50 <= 60 s
  peak memory independent of the number of calibration batches beyond the first
Prints a table and writes JSON (default benchmarks/results/calibration.local.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _setup(args):
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()   # random weights, offline
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.images, 3, 224, 224, generator=g)
    loader = [images[i:i + args.batch] for i in range(0, args.images, args.batch)]
    return model, loader


def child_trace(args) -> dict:
    """Tracing alone (the phase that sees every calibration batch): its peak."""
    import copy

    from dnateq.calibration import select_layers, trace_layers

    model, loader = _setup(args)
    calib = min(args.calib, len(loader))
    work = copy.deepcopy(model)
    rss0 = _rss_kib("VmRSS")
    reset_ok = _reset_peak()
    t0 = time.perf_counter()
    _, names, _ = select_layers(work)
    tr = trace_layers(work, names, loader, calib_batches=calib, progress=False)
    dt = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    kept = sum(t.vals.numel() for t in tr.traces.values())
    return dict(mode="trace", calib_batches=calib, images_traced=calib * args.batch,
                layers=len(names), trace_s=dt, sample_elements=kept,
                rss_before_mib=rss0 / 1024, peak_mib=peak / 1024,
                peak_added_mib=(peak - rss0) / 1024 if reset_ok else None)


def child_full(args) -> dict:
    """The whole dnateq.quantize: time per phase and the peak."""
    import dnateq

    model, loader = _setup(args)
    calib = min(args.calib, len(loader))
    rss0 = _rss_kib("VmRSS")
    reset_ok = _reset_peak()
    t0 = time.perf_counter()
    q = dnateq.quantize(model, loader, calib_batches=calib, eval_batches=1,
                        progress=not args.no_progress, max_threshold=args.max_threshold,
                        method="paper")   # the targets are the paper method's tables
    wall = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    info = q.dnateq_info
    rep = dnateq.report(q).to_dict()["totals"]
    return dict(mode="full", calib_batches=calib, images_traced=calib * args.batch,
                layers=rep["layers"], timing=info["timing"], wall_s=wall,
                evaluations=sum(1 for h in info["history"] if h["evaluated"]) + 1,
                rss_before_mib=rss0 / 1024, peak_mib=peak / 1024,
                peak_added_mib=(peak - rss0) / 1024 if reset_ok else None,
                avg_bits=rep["avg_bits"], threshold=info["threshold"])


def _run_child(args, mode: str, calib: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{mode}:{calib}",
           "--images", str(args.images), "--batch", str(args.batch),
           "--threads", str(args.threads), "--max-threshold", str(args.max_threshold)]
    if args.no_progress:
        cmd.append("--no-progress")
    # A fixed mmap threshold makes glibc return large freed blocks at once, so
    # the resident set tracks live memory instead of the allocator's history.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    print(f"== {mode}, calib_batches={calib}", flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env)
    res = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(res[-1][len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="calibration images (224x224)")
    ap.add_argument("--batch", type=int, default=8, help="images per loader batch")
    ap.add_argument("--batches", default="1,2,4,8",
                    help="calib_batches values of the tracing-memory comparison")
    ap.add_argument("--threads", type=int, default=torch_threads_default())
    ap.add_argument("--max-threshold", type=float, default=0.05,
                    help="bounds the search (proxy evaluations of ResNet-50 dominate it)")
    ap.add_argument("--quick", action="store_true", help="16 images, batches 1,2")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "calibration.local.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        mode, calib = args.child.split(":")
        args.calib = int(calib)
        res = child_trace(args) if mode == "trace" else child_full(args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.quick:
        args.images, args.batches = 16, "1,2"
    n_batches = -(-args.images // args.batch)
    full = _run_child(args, "full", n_batches)
    traces = [_run_child(args, "trace", int(c)) for c in args.batches.split(",")]

    t = full["timing"]
    print()
    print(f"dnateq.quantize, torchvision ResNet-50 (random weights), {full['images_traced']} "
          f"images of 224x224 in batches of {args.batch}, {args.threads} threads, "
          f"{full['layers']} layers")
    print(f"  tracing            {t['trace']:8.1f} s")
    print(f"  per-layer tables   {t['tables']:8.1f} s   (RSS + exp_fit, n = 3..7, W and A)")
    print(f"  threshold search   {t['search']:8.1f} s   ({full['evaluations']} proxy "
          f"evaluations, max_threshold {args.max_threshold})")
    print(f"  total              {t['total']:8.1f} s   peak +{full['peak_added_mib']:.0f} MiB, "
          f"avg bits {full['avg_bits']:.3f}")
    print()
    hdr = f"{'calib batches':>13} {'images':>6} {'trace s':>8} {'sample elems':>13} {'peak +MiB':>10}"
    print("tracing alone (peak memory vs number of batches)")
    print(hdr)
    print("-" * len(hdr))
    for r in traces:
        peak = "n/a" if r["peak_added_mib"] is None else f"{r['peak_added_mib']:.0f}"
        print(f"{r['calib_batches']:>13} {r['images_traced']:>6} {r['trace_s']:>8.1f} "
              f"{r['sample_elements']:>13} {peak:>10}")
    peaks = [r["peak_added_mib"] for r in traces if r["peak_added_mib"] is not None]
    targets = {"tables_s": dict(value=t["tables"], target="<= 60", met=t["tables"] <= 60)}
    print()
    print(f"target: per-layer tables <= 60 s: {t['tables']:.1f} s -> "
          f"{'met' if t['tables'] <= 60 else 'MISSED'}")
    if len(peaks) > 1 and peaks[0] > 0:
        growth = (max(peaks[1:]) - peaks[0]) / peaks[0]
        ok = growth <= 0.10
        targets["trace_peak_growth"] = dict(value=growth, target="<= +10 % beyond 1 batch",
                                            met=ok)
        print(f"target: tracing peak independent of batches beyond the first: "
              f"{', '.join(f'{p:.0f}' for p in peaks)} MiB (largest vs 1 batch: "
              f"{growth:+.1%}) -> {'met' if ok else 'MISSED'}")
    import torch
    meta = dict(machine=platform.machine(), cpu_count=os.cpu_count(), threads=args.threads,
                python=platform.python_version(), torch=torch.__version__,
                images=args.images, batch=args.batch, model="torchvision resnet50 (random)")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, full=full, trace=traces, targets=targets), f, indent=1)
    print(f"\nwrote {args.json}")


def torch_threads_default() -> int:
    return max(1, os.cpu_count() or 1)


if __name__ == "__main__":
    main()
