"""Two builds of dnateq, same machine, same run: per-call time of every operator.

For a refactor that must not change speed (issue 15: "the benchmarks show no
regression beyond noise"). Each build is a ``python/`` folder with its compiled
``dnateq/_C`` (a worktree built with ``setup.py build_ext --inplace``). One
process cannot load two builds (the operator names collide), so the rounds
alternate A, B, A, B... in fresh processes, each timing every case; the table
gives each case's median over rounds and the ratio B / A with the spread of
the per-round ratios.

    python benchmarks/bench_builds.py --a ../old/python --b python --rounds 6 \
        --json benchmarks/results/builds.json

The cases are small on purpose: a refactor of the op fronts changes the fixed
per-call cost, which only small calls show (a 4096x4096 GEMV hides it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(r"""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    import dnateq
    g = torch.Generator().manual_seed(0)
    B = 4
    x = torch.randn(1, 256, generator=g)
    w = dnateq.exp_quantize(torch.randn(256, 256, generator=g), 1.3, 0.05, 0.0, B)
    wp = dnateq.exp_pack(w, B, True)
    lay = dnateq.exp_lut_layout(wp, [256, 256], B, True)
    a = dnateq.exp_quantize(x, 1.3, 0.05, 0.0, B)
    xc = torch.randn(1, 16, 8, 8, generator=g)
    wc = dnateq.exp_quantize(torch.randn(16, 16, 3, 3, generator=g), 1.3, 0.05, 0.0, B)
    wcp = dnateq.exp_pack(wc, B, True)
    clay = dnateq.exp_lut_layout(wcp, [16, 16, 3, 3], B, True)
    ac = dnateq.exp_quantize(xc, 1.3, 0.05, 0.0, B)
    P = (1.3, 0.05, 0.0, 0.05, 0.0)
    ops = torch.ops.dnateq
    cases = {
        "exp_quantize [1,256]": lambda: ops.exp_quantize(x, 1.3, 0.05, 0.0, B, "nearest", True),
        "exp_dequantize [1,256]": lambda: ops.exp_dequantize(a, 1.3, 0.05, 0.0, B),
        "exp_pack [256,256]": lambda: ops.exp_pack(w, B, True),
        "exp_unpack [256,256]": lambda: ops.exp_unpack(wp, B, True, [256, 256]),
        "exp_linear_lut M=1 256x256": lambda: ops.exp_linear_lut(
            x, wp, [256, 256], *P, B, True, True, "nearest", None),
        "exp_linear_lut M=1 256x256 layout": lambda: ops.exp_linear_lut(
            x, wp, [256, 256], *P, B, True, True, "nearest", None, None, None, lay),
        "exp_linear_count M=1 256x256": lambda: ops.exp_linear_count(
            a, w, *P, B, None, None),
        "exp_conv2d_lut 16x8x8 3x3": lambda: ops.exp_conv2d_lut(
            xc, wcp, [16, 16, 3, 3], *P, B, True, True, "nearest", None, [1, 1], [1, 1],
            [1, 1], 1, None, None, clay),
        "exp_conv2d_count 16x8x8 3x3": lambda: ops.exp_conv2d_count(
            ac, wc, *P, B, None, [1, 1], [1, 1], [1, 1], 1, None),
    }
    reps = int(sys.argv[1])
    out = {}
    with torch.inference_mode():
        for name, f in cases.items():
            for _ in range(20):
                f()
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(reps):
                    f()
                ts.append((time.perf_counter() - t0) / reps)
            out[name] = min(ts)
    print(json.dumps(out))
""")


def run_build(path: str, reps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", CHILD, str(reps)], env=env,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"build {path}: the child failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="python/ folder of build A (the baseline)")
    ap.add_argument("--b", required=True, help="python/ folder of build B")
    ap.add_argument("--rounds", type=int, default=6, help="A/B rounds, alternating")
    ap.add_argument("--reps", type=int, default=200, help="calls per timing sample")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    for p in (args.a, args.b):
        if not os.path.isdir(os.path.join(p, "dnateq")):
            ap.error(f"{p} has no dnateq/ package folder")
    if args.rounds < 1 or args.reps < 1:
        ap.error("--rounds and --reps must be >= 1")
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(it, **_):
            return it
    ra, rb = [], []
    for _ in tqdm(range(args.rounds), desc="A/B rounds"):
        ra.append(run_build(args.a, args.reps))
        rb.append(run_build(args.b, args.reps))
    rows = []
    print(f"{'case':38s} {'A us':>9s} {'B us':>9s} {'B/A':>6s} {'min..max B/A':>14s}")
    for name in ra[0]:
        ta = statistics.median(r[name] for r in ra) * 1e6
        tb = statistics.median(r[name] for r in rb) * 1e6
        per = [b[name] / a[name] for a, b in zip(ra, rb)]
        rows.append(dict(case=name, a_us=ta, b_us=tb, ratio=tb / ta, ratio_min=min(per),
                         ratio_max=max(per)))
        print(f"{name:38s} {ta:9.2f} {tb:9.2f} {tb / ta:6.3f} {min(per):6.3f}..{max(per):6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(a=os.path.abspath(args.a), b=os.path.abspath(args.b),
                           rounds=args.rounds, reps=args.reps, load=os.getloadavg(),
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
