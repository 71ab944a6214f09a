"""The ``quantize`` and ``eval`` commands of ``python -m dnateq``.

``python -m dnateq quantize``: build a float model, evaluate it, calibrate it
with :func:`dnateq.quantize`, evaluate the result, and write the quantized
model (``dnateq.save``), the report and a summary::

    # ImageNet ResNet-50 (ImageFolder with train/ and val/, torchvision layout)
    python -m dnateq quantize --model resnet50 --weights IMAGENET1K_V1 \\
        --imagenet /data/imagenet --calib-images 512 --out runs/r50
    # a local checkpoint, 2000 validation images, the paper's search and rounding
    python -m dnateq quantize --model resnet50 --weights r50.pth --imagenet /data/imagenet \\
        --limit 2000 --search paper --rounding log --out runs/r50-paper
    # the pretrained CIFAR-10 ResNet-20 on the shared real data
    python -m dnateq quantize --model cifar-resnet20 --cifar --out runs/r20
    # a TransformerTranslator checkpoint on newstest2014 (whitespace vocabulary file)
    python -m dnateq quantize --model transformer --weights mt.pt --vocab vocab.txt \\
        --src newstest2014.en --ref newstest2014.de --calib-src newstest2013.en \\
        --calib-ref newstest2013.de --out runs/mt
    # 8 GPUs: sharded calibration traces and evaluation, identical model on every rank
    torchrun --nproc_per_node=8 -m dnateq quantize --model resnet50 ... --device cuda

``python -m dnateq eval``: top-1/top-5 (or BLEU) of the float model, or of a
saved quantized model (``--quantized model.dnateq``, loaded onto the
``--model``/``--weights`` float model with :func:`dnateq.load`).

Files written by ``quantize --out DIR`` (rank 0 only under torchrun):
``model.dnateq`` (packed codes), ``report.md`` (the summary, the per-layer
report and the threshold history), ``report.csv`` (one row per layer),
``report.json`` (``dnateq.report(q).to_dict()`` plus the calibration record
``qmodel.dnateq_info``) and ``summary.json`` (float and quantized quality,
bits, compression, timing, options; non-finite numbers are written as null).

Data and what each quality number is measured on:

- ``--imagenet DIR``: ``DIR/val`` (else ``DIR`` itself) is evaluated,
  ``--limit`` images spread evenly over its classes; the ``--calib-images``
  calibration images come from ``--calib-dir``, else ``DIR/train``, else from
  ``DIR`` itself, disjoint from the evaluated images (``--limit`` then counts
  among the rest). Labels are the class folders in sorted order, so the
  folder must hold the model's classes in its order (the torchvision ImageNet
  layout for the published weights).
- ``--cifar [DIR]``: the 761-image CIFAR-10 subsets (calibration on the
  training images, evaluation on the test images); DIR defaults to
  :func:`dnateq.models.shared_data_dir`.
- ``--src/--ref``: a translation test set (plain text or .sgm); calibration
  pairs from ``--calib-src/--calib-ref``, else the first ``--calib-images``
  pairs of the test set (said so in the summary).

``--metric top1`` (classification default) and ``bleu`` (translation
default) select the threshold on the evaluated set, as the paper does (its
accuracy loss is measured on the test data); ``--metric proxy`` selects
without labels: top-1 agreement with the float model (cosine similarity for
translation logits) on held-out batches of the evaluated inputs.

Usage errors (missing files, incompatible options, a checkpoint that does not
fit the model) print an argparse-style message and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["CLIError", "add_quantize_parser", "add_eval_parser", "run_quantize", "run_eval",
           "make_task", "Task", "parse_bits", "parse_fraction", "read_vocab", "MODELS"]

MODELS = ("resnet50", "alexnet", "cifar-resnet20", "cifar-resnet32", "transformer")
_IMAGENET_MODELS = ("resnet50", "alexnet")
_CIFAR_MODELS = ("cifar-resnet20", "cifar-resnet32")
_RANDOM = ("random", "none")


class CLIError(Exception):
    """A usage error: ``python -m dnateq`` prints it argparse-style and exits with 2."""


# ---------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------

def parse_bits(text: str) -> List[int]:
    """``"3-7"``, ``"3,4,5"``, ``"4"`` or ``"3-5,7"`` -> sorted exponent bits in 2..7."""
    out = set()
    try:
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid bits {text!r}: use e.g. 3-7, 3,4,5 or 4") from None
    if not out or min(out) < 2 or max(out) > 7:
        raise argparse.ArgumentTypeError(
            f"bits must be exponent bit-widths in 2..7 (the paper searches 3-7), got {text!r}")
    return sorted(out)


def parse_fraction(text: str) -> float:
    """A threshold as a fraction (``0.05``) or a percentage (``5%``)."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid threshold {text!r}: use 0.05 or 5%") from None
    if not (math.isfinite(v) and 0 < v <= 1):
        raise argparse.ArgumentTypeError(
            f"threshold {text!r} must be in (0, 1] as a fraction, or a percentage such as 5%")
    return v


def _int_at_least(minimum: int, expected: str):
    """An argparse type: an integer >= ``minimum``; ``expected`` words the error."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _act_scale(text: str):
    return "auto" if text == "auto" else _positive_float(text)


# ---------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, choices=MODELS,
                   help="network: torchvision ImageNet resnet50/alexnet, the CIFAR-10 ResNets, "
                        "or a dnateq.models.TransformerTranslator checkpoint")
    g.add_argument("--weights", metavar="PATH|ENUM|DEFAULT|random",
                   help="resnet50/alexnet (required): a local checkpoint (state dict), a "
                        "torchvision weights name (IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2, "
                        "DEFAULT; read from torch hub's cache) or 'random'. CIFAR ResNets: "
                        "default the pretrained weights of the --cifar directory. transformer "
                        "(required): a checkpoint of TransformerTranslator.save_checkpoint")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint holding a pickled nn.Module (runs code from the file)")
    d = p.add_argument_group("data (one source)")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--imagenet", metavar="DIR",
                     help="ImageFolder root: DIR/train and DIR/val, or one folder of classes")
    src.add_argument("--cifar", metavar="DIR", nargs="?", const="",
                     help="the CIFAR-10 761-image subsets (default dir: the shared data dir, "
                          "$DNATEQ_SHARED_DATA or ../shared/data)")
    src.add_argument("--src", metavar="FILE", help="translation source sentences (with --ref)")
    d.add_argument("--ref", metavar="FILE", nargs="+",
                   help="translation reference(s), aligned with --src")
    d.add_argument("--limit", type=_positive_int, metavar="N",
                   help="evaluate N images (spread evenly over the classes) or the first N "
                        "sentences")
    d.add_argument("--resize", type=_positive_int, metavar="N",
                   help="ImageNet preprocessing: resize the short side to N (default 256; with a "
                        "torchvision weights name and no --resize/--crop, its own transforms)")
    d.add_argument("--crop", "--image-size", dest="crop", type=_positive_int, metavar="N",
                   help="ImageNet preprocessing: center crop N (default 224)")
    d.add_argument("--vocab", metavar="FILE",
                   help="transformer: whitespace-token vocabulary, one token per line (first "
                        "field), the source one (and the target one unless --tgt-vocab); ids "
                        "0-3 are <pad> <s> </s> <unk>")
    d.add_argument("--tgt-vocab", metavar="FILE", help="transformer: target vocabulary")
    d.add_argument("--decode", choices=("beam", "greedy"), default="beam",
                   help="transformer decoding (default beam: beam 4, length penalty 0.6)")
    d.add_argument("--beam-size", type=_positive_int, default=4, help="(default 4)")
    d.add_argument("--tokenize", default="13a", help="sacrebleu tokenizer (default 13a)")
    r = p.add_argument_group("runtime")
    r.add_argument("--batch-size", type=_positive_int, default=64, help="(default 64)")
    r.add_argument("--workers", type=_nonneg_int, default=None,
                   help="DataLoader workers (default 4 for ImageFolders, else 0)")
    r.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK when available)")
    r.add_argument("--seed", type=int, default=0, help="activation sub-sampling seed (default 0)")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


_QUANTIZE_EXAMPLES = """examples:
  python -m dnateq quantize --model resnet50 --weights IMAGENET1K_V1 \\
      --imagenet /data/imagenet --calib-images 512 --baselines --out runs/r50
  python -m dnateq quantize --model cifar-resnet20 --cifar --out runs/r20
  python -m dnateq quantize --model transformer --weights mt.pt --vocab vocab.txt \\
      --src newstest2014.en --ref newstest2014.de \\
      --calib-src newstest2013.en --calib-ref newstest2013.de --out runs/mt
  torchrun --nproc_per_node=8 -m dnateq quantize --model resnet50 ... --device cuda
"""

_EVAL_EXAMPLES = """examples:
  python -m dnateq eval --model resnet50 --weights IMAGENET1K_V1 --imagenet /data/imagenet
  python -m dnateq eval --model resnet50 --weights IMAGENET1K_V1 --imagenet /data/imagenet \\
      --quantized runs/r50/model.dnateq --json runs/r50/eval.json
"""


def add_quantize_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize", usage="python -m dnateq quantize --model MODEL [--weights W] "
                          "(--imagenet DIR | --cifar [DIR] | --src FILE --ref FILE) [options]",
        help="calibrate a model with DNA-TEQ, evaluate it, save model and report",
        description="Quantize a model with dnateq.quantize: float and quantized quality, the "
                    "per-layer report, the saved model (rank 0 writes under torchrun).",
        epilog=_QUANTIZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-dir", metavar="DIR",
                   help="ImageFolder of calibration images (default DIR/train of --imagenet)")
    c.add_argument("--calib-src", metavar="FILE", help="transformer: calibration sources")
    c.add_argument("--calib-ref", metavar="FILE", help="transformer: calibration targets")
    c.add_argument("--calib-images", type=_positive_int, default=512, metavar="N",
                   help="calibration images (sentence pairs for the transformer; default 512)")
    c.add_argument("--calib-batches", type=_positive_int, default=None, metavar="N",
                   help="batches traced per process (default: all calibration batches)")
    c.add_argument("--sample-size", type=_positive_int, default=1 << 18, metavar="N",
                   help="bound on each layer's traced activation sample (default 262144)")
    q = p.add_argument_group("DNA-TEQ options (dnateq.quantize)")
    q.add_argument("--metric", choices=("auto", "top1", "bleu", "proxy"), default="auto",
                   help="quality driving the threshold loop: auto = top1 (classification) or "
                        "bleu (translation), on the evaluated set; proxy = agreement with the "
                        "float model on held-out inputs, no labels (default auto)")
    q.add_argument("--max-loss", type=float, default=1.0,
                   help="allowed quality loss in the metric's units (points of top-1 or BLEU, "
                        "or percent for the proxy; default 1.0)")
    q.add_argument("--bits", type=parse_bits, default=[3, 4, 5, 6, 7],
                   help="candidate exponent bits n, e.g. 3-7 (default) or 3,4,5")
    q.add_argument("--search", choices=("golden", "paper"), default="golden",
                   help="base search of exp_fit (default golden; paper = Algorithm 1)")
    q.add_argument("--rounding", choices=("nearest", "log"), default="nearest",
                   help="default nearest; log = the paper's log-domain rounding")
    q.add_argument("--threshold-step", type=parse_fraction, default=0.01,
                   help="step of the Thr_w loop, as 0.01 or 1%% (default 1%%)")
    q.add_argument("--max-threshold", type=parse_fraction, default=0.30,
                   help="largest Thr_w tried (default 30%%)")
    q.add_argument("--first-layer-divisor", type=_positive_float, default=10.0,
                   help="the first layer uses Thr_w / this (default 10)")
    q.add_argument("--act-threshold-scale", type=_act_scale, default=1.0,
                   help="Thr_act = Thr_w * scale, or 'auto' (default 1.0)")
    q.add_argument("--skip", nargs="*", metavar="PATTERN", default=None,
                   help="layers left in float (names, prefixes, fnmatch patterns); transformer "
                        "default: the output projection 'generator' (the paper's 96 FC layers); "
                        "--skip with no pattern quantizes every layer")
    q.add_argument("--mode", choices=("lut", "count", "fake"), default="lut",
                   help="execution mode of the quantized layers (default lut)")
    q.add_argument("--method", choices=("sensitivity", "paper"), default=None,
                   help="bit allocation: sensitivity (default in one process: measured per layer, greedy under "
                        "max_loss, with the default mechanisms) or paper (the threshold rule, "
                        "reproduced exactly)")
    q.add_argument("--passes", nargs="*", metavar="PASS", default=None,
                   help="mechanisms to run: per_channel smoothing clip bias_correction "
                        "(default: the method's; --passes with none runs none)")
    q.add_argument("--baselines", action="store_true",
                   help="also evaluate uniform INT8 and uniform at DNA-TEQ's bits (paper and "
                        "storage conventions), calibrated on the same images")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", default="dnateq-out",
                   help="writes model.dnateq, report.md/.csv/.json, summary.json (default "
                        "./dnateq-out)")
    p.set_defaults(func=run_quantize, _parser=p)
    return p


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", usage="python -m dnateq eval --model MODEL [--weights W] "
                      "(--imagenet DIR | --cifar [DIR] | --src FILE --ref FILE) "
                      "[--quantized FILE] [options]",
        help="top-1/top-5 or BLEU of a float model or a saved quantized model",
        description="Evaluate the float model, or a quantized one saved by `quantize` "
                    "(--quantized, loaded onto the --model/--weights float model).",
        epilog=_EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--quantized", metavar="PATH", help="a model.dnateq file (dnateq.save)")
    p.add_argument("--mode", choices=("lut", "count", "fake"), default=None,
                   help="execution mode of the loaded quantized layers (default: as saved)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(func=run_eval, _parser=p)
    return p


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def _D():
    from .eval import distributed as D
    return D


def _say(*a, **k) -> None:
    """Print on rank 0 only."""
    if _D().is_main_process():
        print(*a, **k, flush=True)


def _warn(msg: str) -> None:
    if _D().is_main_process():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats become null, tuples lists, keys strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return _jsonable(x.item())
    return str(x)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")


def read_vocab(path: str):
    """A :class:`dnateq.models.Vocab` from a file with one token per line (the
    first whitespace-separated field, so ``token count`` files work); blank
    lines are ignored; ``<pad> <s> </s> <unk>`` keep ids 0-3 whether listed or not."""
    from .models import Vocab
    if not os.path.isfile(path):
        raise CLIError(f"vocabulary file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        toks = [ln.split()[0] for ln in f if ln.strip()]
    if not toks:
        raise CLIError(f"vocabulary file {path!r} is empty")
    return Vocab(toks)


def _last_linear(model: nn.Module) -> Optional[nn.Linear]:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


class _Chain:
    """The first ``limit`` batches of ``first`` (calibration), then those of
    ``second`` (held-out inputs for the proxy metric), lazily."""

    def __init__(self, first: Iterable, limit: int, second: Iterable):
        self.first, self.limit, self.second = first, int(limit), second

    def __iter__(self):
        for i, b in enumerate(self.first):
            if i >= self.limit:
                break
            yield b
        yield from self.second


# ---------------------------------------------------------------------------
# the task: model + data + evaluation
# ---------------------------------------------------------------------------

class Task:
    """What a command works on: ``model`` (float, CPU), ``kind``
    (``"classify"``/``"translate"``), ``calib_loader`` (or None), ``held_out``
    (held-out input batches for the proxy), ``evaluate(model) -> dict``,
    ``quality(model) -> float`` (the metric of the threshold loop) and
    ``data`` (a description for the summary)."""

    kind: str
    model: nn.Module
    calib_loader: Optional[Iterable] = None
    held_out: Optional[Iterable] = None
    main_metric: str = "top1"
    data: Dict[str, Any]
    evaluate: Callable[[nn.Module], Dict[str, Any]]
    quality: Callable[[nn.Module], float]


def _check_args(args, quantize: bool) -> None:
    """Static checks (no I/O beyond existence): raise CLIError."""
    m = args.model
    if args.imagenet is None and args.cifar is None and args.src is None:
        if m in _CIFAR_MODELS:
            args.cifar = ""      # the shared CIFAR subsets by default
        elif m == "transformer":
            raise CLIError("--model transformer needs --src FILE and --ref FILE")
        else:
            raise CLIError(f"--model {m} needs --imagenet DIR")
    if m == "transformer":
        if args.src is None:
            raise CLIError("--model transformer takes --src/--ref, not --imagenet/--cifar")
        if not args.ref:
            raise CLIError("--src needs --ref FILE (the references)")
        if not args.weights:
            raise CLIError("--model transformer needs --weights CHECKPOINT "
                           "(TransformerTranslator.save_checkpoint)")
        if not args.vocab:
            raise CLIError("--model transformer needs --vocab FILE (whitespace-token "
                           "vocabulary of the checkpoint)")
        for name in ("src", "vocab", "tgt_vocab"):
            v = getattr(args, name)
            if v is not None and not os.path.isfile(v):
                raise CLIError(f"--{name.replace('_', '-')} {v!r} does not exist")
        for r in args.ref:
            if not os.path.isfile(r):
                raise CLIError(f"--ref {r!r} does not exist")
        if args.crop or args.resize:
            raise CLIError("--resize/--crop apply to ImageNet models only")
    else:
        if args.src is not None or args.ref:
            raise CLIError(f"--src/--ref are for --model transformer, not {m}")
        if args.vocab or args.tgt_vocab:
            raise CLIError(f"--vocab/--tgt-vocab are for --model transformer, not {m}")
    if m in _IMAGENET_MODELS:
        if args.imagenet is None:
            raise CLIError(f"--model {m} evaluates on --imagenet DIR (an ImageFolder)")
        if not os.path.isdir(args.imagenet):
            raise CLIError(f"--imagenet {args.imagenet!r} is not a directory")
        if not args.weights:
            raise CLIError(f"--model {m} needs --weights: a checkpoint path, a torchvision "
                           "weights name (IMAGENET1K_V1, DEFAULT) or 'random'")
    if m in _CIFAR_MODELS:
        if args.imagenet is not None:
            raise CLIError(f"--model {m} takes --cifar [DIR], not --imagenet")
        if args.crop or args.resize:
            raise CLIError("--resize/--crop apply to ImageNet models only")
        from .models import shared_data_dir
        d = args.cifar or shared_data_dir()
        args.cifar = d
        if not os.path.isdir(d):
            raise CLIError(f"CIFAR data directory {d!r} does not exist (pass --cifar DIR or set "
                           "DNATEQ_SHARED_DATA)")
        for f in ("cifar10_test_761.npz",) + (("cifar10_train_761.npz",) if quantize else ()):
            if not os.path.isfile(os.path.join(d, f)):
                raise CLIError(f"{f} not found in the CIFAR data directory {d!r}")
    w = args.weights
    if (w and w.lower() not in _RANDOM and m != "transformer"
            and os.sep in w and not os.path.exists(w)):
        raise CLIError(f"--weights {w!r} does not exist")
    if m == "transformer" and not os.path.isfile(w):
        raise CLIError(f"--weights {w!r} does not exist")
    if quantize:
        if args.calib_dir is not None:
            if args.imagenet is None:
                raise CLIError("--calib-dir goes with --imagenet")
            if not os.path.isdir(args.calib_dir):
                raise CLIError(f"--calib-dir {args.calib_dir!r} is not a directory")
        if (args.calib_src is None) != (args.calib_ref is None):
            raise CLIError("--calib-src and --calib-ref go together")
        if args.calib_src is not None:
            if m != "transformer":
                raise CLIError("--calib-src/--calib-ref are for --model transformer")
            for name in ("calib_src", "calib_ref"):
                if not os.path.isfile(getattr(args, name)):
                    raise CLIError(f"--{name.replace('_', '-')} {getattr(args, name)!r} does "
                                   "not exist")
        if args.metric == "bleu" and m != "transformer":
            raise CLIError("--metric bleu is for --model transformer")
        if args.metric == "top1" and m == "transformer":
            raise CLIError("--metric top1 is for classifiers; use bleu or proxy")
        if args.threshold_step > args.max_threshold:
            raise CLIError(f"--threshold-step {args.threshold_step} exceeds --max-threshold "
                           f"{args.max_threshold}")
        if not (math.isfinite(args.max_loss) and args.max_loss >= 0):
            raise CLIError(f"--max-loss must be a finite number >= 0, got {args.max_loss}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise CLIError(f"--out {args.out!r} exists and is not a directory")
    else:
        if args.quantized is not None and not os.path.isfile(args.quantized):
            raise CLIError(f"--quantized {args.quantized!r} does not exist")
        if args.mode is not None and args.quantized is None:
            raise CLIError("--mode applies to a --quantized model")
        if args.json is not None:
            parent = os.path.dirname(os.path.abspath(args.json))
            if not os.path.isdir(parent):
                raise CLIError(f"--json {args.json!r}: directory {parent!r} does not exist")


def _build_model(args) -> nn.Module:
    from . import models as M
    m, w = args.model, args.weights
    if w and w.lower() in _RANDOM:
        _warn(f"--weights {w}: randomly initialized {m}; its accuracy means nothing")
        if m in _IMAGENET_MODELS:
            return M.torchvision_model(m, None)
        if m in _CIFAR_MODELS:
            return M.cifar_resnet(int(m[len("cifar-resnet"):])).eval()
    if m in _IMAGENET_MODELS:
        return M.torchvision_model(m, w, trust_checkpoint=args.trust_checkpoint)
    if m in _CIFAR_MODELS:
        depth = int(m[len("cifar-resnet"):])
        if not w:
            return M.pretrained_cifar_resnet(depth, args.cifar)
        from .models._checkpoint import load_into, read_state_dict
        what = f"dnateq.models.{m}"
        sd = read_state_dict(w, what=what, trust_checkpoint=args.trust_checkpoint)
        return load_into(M.cifar_resnet(depth), sd, what=what, source=w).eval()
    # transformer
    try:
        return M.TransformerTranslator.from_checkpoint(w, trust_checkpoint=args.trust_checkpoint)
    except ValueError as e:
        if "pass [" not in str(e):
            raise
        # no stored configuration: the vocabularies give the sizes
        sv = read_vocab(args.vocab)
        tv = read_vocab(args.tgt_vocab) if args.tgt_vocab else sv
        return M.TransformerTranslator.from_checkpoint(
            w, trust_checkpoint=args.trust_checkpoint, src_vocab=len(sv), tgt_vocab=len(tv))


def _image_transform(args):
    from . import eval as E
    from .models._checkpoint import looks_like_path
    w = args.weights
    enum_like = (w and w.lower() not in _RANDOM
                 and (not looks_like_path(w) or "_Weights." in w and not os.path.exists(w)))
    if enum_like and args.resize is None and args.crop is None:
        return E.imagenet_transforms(E.resolve_weights(w, args.model)), f"transforms of {w}"
    resize = args.resize or 256
    crop = args.crop or 224
    if args.resize is None and args.crop is not None:
        resize = max(crop, round(crop * 256 / 224))
    return E.imagenet_transforms(None, resize, crop), f"resize {resize}, center crop {crop}"


def _evenly(idx: Sequence[int], k: Optional[int]) -> List[int]:
    idx = list(idx)
    if k is None or k >= len(idx):
        return idx
    n = len(idx)
    return [idx[i * n // k] for i in range(k)]


def _classify_task(args, model: nn.Module, quantize: bool) -> Task:
    from torch.utils.data import Subset
    from . import eval as E
    D = _D()
    t = Task()
    t.kind, t.model, t.main_metric = "classify", model, "top1"
    workers = args.workers
    head = _last_linear(model)
    n_classes = head.out_features if head is not None else None
    data: Dict[str, Any] = {}
    calib_ds = None
    if args.imagenet is not None:
        if workers is None:
            workers = 4
        tf, tf_desc = _image_transform(args)
        root = args.imagenet
        val = os.path.join(root, "val")
        eval_root = val if os.path.isdir(val) else root
        ds = E.imagefolder_dataset(eval_root, transform=tf)
        classes = list(ds.classes)
        calib_root = None
        if quantize:
            train = os.path.join(root, "train")
            calib_root = args.calib_dir or (train if os.path.isdir(train) and eval_root == val
                                            else None)
        eval_idx = list(range(len(ds)))
        if quantize and calib_root is None:
            # one folder: calibration images and evaluated images are disjoint
            n = len(ds)
            k = min(args.calib_images, n // 2)
            if k < 1:
                raise CLIError(f"--imagenet {root!r} holds {n} image(s): too few to split into "
                               "calibration and evaluation images (pass --calib-dir)")
            cidx = _evenly(range(n), k)
            cset = set(cidx)
            eval_idx = [i for i in range(n) if i not in cset]
            calib_ds = Subset(ds, cidx)
            data["calibration"] = (f"{len(cidx)} images of {eval_root} (evenly spread), "
                                   "disjoint from the evaluated ones")
        elif quantize:
            cds = E.imagefolder_dataset(calib_root, transform=tf, limit=args.calib_images)
            ccls = list(getattr(cds, "classes", []))
            if ccls != classes:
                raise CLIError(f"the calibration folder {calib_root!r} has classes "
                               f"{ccls[:3]}... ({len(ccls)}) but the evaluated folder "
                               f"{eval_root!r} has {classes[:3]}... ({len(classes)}); the "
                               "labels would not match")
            calib_ds = cds
            data["calibration"] = f"{len(cds)} images of {calib_root} (evenly spread)"
        eval_idx = _evenly(eval_idx, args.limit)
        eval_ds = Subset(ds, eval_idx)
        data.update(source="imagenet", eval_root=eval_root, classes=len(classes),
                    preprocessing=tf_desc)
        if n_classes is not None and len(classes) > n_classes:
            raise CLIError(f"{eval_root!r} has {len(classes)} class folders but the model has "
                           f"{n_classes} outputs")
        if n_classes is not None and len(classes) != n_classes:
            _warn(f"{eval_root!r} has {len(classes)} class folders and the model {n_classes} "
                  "outputs: labels are the folders' sorted positions, so they must be the "
                  "model's first classes in its order")
    else:
        if workers is None:
            workers = 0
        eval_ds = E.cifar10_dataset("test", args.cifar, limit=args.limit)
        if quantize:
            calib_ds = E.cifar10_dataset("train", args.cifar, limit=args.calib_images)
            data["calibration"] = (f"the first {len(calib_ds)} CIFAR-10 training images of "
                                   f"{args.cifar}")
        data.update(source="cifar10", dir=args.cifar, classes=10)
    data["eval_images"] = len(eval_ds)
    bs = args.batch_size
    eval_loader = D.sharded_dataloader(eval_ds, bs, workers, pin_memory=False)
    t.eval_loader = eval_loader
    if calib_ds is not None:
        t.calib_loader = D.sharded_dataloader(calib_ds, bs, workers, pin_memory=False)
        t.held_out = eval_loader
    ks = (1, 5) if (n_classes or 10) >= 5 else (1,)
    progress = not args.no_progress

    def evaluate(mdl: nn.Module, desc: str = "top-k") -> Dict[str, Any]:
        r = E.evaluate_topk(mdl, eval_loader, topk=ks, progress=progress, desc=f"dnateq: {desc}")
        return {k: v for k, v in r.items()}

    def quality(mdl: nn.Module) -> float:
        return E.evaluate_topk(mdl, eval_loader, topk=(1,), progress=False)["top1"]

    t.evaluate, t.quality, t.data = evaluate, quality, data
    return t


def _translate_task(args, model: nn.Module, quantize: bool) -> Task:
    from . import eval as E
    from .models import translation_batches
    D = _D()
    t = Task()
    t.kind, t.model, t.main_metric = "translate", model, "bleu"
    sv = read_vocab(args.vocab)
    tv = read_vocab(args.tgt_vocab) if args.tgt_vocab else sv
    cfg = getattr(model, "config", {})
    for name, v, key in (("--vocab", sv, "src_vocab"),
                         ("--tgt-vocab" if args.tgt_vocab else "--vocab", tv, "tgt_vocab")):
        if key in cfg and len(v) != cfg[key]:
            raise CLIError(f"{name} has {len(v)} tokens (with the 4 specials) but the "
                           f"checkpoint's {key} is {cfg[key]}")
    src, refs = E.read_parallel(args.src, args.ref if len(args.ref) > 1 else args.ref[0],
                                args.limit)
    data: Dict[str, Any] = dict(source="translation", src=args.src, ref=list(args.ref),
                                sentences=len(src), decode=args.decode,
                                beam_size=args.beam_size if args.decode == "beam" else None)
    if quantize:
        if args.calib_src is not None:
            cs, cr = E.read_parallel(args.calib_src, args.calib_ref, args.calib_images)
            cr = cr[0]
            data["calibration"] = f"{len(cs)} pairs of {args.calib_src} / {args.calib_ref}"
        else:
            cs, cr = src[:args.calib_images], refs[0][:args.calib_images]
            data["calibration"] = (f"the first {len(cs)} pairs of the evaluated set (no "
                                   "--calib-src/--calib-ref given)")
            _warn("calibrating on the evaluated sentences; pass --calib-src/--calib-ref (e.g. "
                  "newstest2013) for a disjoint calibration set")
        r, w = D.rank(), D.world_size()
        cs, cr = cs[r::w], cr[r::w]        # this rank's shard (all of it in one process)
        sids = [sv.encode(s) for s in cs]
        tids = [tv.encode(s) for s in cr]
        t.calib_loader = translation_batches(sids, tids, args.batch_size, model.pad_id,
                                             model.bos_id) if sids else []
        # proxy: teacher-forced logits on held-out pairs of the evaluated set
        hs = src[r::w][: 4 * args.batch_size]
        hr = refs[0][r::w][: 4 * args.batch_size]
        t.held_out = translation_batches([sv.encode(s) for s in hs], [tv.encode(s) for s in hr],
                                         args.batch_size, model.pad_id, model.bos_id)
    progress = not args.no_progress

    def bleu(mdl: nn.Module, prog: bool) -> Dict[str, Any]:
        tr = E.make_translator(mdl, sv.encode, tv.decode, search=args.decode,
                               beam_size=args.beam_size)
        res = E.evaluate_bleu_texts(tr, src, refs, batch_size=args.batch_size, progress=prog,
                                    tokenize=args.tokenize)
        res.pop("hypotheses", None)
        return res

    t.evaluate = lambda mdl, desc="": bleu(mdl, progress)
    t.quality = lambda mdl: bleu(mdl, False)["bleu"]
    t.data = data
    return t


def _setup(args, quantize: bool) -> Task:
    """Checks, distributed init, model and data. Usage-type failures -> CLIError."""
    from . import eval as E
    from .persistence import DnateqFileError
    _check_args(args, quantize)
    E.init_distributed()
    D = _D()
    err: Optional[BaseException] = None
    task = None
    try:
        torch.manual_seed(args.seed)
        model = _build_model(args)
        if args.model == "transformer":
            task = _translate_task(args, model, quantize)
        else:
            task = _classify_task(args, model, quantize)
    except CLIError as e:
        err = e
    except (FileNotFoundError, ValueError, RuntimeError, TypeError, DnateqFileError) as e:
        err = CLIError(str(e))
    try:
        D.raise_if_any_failed(err, "setting up the model and data")
    except CLIError:
        raise
    except RuntimeError as e:          # another rank failed
        raise CLIError(str(e)) from None
    task.device = torch.device(args.device) if args.device else D.default_device()
    if task.device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available")
    return task


def make_task(argv: Sequence[str], quantize: bool = True) -> Task:
    """The model and data of a ``quantize`` (or ``eval``) command line, for
    scripts: ``argv`` holds the command's options (without the subcommand),
    e.g. ``["--model", "resnet50", "--weights", "IMAGENET1K_V1", "--imagenet",
    "/data/imagenet", "--limit", "5000"]``. Returns a :class:`Task`
    (``model``, ``calib_loader``, ``evaluate(model)``, ``quality(model)``,
    ``main_metric``, ``data``, ``device``). Usage errors raise :class:`CLIError`."""
    ap = argparse.ArgumentParser(prog="dnateq.cli.make_task")
    sub = ap.add_subparsers(dest="cmd", required=True)
    (add_quantize_parser if quantize else add_eval_parser)(sub)
    cmd = "quantize" if quantize else "eval"
    try:
        args = ap.parse_args([cmd, *[str(a) for a in argv]])
    except SystemExit:
        raise CLIError(f"invalid options for dnateq.cli.make_task: {list(argv)}") from None
    task = _setup(args, quantize)
    task.args = args
    return task


def _fmt_quality(task: Task, r: Dict[str, Any]) -> str:
    if task.kind == "classify":
        s = f"top-1 {r['top1']:.2f} %"
        if "top5" in r:
            s += f", top-5 {r['top5']:.2f} %"
        return s + f" ({r['n']} images)"
    return f"BLEU {r['bleu']:.2f} ({r['n']} sentences; {r['signature']})"


def _finish() -> None:
    D = _D()
    if D.is_distributed():
        D.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------

def run_quantize(args) -> int:
    import dnateq
    from . import baselines
    D = _D()
    task = _setup(args, quantize=True)
    dev = task.device
    progress = not args.no_progress and D.is_main_process()
    model = task.model.to(dev)
    world = D.world_size()
    if task.calib_loader is None or (D.all_reduce_sum([len(task.calib_loader)],
                                                      dtype=torch.int64)[0] == 0):
        raise CLIError("no calibration data")
    metric = args.metric
    if metric == "auto":
        metric = task.main_metric
    skip = args.skip
    if skip is None and args.model == "transformer":
        from .models import PAPER_SKIP
        skip = list(PAPER_SKIP)
    skip = list(skip) if skip else None
    n_calib = len(task.calib_loader)
    calib_batches = args.calib_batches or max(1, n_calib)
    _say(f"dnateq quantize: {args.model} on {dev}" + (f", {world} processes" if world > 1
                                                      else ""))
    for k, v in task.data.items():
        _say(f"  {k}: {v}")

    t0 = time.perf_counter()
    float_res = task.evaluate(model, "float32")
    t_float = time.perf_counter() - t0
    _say(f"float32: {_fmt_quality(task, float_res)}")

    if metric == "proxy":
        loader: Iterable = _Chain(task.calib_loader, calib_batches, task.held_out)
        eval_fn = None
    else:
        loader = task.calib_loader
        eval_fn = task.quality
    opts = dict(max_loss=args.max_loss, bits=args.bits, search=args.search,
                rounding=args.rounding, first_layer_divisor=args.first_layer_divisor,
                act_threshold_scale=args.act_threshold_scale,
                threshold_step=args.threshold_step, max_threshold=args.max_threshold,
                calib_batches=calib_batches, sample_size=args.sample_size, skip=skip,
                mode=args.mode, seed=args.seed, method=args.method, passes=args.passes)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        qmodel = dnateq.quantize(model, loader, eval_fn=eval_fn, progress=progress, **opts)
    t_quant = time.perf_counter() - t0
    for w in caught:
        _warn(str(w.message))
    if world > 1:
        digest = D.assert_same_across_ranks(qmodel, "quantized model")
    else:
        digest = None
    t0 = time.perf_counter()
    q_res = task.evaluate(qmodel, "DNA-TEQ")
    t_qeval = time.perf_counter() - t0
    _say(f"DNA-TEQ: {_fmt_quality(task, q_res)}")

    base = {}
    if args.baselines:
        uq = dict(calib_batches=calib_batches, skip=skip, progress=False, seed=args.seed)
        specs = [("int8", 8)] + [(f"uniform_{c}", baselines.bits_of(qmodel, c))
                                 for c in baselines.CONVENTIONS]
        for name, bits in specs:
            um = baselines.uniform_quantize(model, task.calib_loader, bits=bits, **uq)
            base[name] = task.evaluate(um, name)
            _say(f"{name}: {_fmt_quality(task, base[name])}")
            del um

    rep = dnateq.report(qmodel)
    tot = rep.totals
    info = qmodel.dnateq_info
    key = task.main_metric
    summary: Dict[str, Any] = dict(
        command="quantize", model=args.model, weights=args.weights, device=str(dev),
        world_size=world, data=task.data, metric=metric,
        metric_note=("selected on the evaluated set (the paper's protocol)" if metric != "proxy"
                     else "proxy: agreement with the float model on held-out inputs"),
        max_loss=args.max_loss,
        float=float_res, dnateq=q_res, loss=float_res[key] - q_res[key],
        avg_bits=tot["avg_bits"], storage_bits=tot["storage_bits"],
        compression_vs_int8=tot["compression_vs_int8"], bytes=dict(
            fp32=tot["bytes_fp32"], int8=tot["bytes_int8"], packed=tot["bytes_packed"]),
        layers=tot["layers"], weights_quantized=tot["weights"],
        bits_histogram=_histogram(r["n"] for r in rep.layers),
        threshold=info["threshold"], fallback=info["fallback"],
        method=info.get("method", "paper"), passes=info.get("passes", []),
        search_quality=dict(base=info["base_quality"], chosen=info["quality"]),
        timing=dict(float_eval=t_float, quantize=t_quant, quantized_eval=t_qeval,
                    **{f"quantize_{k}": v for k, v in info["timing"].items()}),
        options=dict(opts, bits=list(args.bits), calibration_images=args.calib_images),
        baselines=base, state_digest=digest,
        versions=dict(dnateq=dnateq.__version__, torch=torch.__version__),
    )
    if D.is_main_process():
        out = args.out
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "model.dnateq")
        summary["file"] = os.path.abspath(path)
        summary["file_bytes"] = dnateq.save(qmodel, path)
        md = _summary_markdown(summary) + "\n## Per-layer report\n\n" + rep.to_markdown()
        md += "\n## Threshold loop\n\n" + _history_markdown(info["history"])
        with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
            f.write(md)
        with open(os.path.join(out, "report.csv"), "w", encoding="utf-8") as f:
            f.write(rep.to_csv())
        _write_json(os.path.join(out, "report.json"),
                    dict(report=rep.to_dict(), calibration=info))
        _write_json(os.path.join(out, "summary.json"), summary)
        print()
        print(rep.to_markdown())
        print(_summary_text(summary))
        print(f"wrote {path} ({summary['file_bytes']} bytes), report.md, report.csv, "
              f"report.json, summary.json in {os.path.abspath(out)}")
    _finish()
    return 0


def _histogram(ns: Iterable[int]) -> Dict[str, int]:
    h: Dict[str, int] = {}
    for n in ns:
        h[str(n)] = h.get(str(n), 0) + 1
    return dict(sorted(h.items()))


def _qcell(s: Dict[str, Any], r: Dict[str, Any]) -> List[str]:
    if "bleu" in r:
        return [f"{r['bleu']:.2f}"]
    return [f"{r['top1']:.2f}", f"{r['top5']:.2f}" if "top5" in r else ""]


def _summary_rows(s: Dict[str, Any]):
    f = s["float"]
    cls = "top1" in f
    head = ["model", "top-1 %", "top-5 %", "weight bits"] if cls else ["model", "BLEU",
                                                                       "weight bits"]
    rows = [["float32"] + _qcell(s, f) + ["32"]]
    names = {"int8": ("uniform INT8", "8"),
             "uniform_paper": ("uniform, DNA-TEQ's n per layer (paper)", f"{s['avg_bits']:.3f}"),
             "uniform_storage": ("uniform, DNA-TEQ's storage bits", f"{s['storage_bits']:.3f}")}
    for k, (label, bits) in names.items():
        if k in s["baselines"]:
            rows.append([label] + _qcell(s, s["baselines"][k]) + [bits])
    rows.append(["DNA-TEQ"] + _qcell(s, s["dnateq"])
                + [f"{s['avg_bits']:.3f} (storage {s['storage_bits']:.3f})"])
    return head, rows


def _summary_markdown(s: Dict[str, Any]) -> str:
    head, rows = _summary_rows(s)
    lines = [f"# dnateq quantize: {s['model']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines += [f"- {line}" for line in _summary_facts(s)]
    return "\n".join(lines) + "\n"


def _summary_facts(s: Dict[str, Any]) -> List[str]:
    unit = "BLEU" if "bleu" in s["float"] else "points of top-1"
    c = s["compression_vs_int8"]
    thr = s["threshold"]
    facts = [
        f"loss {s['loss']:+.2f} {unit} on the evaluated set (max_loss {s['max_loss']:g} in the "
        f"{s['metric']} metric; {s['metric_note']})",
        (f"Thr_w = {'none (fallback to the largest n)' if thr is None else f'{100 * thr:.3g} %'}"
         if s.get("method", "paper") == "paper" else
         f"bit allocation: {s['method']} (mechanisms: "
         f"{', '.join(s.get('passes') or []) or 'none'})")
        + f"; layers per n: {s['bits_histogram']}",
        f"average bits {s['avg_bits']:.3f} (paper), {s['storage_bits']:.3f} (storage, with "
        f"sign); compression vs INT8 {100 * c['paper']:.1f} % (paper), "
        f"{100 * c['storage']:.1f} % (storage)",
        f"weights: FP32 {s['bytes']['fp32']} B, INT8 {s['bytes']['int8']} B, packed "
        f"{s['bytes']['packed']} B" + (f", saved file {s['file_bytes']} B" if "file_bytes" in s
                                       else ""),
        f"calibration: {s['data'].get('calibration')}; quantize took "
        f"{s['timing']['quantize']:.1f} s on {s['device']}"
        + (f" x {s['world_size']} processes" if s["world_size"] > 1 else ""),
    ]
    if s["fallback"]:
        facts.append("no configuration met max_loss: the all-max-bit configuration was "
                     "returned")
    return facts


def _summary_text(s: Dict[str, Any]) -> str:
    head, rows = _summary_rows(s)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    out += [f"- {x}" for x in _summary_facts(s)]
    return "\n".join(out)


def _history_markdown(history: List[Dict[str, Any]]) -> str:
    paper = all("threshold" in h for h in history)
    lines = [f"| {'Thr_w' if paper else 'avg bits'} | quality | loss | passed | layers per n |",
             "|---|---|---|---|---|"]
    for h in history:
        step = (f"{100 * h['threshold']:.3g} %" if paper else
                f"{h.get('avg_bits', h.get('budget', float('nan'))):.3f}")
        lines.append(f"| {step} | {h['quality']:.4g} | {h['loss']:+.4g} | "
                     f"{'yes' if h['passed'] else 'no'} | "
                     f"{' '.join(f'{k}b:{v}' for k, v in _histogram(h['bits'].values()).items())}"
                     " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------

def run_eval(args) -> int:
    import dnateq
    from .persistence import DnateqFileError
    D = _D()
    task = _setup(args, quantize=False)
    model = task.model
    what = "float32"
    if args.quantized is not None:
        err: Optional[BaseException] = None
        try:
            model = dnateq.load(args.quantized, model)
        except (DnateqFileError, FileNotFoundError) as e:
            err = CLIError(str(e))
        try:
            D.raise_if_any_failed(err, "loading the quantized model")
        except CLIError:
            raise
        except RuntimeError as e:
            raise CLIError(str(e)) from None
        if args.mode is not None:
            for m in model.modules():
                if isinstance(m, (dnateq.nn.ExpLinear, dnateq.nn.ExpConv2d)):
                    m.mode = args.mode
        what = "DNA-TEQ"
    model = model.to(task.device)
    t0 = time.perf_counter()
    res = task.evaluate(model, what)
    dt = time.perf_counter() - t0
    out = dict(command="eval", model=args.model, weights=args.weights,
               quantized=args.quantized, device=str(task.device), world_size=D.world_size(),
               data=task.data, result=res, seconds=dt)
    if args.quantized is not None:
        rep = dnateq.report(model)
        out.update(avg_bits=rep.totals["avg_bits"], storage_bits=rep.totals["storage_bits"])
    if D.is_main_process():
        print(f"{args.model} ({what}{', ' + args.quantized if args.quantized else ''}): "
              f"{_fmt_quality(task, res)} in {dt:.1f} s")
        if args.quantized is not None:
            print(f"average bits {out['avg_bits']:.3f} (paper), {out['storage_bits']:.3f} "
                  "(storage)")
        if args.json:
            _write_json(args.json, out)
    _finish()
    return 0
