#!/usr/bin/env python
"""Reproduce the analogues of the DNA-TEQ paper's Tables I-IV and Fig. 8 for the
models at hand.

Out of the box: the pretrained CIFAR-10 ResNet-20 and ResNet-32 on the real
CIFAR subsets in the shared data directory (``$DNATEQ_SHARED_DATA`` or
``../shared/data``; skipped with a message where absent). Add the paper's own
models with their data::

    python examples/reproduce_paper_tables.py --out paper_tables
    python examples/reproduce_paper_tables.py --quick --out /tmp/t        # about a minute
    python examples/reproduce_paper_tables.py --imagenet /data/imagenet \\
        --weights IMAGENET1K_V1 --limit 10000 --device cuda               # + ResNet-50
    python examples/reproduce_paper_tables.py --models --wmt newstest2014.en \\
        newstest2014.de --checkpoint mt.pt --vocab vocab.txt              # Transformer only

Writes ``OUT/tables.md`` (all tables, the threshold sweeps, notes on what
was measured on what) and PNGs: ``fig8_threshold_sweep.png`` (all models),
``fig8_<model>.png`` and ``bits_<model>.png`` per model, plus
``results.json``.

The tables (per model):

- Table I / II: mean RSS over layers of normal, exponential, Pareto and uniform
  fits to the magnitudes of the layers' input activations (I) and weights (II)
  (``dnateq.analysis.fit_distributions``; lowest in bold, and how many layers
  each distribution fits best).
- Table III: uniform quantization vs DNA-TEQ at the same bits per layer:
  accumulated RMAE (sum over the quantized layers of RMAE_W + RMAE_A, both
  quantizers measured on the same calibration batch) and the quality loss,
  with uniform at DNA-TEQ's ``n`` (the paper's comparison) and at DNA-TEQ's
  storage bits (``n + 1`` for signed tensors, storage-fair).
- Table IV: FP32 / INT8 quality, DNA-TEQ quality, average bits (paper: ``n``;
  storage: with the sign bit), compression vs INT8 (both conventions), the
  chosen ``Thr_w`` and the saved file size.
- Fig. 8: quality loss and average bits against ``Thr_w``
  (``dnateq.analysis.threshold_sweep``).

Quality is top-1 (%) for the classifiers, BLEU for the Transformer, on the
evaluation images/sentences; DNA-TEQ's threshold is selected on that same set
with ``max_loss`` (the paper's protocol). Calibration images are disjoint
from the evaluation ones (CIFAR: the training subset; ImageNet: ``train/``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

import dnateq
from dnateq import baselines, cli
from dnateq.analysis import fit_distributions, plot_bits, threshold_sweep
from dnateq.models import PAPER_SKIP, shared_data_dir
from dnateq.nn import ExpConv2d, ExpLinear
from dnateq.nn.uniform import UniformConv2d, UniformLinear

DISTS = ("normal", "exponential", "pareto", "uniform")
CIFAR_MODELS = ("cifar-resnet20", "cifar-resnet32")
FULL_THRESHOLDS = tuple(round(0.01 * i, 2) for i in (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20,
                                                     25, 30))
QUICK_THRESHOLDS = (0.02, 0.05, 0.10, 0.20, 0.30)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for the tables' definitions.")
    ap.add_argument("--out", default="paper_tables", help="output directory (tables.md, PNGs)")
    ap.add_argument("--models", nargs="*", choices=CIFAR_MODELS, default=list(CIFAR_MODELS),
                    help="CIFAR models (pass --models with none to skip them)")
    ap.add_argument("--data-dir", default=None,
                    help="CIFAR data and weights (default: dnateq.models.shared_data_dir())")
    ap.add_argument("--imagenet", metavar="DIR", help="ImageFolder root (train/ and val/)")
    ap.add_argument("--weights", help="ImageNet weights: checkpoint path or torchvision name")
    ap.add_argument("--imagenet-model", choices=("resnet50", "alexnet"), default="resnet50")
    ap.add_argument("--resize", type=int, default=None, help="ImageNet resize (default 256)")
    ap.add_argument("--crop", type=int, default=None, help="ImageNet crop (default 224)")
    ap.add_argument("--wmt", nargs=2, metavar=("SRC", "REF"), help="translation test set")
    ap.add_argument("--checkpoint", help="TransformerTranslator checkpoint (with --wmt)")
    ap.add_argument("--vocab", help="whitespace vocabulary file (with --wmt)")
    ap.add_argument("--tgt-vocab", help="target vocabulary file (with --wmt)")
    ap.add_argument("--wmt-calib", nargs=2, metavar=("SRC", "REF"),
                    help="calibration pairs for the Transformer (e.g. newstest2013)")
    ap.add_argument("--decode", choices=("beam", "greedy"), default="beam")
    ap.add_argument("--limit", type=int, default=None,
                    help="evaluation images / sentences per model (default: all; --quick: "
                         "256 CIFAR images)")
    ap.add_argument("--calib-images", type=int, default=None,
                    help="calibration images / sentence pairs (default 512; --quick: 64)")
    ap.add_argument("--max-loss", type=float, default=1.0,
                    help="allowed loss in top-1 points / BLEU (the paper's 1)")
    ap.add_argument("--search", choices=("golden", "paper"), default="golden")
    ap.add_argument("--rounding", choices=("nearest", "log"), default="nearest")
    ap.add_argument("--thresholds", type=cli.parse_fraction, nargs="+", default=None,
                    help="Thr_w values of the Fig. 8 sweep (default 1 %% .. 30 %%)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer calibration/evaluation images, a 2 %% threshold step, 5 sweep "
                         "thresholds and smaller activation samples (a smoke run)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.imagenet and not args.weights:
        ap.error("--imagenet needs --weights (a checkpoint path or a torchvision weights name)")
    if args.wmt and not (args.checkpoint and args.vocab):
        ap.error("--wmt needs --checkpoint and --vocab")
    for name in ("limit", "calib_images", "batch_size"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    return args


# ---------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------

def task_argv(args, kind: str, model: str = "") -> List[str]:
    """Options of ``python -m dnateq quantize`` for one model (dnateq.cli.make_task)."""
    calib = args.calib_images or (64 if args.quick else 512)
    common = ["--calib-images", calib, "--batch-size", args.batch_size, "--seed", args.seed]
    if args.device:
        common += ["--device", args.device]
    if args.workers is not None:
        common += ["--workers", args.workers]
    if args.no_progress:
        common.append("--no-progress")
    limit = args.limit or (256 if args.quick and kind == "cifar" else None)
    if limit:
        common += ["--limit", limit]
    if kind == "cifar":
        return ["--model", model, "--cifar", args.data_dir or shared_data_dir(), *common]
    if kind == "imagenet":
        out = ["--model", args.imagenet_model, "--weights", args.weights, "--imagenet",
               args.imagenet, *common]
        if args.resize:
            out += ["--resize", args.resize]
        if args.crop:
            out += ["--crop", args.crop]
        return out
    out = ["--model", "transformer", "--weights", args.checkpoint, "--vocab", args.vocab,
           "--src", args.wmt[0], "--ref", args.wmt[1], "--decode", args.decode, *common]
    if args.tgt_vocab:
        out += ["--tgt-vocab", args.tgt_vocab]
    if args.wmt_calib:
        out += ["--calib-src", args.wmt_calib[0], "--calib-ref", args.wmt_calib[1]]
    return out


def accumulated_rmae(float_model: nn.Module, qmodel: nn.Module, umodel: nn.Module,
                     batch: Any, max_samples: int = 32) -> Dict[str, float]:
    """Sum over the quantized layers of RMAE_W + RMAE_A for DNA-TEQ and a
    uniform model, both quantizers applied to the same tensors: the float
    weights, and the inputs each layer receives in the float model on (up to
    ``max_samples`` samples of) one calibration batch."""
    from dnateq._common import batch_input, to_device as _to_device
    qmods = {n: m for n, m in qmodel.named_modules() if isinstance(m, (ExpLinear, ExpConv2d))}
    umods = {n: m for n, m in umodel.named_modules()
             if isinstance(m, (UniformLinear, UniformConv2d))}
    fmods = dict(float_model.named_modules())
    names = [n for n in qmods if n in umods and n in fmods]
    acc = {k: 0.0 for k in ("dnateq_w", "dnateq_a", "uniform_w", "uniform_a")}
    seen = set()

    def rmae(x, xh):
        den = float(x.abs().double().sum())
        return float((x - xh).abs().double().sum()) / den if den > 0 else 0.0

    for n in names:
        w = fmods[n].weight.detach().float().cpu()
        acc["dnateq_w"] += rmae(w, qmods[n].dequantized_weight().float().cpu().reshape(w.shape))
        acc["uniform_w"] += rmae(w, umods[n].dequantized_weight().float().cpu().reshape(w.shape))

    def hook(name):
        def f(mod, inputs):
            if name in seen or not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            seen.add(name)
            x = inputs[0].detach().float().cpu()
            q = qmods[name]
            codes = dnateq.exp_quantize(x, q.alpha, q.sa, q.ba, q.bits, q.rounding)
            xq = dnateq.exp_dequantize(codes, q.alpha, q.sa, q.ba, q.bits)
            acc["dnateq_a"] += rmae(x, xq)
            acc["uniform_a"] += rmae(x, umods[name].quantize_input(x))
        return f

    handles = [fmods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        x = batch_input(batch)
        if isinstance(x, torch.Tensor):
            x = x[:max_samples]
        elif isinstance(x, (tuple, list)):
            x = type(x)(t[:max_samples] for t in x)
        dev = next(float_model.parameters()).device
        with torch.no_grad():
            float_model(_to_device(x, dev))
    finally:
        for h in handles:
            h.remove()
    acc["layers"] = len(names)
    acc["dnateq"] = acc["dnateq_w"] + acc["dnateq_a"]
    acc["uniform"] = acc["uniform_w"] + acc["uniform_a"]
    return acc


def safe_name(name: str) -> str:
    """A file-name-friendly model name: "Transformer (translation)" -> "Transformer_translation"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def run_model(name: str, task, args, out_dir: str) -> Dict[str, Any]:
    t_start = time.perf_counter()
    progress = not args.no_progress
    model = task.model.to(task.device).eval()
    calib = task.calib_loader
    n_calib = len(calib)
    key = task.main_metric
    skip = list(PAPER_SKIP) if task.kind == "translate" else None
    sample = 1 << 14 if args.quick else 1 << 18
    opts = dict(calib_batches=n_calib, sample_size=sample, search=args.search,
                rounding=args.rounding, seed=args.seed, skip=skip)
    res: Dict[str, Any] = dict(model=name, metric=key, data=task.data)
    print(f"\n== {name}: {task.data}", flush=True)

    # Tables I-II
    fits = fit_distributions(model, calib, distributions=DISTS, calib_batches=n_calib,
                             sample_size=sample, skip=skip, progress=progress, seed=args.seed)
    res["fits"] = dict(mean=fits.mean, wins=fits.wins, best=fits.best, notes=fits.notes,
                       layers=len(fits.layers))

    # Table III-IV: float, DNA-TEQ, uniform
    res["float"] = task.evaluate(model, "float32")
    step = 0.02 if args.quick else 0.01
    q = dnateq.quantize(model, calib, eval_fn=task.quality, max_loss=args.max_loss,
                        threshold_step=step, progress=progress, method="paper", **opts)
    res["dnateq"] = task.evaluate(q, "DNA-TEQ")
    rep = dnateq.report(q)
    tot = rep.totals
    with tempfile.TemporaryDirectory() as d:
        res["file_bytes"] = dnateq.save(q, os.path.join(d, "m.dnateq"))
    uq = dict(calib_batches=n_calib, skip=skip, progress=False, seed=args.seed)
    res["int8"] = task.evaluate(baselines.uniform_quantize(model, calib, bits=8, **uq), "INT8")
    first_batch = next(iter(calib))
    res["uniform"], res["rmae"] = {}, {}
    for conv in baselines.CONVENTIONS:
        um = baselines.uniform_quantize(model, calib, bits=baselines.bits_of(q, conv), **uq)
        res["uniform"][conv] = task.evaluate(um, f"uniform ({conv})")
        res["rmae"][conv] = accumulated_rmae(model, q, um, first_batch)
        del um
    res.update(avg_bits=tot["avg_bits"], storage_bits=tot["storage_bits"],
               compression=tot["compression_vs_int8"], layers=tot["layers"],
               bytes_int8=tot["bytes_int8"], bytes_packed=tot["bytes_packed"], threshold=q.dnateq_info["threshold"],
               fallback=q.dnateq_info["fallback"], threshold_step=step,
               bits_histogram={str(b): sum(r["n"] == b for r in rep.layers)
                               for b in sorted({r["n"] for r in rep.layers})},
               start_w=sum(r["start"] == "W" for r in rep.layers))
    safe = safe_name(name)
    fig = plot_bits(q, title=f"{name}: exponent bits per layer")
    fig.savefig(os.path.join(out_dir, f"bits_{safe}.png"), dpi=110, bbox_inches="tight")

    # Fig. 8
    ts = args.thresholds or (QUICK_THRESHOLDS if args.quick else FULL_THRESHOLDS)
    sw = threshold_sweep(model, calib, task.quality, ts, max_loss=args.max_loss,
                         progress=progress, **opts)
    fig = sw.plot()
    fig.suptitle(f"{name}: Thr_w sensitivity ({key})", fontsize=10)
    fig.savefig(os.path.join(out_dir, f"fig8_{safe}.png"), dpi=110, bbox_inches="tight")
    res["sweep"] = dict(rows=[dict(threshold=r["threshold"], avg_bits=r["avg_bits"],
                                   storage_bits=r["storage_bits"], quality=r["quality"],
                                   loss=r["loss"], passed=r["passed"]) for r in sw.rows],
                        base=sw.base_quality, selected=sw.selected,
                        markdown=sw.to_markdown())
    res["seconds"] = time.perf_counter() - t_start
    print(f"   {name}: float {res['float'][key]:.2f}, DNA-TEQ {res['dnateq'][key]:.2f} at "
          f"{tot['avg_bits']:.3f} bits ({res['seconds']:.0f} s)", flush=True)
    return res


# ---------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------

def f2(v: Optional[float], nd: int = 2) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def g4(v: float) -> str:
    return f"{v:.4g}"


def table_fits(results: List[Dict[str, Any]], kind: str) -> str:
    lines = ["| DNN (mean RSS, " + kind + ") | " + " | ".join(DISTS) + " | best in (layers) |",
             "|---|" + "---|" * (len(DISTS) + 1)]
    for r in results:
        mean = r["fits"]["mean"].get(kind)
        if not mean:
            continue
        best = r["fits"]["best"][kind]
        cells = [f"**{g4(mean[d])}**" if d == best else g4(mean[d]) for d in DISTS]
        wins = ", ".join(f"{d} {n}" for d, n in r["fits"]["wins"][kind].items() if n)
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {wins} |")
    return "\n".join(lines)


def unit(r) -> str:
    return "BLEU" if r["metric"] == "bleu" else "%"


def table3(results) -> str:
    lines = ["| DNN (acc. RMAE / loss) | uniform, DNA-TEQ's n (paper) | "
             "uniform, DNA-TEQ's storage bits | DNA-TEQ |", "|---|---|---|---|"]
    for r in results:
        k = r["metric"]
        base = r["float"][k]
        cell = lambda rm, q: f"{rm:.2f} / {base - q[k]:+.2f}"
        lines.append(f"| {r['model']} | {cell(r['rmae']['paper']['uniform'], r['uniform']['paper'])}"
                     f" | {cell(r['rmae']['storage']['uniform'], r['uniform']['storage'])} | "
                     f"{cell(r['rmae']['paper']['dnateq'], r['dnateq'])} |")
    return "\n".join(lines)


def table4(results) -> str:
    lines = ["| Network | Baseline (FP32 / INT8) | DNA-TEQ | AVG bits (paper, n) | storage "
             "bits (+ sign) | compression vs INT8 (paper / storage) | Thr_w | layers per n | "
             "bytes: packed W / INT8 W / file |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        k = r["metric"]
        u = "BLEU" if k == "bleu" else "% top-1"
        thr = "fallback (7 bits)" if r["threshold"] is None else f"{100 * r['threshold']:.0f} %"
        lines.append(
            f"| {r['model']} | {f2(r['float'][k])} / {f2(r['int8'][k])} {u} | "
            f"{f2(r['dnateq'][k])} {u} | {r['avg_bits']:.2f} | {r['storage_bits']:.2f} | "
            f"{100 * r['compression']['paper']:.1f} % / {100 * r['compression']['storage']:.1f} % "
            f"| {thr} | {' '.join(f'{b}b:{c}' for b, c in r['bits_histogram'].items())} | "
            f"{r['bytes_packed']} / {r['bytes_int8']} / {r['file_bytes']} |")
    return "\n".join(lines)


def fig8_combined(results, path: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for r in results:
        rows = r["sweep"]["rows"]
        t = [100 * x["threshold"] for x in rows]
        ax1.plot(t, [x["loss"] for x in rows], "o-", label=f"{r['model']} ({'BLEU' if r['metric'] == 'bleu' else 'top-1'})")
        ax2.plot(t, [x["avg_bits"] for x in rows], "s-", label=r["model"])
    ax1.axhline(results[0]["max_loss"], color="k", ls=":", lw=1, label="max_loss")
    ax1.set_xlabel("Thr_w (%)")
    ax1.set_ylabel("quality loss (top-1 points / BLEU)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("Thr_w (%)")
    ax2.set_ylabel("average bits (n, weight-count weighted)")
    ax2.set_ylim(2.5, 7.5)
    ax2.legend(fontsize=8)
    fig.suptitle("Fig. 8 analogue: accuracy loss and average bits against Thr_w")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def markdown(results, args, skipped: List[str]) -> str:
    out = ["# DNA-TEQ: the paper's Tables I-IV and Fig. 8 for the models at hand", ""]
    out.append(f"dnateq {dnateq.__version__}, torch {torch.__version__}; max_loss "
               f"{args.max_loss} (top-1 points / BLEU); search `{args.search}`, rounding "
               f"`{args.rounding}`" + ("; **--quick** (smoke run: small calibration and "
                                       "evaluation sets)" if args.quick else ""))
    out.append("")
    for r in results:
        k = r["metric"]
        out.append(f"- **{r['model']}**: {r['data'].get('calibration')}; evaluated on "
                   f"{r['float']['n']} {'sentences' if k == 'bleu' else 'images'} "
                   f"({r['data'].get('source')}); {r['layers']} quantized layers; "
                   f"{r['seconds']:.0f} s")
    for s in skipped:
        out.append(f"- skipped: {s}")
    out += ["", "## Table I: mean RSS of distribution fits, activations", "",
            table_fits(results, "activations"), "",
            "## Table II: mean RSS of distribution fits, weights", "",
            table_fits(results, "weights"), "",
            "RSS of the 100-bin density histogram of the magnitudes against each fitted pdf, "
            "averaged over the layers (lowest in bold). Raw RSS scales with the tensors' "
            "magnitudes, so compare distributions within a row, not models.", "",
            "## Table III: uniform vs DNA-TEQ at the same bits per layer", "",
            table3(results), "",
            "Accumulated RMAE = sum over the quantized layers of RMAE(W) + RMAE(A) (fractions), "
            "every quantizer applied to the same float weights and to the inputs each layer "
            "receives in the float model on one calibration batch. Loss = float quality minus "
            "quantized quality (top-1 points, or BLEU). *paper*: uniform with DNA-TEQ's n bits "
            "per layer, sign included (the paper's comparison); *storage*: uniform with "
            "DNA-TEQ's storage bits (n + 1 for signed tensors).", "",
            "## Table IV: accuracy, average bits and compression", "",
            table4(results), "",
            "Average bits are weighted by weight count; the paper counts n only (compression "
            "= 1 - n/8); the storage figures count the sign bit of signed weight tensors. "
            "Bytes: the packed weight codes (row padding included) and INT8 weights of the "
            "quantized layers; the file is `dnateq.save`'s whole output (packed codes plus "
            "the float BatchNorm/bias/embedding tensors and the calibration record). Thr_w is "
            "the one `dnateq.quantize` kept, its loop stepping by "
            f"{100 * (0.02 if args.quick else 0.01):.0f} % and stopping at the first "
            "threshold that loses more than max_loss; the sweeps below evaluate their own "
            "thresholds independently, and their loss need not be monotone in Thr_w on a "
            "finite evaluation set.", "",
            "## Fig. 8: threshold sensitivity", "",
            "![Fig. 8](fig8_threshold_sweep.png)", ""]
    for r in results:
        safe = safe_name(r["model"])
        out += [f"### {r['model']}", "", r["sweep"]["markdown"],
                f"![{r['model']}](fig8_{safe}.png) ![bits](bits_{safe}.png)", ""]
    return "\n".join(out) + "\n"


def jsonable(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    jobs, skipped = [], []
    if args.models:
        d = args.data_dir or shared_data_dir()
        need = ["cifar10_test_761.npz", "cifar10_train_761.npz"] + [
            f"resnet{m[len('cifar-resnet'):]}_cifar10.th" for m in args.models]
        missing = [f for f in need if not os.path.isfile(os.path.join(d, f))]
        if missing:
            msg = (f"CIFAR ResNets: {', '.join(missing)} not found in {d!r} (the shared real "
                   "data live beside the project; set DNATEQ_SHARED_DATA or pass --data-dir)")
            print(f"skipping the {msg}", file=sys.stderr)
            skipped.append(msg)
        else:
            jobs += [(m, "cifar", m) for m in args.models]
    if args.imagenet:
        jobs.append((f"{args.imagenet_model} (ImageNet)", "imagenet", args.imagenet_model))
    if args.wmt:
        jobs.append(("Transformer (translation)", "wmt", "transformer"))
    if not jobs:
        print("nothing to run: no CIFAR data and no --imagenet/--wmt given", file=sys.stderr)
        return 0
    results = []
    for name, kind, model in jobs:
        try:
            task = cli.make_task(task_argv(args, kind, model))
        except cli.CLIError as e:
            print(f"reproduce_paper_tables.py: error: {name}: {e}", file=sys.stderr)
            return 2
        r = run_model(name, task, args, args.out)
        r["max_loss"] = args.max_loss
        results.append(r)
        del task
    fig8_combined(results, os.path.join(args.out, "fig8_threshold_sweep.png"))
    md = markdown(results, args, skipped)
    with open(os.path.join(args.out, "tables.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(jsonable([{k: v for k, v in r.items()} for r in results]), f, indent=1,
                  default=str)
    print()
    print(md)
    print(f"wrote {os.path.join(args.out, 'tables.md')} and PNGs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
