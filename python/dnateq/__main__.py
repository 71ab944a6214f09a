"""Command line.

``python -m dnateq quantize``: calibrates a model (ResNet-50, AlexNet, the
CIFAR ResNets, a Transformer translator) on ImageNet / CIFAR / translation
data, evaluates float and quantized, saves the model and the report.
``python -m dnateq eval``: top-1/top-5 or BLEU of a float or saved quantized
model (see :mod:`dnateq.cli` for the options and what is measured on what).
``python -m dnateq demo``: quantizes a real model on real data that ship
with the install (a CNN on scikit-learn's digits, see :mod:`dnateq.demo`)
and prints the report. ``python -m dnateq ops``: a tour of the operators (the
number format on SPEC's worked example, fits at every bit-width, one layer
run three ways that must agree).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import dnateq
from dnateq import cli, reference


def _table(rows, header):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print()


def ops_tour(args) -> int:
    torch.manual_seed(args.seed)
    print(f"dnateq {dnateq.__version__} on torch {torch.__version__}\n")

    print("1. Number format (n=3, alpha=2, S=0.5, beta=0.1): x -> code -> x_hat")
    x = torch.tensor([1.3, 1.58, -0.05, 0.0, 100.0])
    rows = []
    for r in ("log", "nearest"):
        c = dnateq.exp_quantize(x, 2.0, 0.5, 0.1, 3, r)
        xh = dnateq.exp_dequantize(c, 2.0, 0.5, 0.1, 3)
        for xi, ci, hi in zip(x.tolist(), c.tolist(), xh.tolist()):
            rows.append((r, xi, ci, f"0x{ci & 0xFF:02x}", f"{hi:.4f}"))
    _table(rows, ("rounding", "x", "code", "byte", "x_hat"))

    print("2. Fitting a layer (weights ~ N(0, 1/K), post-ReLU activations), per bit-width")
    M, K, N = args.batch, args.k, args.n
    a = torch.relu(torch.randn(M, K))
    w = torch.randn(N, K) / K ** 0.5
    rows = []
    for bits in range(3, 8):
        t0 = time.perf_counter()
        al, sa, ba, ea = dnateq.exp_fit(a, bits)  # activations start the base search
        _, sw, bw, ew = dnateq.exp_fit(w, bits, alpha=al)
        dt = time.perf_counter() - t0
        packed = dnateq.exp_pack(dnateq.exp_quantize(w, al, sw, bw, bits), bits, True)
        rows.append((bits, f"{al:.4f}", f"{100 * ew:.2f}%", f"{100 * ea:.2f}%", bits + 1,
                     f"{packed.numel() * 8 / w.numel():.3f}",
                     f"{100 * (1 - bits / 8):.1f}%", f"{dt * 1e3:.1f}"))
    _table(rows, ("n", "alpha", "RMAE_W", "RMAE_A", "bits/weight (with sign)",
                  "stored bits/weight", "vs INT8 (paper: 1-n/8)", "fit ms"))

    bits = args.bits
    print(f"3. One Linear({K}, {N}) at n={bits}, batch {M}: count vs lut vs fake")
    al, sa, ba, _ = dnateq.exp_fit(a, bits)
    _, sw, bw, _ = dnateq.exp_fit(w, bits, alpha=al)
    ac = dnateq.exp_quantize(a, al, sa, ba, bits)
    wc = dnateq.exp_quantize(w, al, sw, bw, bits)
    wp = dnateq.exp_pack(wc, bits, True)
    results = {}
    timings = {}
    for mode in ("count", "lut", "fake"):
        t0 = time.perf_counter()
        if mode == "count":
            y = dnateq.exp_linear_count(ac, wc, al, sa, ba, sw, bw, bits, None, None,
                                        dnateq.weight_terms(wc, bits))
        elif mode == "lut":
            y = dnateq.exp_linear_lut(a, wp, [N, K], al, sa, ba, sw, bw, bits, False, True,
                                      "nearest", None)
        else:
            y = reference.exp_linear_lut(a, wp, [N, K], al, sa, ba, sw, bw, bits, False,
                                         True, "nearest", None)
        timings[mode] = time.perf_counter() - t0
        results[mode] = y
    yf = a @ w.T
    rows = []
    for mode, y in results.items():
        rel = float((y - results["fake"]).abs().max() / results["fake"].abs().max())
        err = float((y - yf).abs().mean() / yf.abs().mean())
        rows.append((mode, f"{timings[mode] * 1e3:.2f}", f"{rel:.1e}", f"{100 * err:.2f}%"))
    _table(rows, ("mode", "ms", "max rel. diff vs fake", "mean rel. error vs float"))
    agree = all(torch.allclose(results[m], results["fake"], rtol=1e-4, atol=1e-4 *
                               float(results["fake"].abs().max())) for m in ("count", "lut"))
    print("count, lut and fake agree (rtol 1e-4):", "yes" if agree else "NO")
    print("\noperator speed: python benchmarks/bench_cpu_ops.py")
    return 0 if agree else 1


def _demo(args) -> int:
    from . import demo

    demo.run(seed=args.seed, max_loss=args.max_loss, progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dnateq", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    dm = sub.add_parser("demo", help="quantize a CNN on the bundled digits and print the report")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--max-loss", type=float, default=1.0)
    dm.add_argument("--no-progress", action="store_true")
    dm.set_defaults(func=lambda a: _demo(a))
    d = sub.add_parser("ops", help="tour of the operators")
    d.add_argument("--bits", type=int, default=4)
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--k", type=int, default=512)
    d.add_argument("--n", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=ops_tour, _parser=d)
    dm.set_defaults(_parser=dm)
    cli.add_quantize_parser(sub)
    cli.add_eval_parser(sub)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except cli.CLIError as e:
        prefix = ""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            prefix = f"[rank {os.environ.get('RANK', '?')}] "
        args._parser.error(prefix + str(e))   # usage message, exit status 2


if __name__ == "__main__":
    sys.exit(main())
