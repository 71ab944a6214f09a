"""The embedded default of ``python -m dnateq demo``: a real model on real
data that ship with the install, offline.

A small CNN is trained at first run on scikit-learn's bundled handwritten
digits (1797 real 8x8 images; about 10 s on 2 cores) and cached under
``~/.cache/dnateq`` (``$DNATEQ_CACHE`` overrides); ``dnateq.quantize``
calibrates it on the training split with test accuracy as ``eval_fn``, and
the report prints float, INT8, uniform (DNA-TEQ's bits, both conventions) and
DNA-TEQ accuracy, average bits, compression and the saved file size.
"""
from __future__ import annotations

import os
import time
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import dnateq


def cache_dir() -> str:
    d = os.environ.get("DNATEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "dnateq")
    os.makedirs(d, exist_ok=True)
    return d


def digits_data(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float [N, 1, 8, 8] in [0, 1]; a fixed 75/25 split."""
    try:
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
    except ImportError as e:
        raise ImportError("dnateq demo: the digits data come with scikit-learn; "
                          "pip install scikit-learn (or dnateq[eval])") from e

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_train = int(0.75 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


class DigitsCNN(nn.Module):
    """conv(1->16)-ReLU-conv(16->32, stride 2)-ReLU-conv(32->32)-ReLU-FC(512->64)-ReLU-FC(64->10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return _top1(model(x), y)


def _top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == y).float().mean())


def fidelity(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """How close a quantized model's logits are to the float model's on the
    same images: top-1 agreement (percent) and mean cosine similarity."""
    return dict(agreement=100.0 * float((logits.argmax(1) == ref.argmax(1)).float().mean()),
                cosine=float(F.cosine_similarity(logits.float(), ref.float(), dim=1).mean()))


def paired_test(logits_a: torch.Tensor, logits_b: torch.Tensor, y: torch.Tensor) -> dict:
    """Exact McNemar test of two classifiers on the same images: ``a_only`` /
    ``b_only`` count the images only one of them gets right, ``p`` is the
    two-sided binomial p-value of that split (1.0 when they never differ). On
    450 test images one image is 0.22 points, so a gap of a few images is
    within chance; this says whether it is."""
    from scipy.stats import binomtest
    ra, rb = logits_a.argmax(1) == y, logits_b.argmax(1) == y
    a_only, b_only = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return dict(a_only=a_only, b_only=b_only, p=float(p))


def trained_model(x: torch.Tensor, y: torch.Tensor, seed: int = 0, verbose: bool = True) -> nn.Module:
    path = os.path.join(cache_dir(), f"digits_cnn_seed{seed}.pt")
    model = DigitsCNN()
    if os.path.exists(path):
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:  # a stale or corrupt cache: retrain
            pass
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for epoch in range(30):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    if verbose:
        print(f"trained the digits CNN in {time.perf_counter() - t0:.1f} s "
              f"(cached at {path})")
    torch.save(model.state_dict(), path)
    return model.eval()


def run(seed: int = 0, max_loss: float = 1.0, progress: bool = True) -> dict:
    """Trains (or loads) the CNN, quantizes it, prints the comparison; returns the figures."""
    x_tr, y_tr, x_te, y_te = digits_data(seed)
    model = trained_model(x_tr, y_tr, seed)
    acc_float = accuracy(model, x_te, y_te)
    loader = [(x_tr[i:i + 128], y_tr[i:i + 128]) for i in range(0, len(y_tr), 128)]
    t0 = time.perf_counter()
    qmodel = dnateq.quantize(model, loader, eval_fn=lambda m: accuracy(m, x_te, y_te),
                             max_loss=max_loss, progress=progress, seed=seed)
    dt = time.perf_counter() - t0
    acc_q = accuracy(qmodel, x_te, y_te)
    rep = dnateq.report(qmodel)
    tot = rep.to_dict()["totals"]
    # Baselines on the same layers, calibrated on the same batches.
    from . import baselines
    uq = dict(calib_batches=8, progress=False, seed=seed)
    uni_models = {conv: baselines.uniform_quantize(
        model, loader, bits=baselines.bits_of(qmodel, conv), **uq) for conv in baselines.CONVENTIONS}
    int8_model = baselines.uniform_quantize(model, loader, bits=8, **uq)
    with torch.no_grad():
        logits = {name: m.eval()(x_te) for name, m in
                  (("float", model), ("int8", int8_model), ("paper", uni_models["paper"]),
                   ("storage", uni_models["storage"]), ("dnateq", qmodel))}
    fid = {name: fidelity(v, logits["float"]) for name, v in logits.items()}
    acc_int8 = _top1(logits["int8"], y_te)
    acc_uni = {conv: _top1(logits[conv], y_te) for conv in baselines.CONVENTIONS}
    pair = paired_test(logits["dnateq"], logits["storage"], y_te)
    file_bytes = _saved_size(qmodel)
    print()
    print(rep.to_markdown())
    print()
    print(f"digits test set ({len(y_te)} real images), calibrated on {len(y_tr)} "
          f"training images in {dt:.1f} s")
    st = tot["storage_bits"]
    rows = [
        ("float32", acc_float, "float", "32", ""),
        ("INT8 uniform (W and A per tensor)", acc_int8, "int8", "8", ""),
        ("uniform, DNA-TEQ's n per layer (paper)", acc_uni["paper"], "paper",
         f"{tot['avg_bits']:.3f}", "uniform gets n bits, sign included"),
        ("uniform, DNA-TEQ's storage bits", acc_uni["storage"], "storage", f"{st:.3f}",
         "n + 1 for signed tensors"),
        ("DNA-TEQ", acc_q, "dnateq", f"{tot['avg_bits']:.3f} (+1 sign = {st:.3f})",
         f"loss {acc_float - acc_q:+.2f} points, allowed {max_loss}"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"  {'model':<{w}}  accuracy   agrees with float  cosine to float   weight bits")
    for name, acc, key, bits, note in rows:
        print(f"  {name:<{w}}  {acc:6.2f} %   {fid[key]['agreement']:6.2f} %"
              f"           {fid[key]['cosine']:.4f}            {bits}"
              + (f"   ({note})" if note else ""))
    verdict = ("a significant difference" if pair["p"] < 0.05 else
               "not a significant difference")
    print(f"  DNA-TEQ against uniform at equal storage bits: {pair['a_only']} images only "
          f"DNA-TEQ gets right, {pair['b_only']} only uniform does (exact McNemar p = "
          f"{pair['p']:.2f}, {verdict} at 5 %)")
    comp = tot["compression_vs_int8"]
    print(f"  compression vs INT8: {100 * comp['paper']:.1f} % (paper), "
          f"{100 * comp['storage']:.1f} % (storage); dnateq.save file {file_bytes} bytes "
          f"(FP32 weights {tot['bytes_fp32']}, INT8 {tot['bytes_int8']})")
    return dict(acc_float=acc_float, acc_dnateq=acc_q, acc_int8=acc_int8,
                acc_uniform=acc_uni, file_bytes=file_bytes, totals=tot, fidelity=fid,
                paired_vs_uniform_storage=pair)


def _saved_size(qmodel: nn.Module) -> int:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return dnateq.save(qmodel, os.path.join(d, "digits.dnateq"))
