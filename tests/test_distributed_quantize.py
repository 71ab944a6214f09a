"""``dnateq.quantize`` under ``torchrun`` (2 gloo processes, CPU) with a
sharded calibration loader, and ``python -m dnateq quantize`` under torchrun.

Launched once (module fixture): every rank calibrates a small CNN on its own
shard of a dataset; ``calibrate.trace_layers`` merges the per-layer traces, so
both ranks must build the same quantized model. Each rank writes the bits and
parameters of every layer and a state digest to JSON; the tests compare the
ranks with each other and with a single-process ``dnateq.quantize`` over the
union of the same batches.

When is the single-process result *exactly* the distributed one? The merged
trace of a layer keeps the union of both ranks' samples cut to the
``sample_size`` smallest random keys; the keys come from per-rank generators
(``seed + rank``), so once a layer's input exceeds ``sample_size`` the kept
subset differs from the single process's (seed ``seed``): a different, equally
uniform sample, hence slightly different fits. With ``sample_size`` at least
the number of traced elements nothing is dropped, the sample is every traced
value (in the same order: rank 0's batches, then rank 1's), and the exact
extremes are the same, so the fits, the bit choice and the codes are
identical, provided the quality metric is too: run 1 uses a metric every rank
computes on the same full held-out set (bit-identical to the single
process's). Run 2 sub-samples and uses the sharded, all-reduced top-1
(:func:`dnateq.eval.topk_eval_fn`): there the ranks must agree exactly with
each other, and only that is asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dnateq
from dnateq import eval as E
from dnateq.eval import distributed as D
from dnateq.models import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
N_CALIB, N_EVAL, BATCH = 26, 64, 4          # 26 = 13 per rank: uneven last batches
BIG = 1 << 20                               # >= every layer's traced elements
SMALL = 512                                 # forces sub-sampling


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN().eval()


def data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N_CALIB + N_EVAL, 3, 8, 8, generator=g)
    m = model()
    with torch.no_grad():
        y = m(x).argmax(1)                   # labels the float model gets right...
    flip = torch.arange(len(y)) % 4 == 0
    y = torch.where(flip, (y + 1) % 6, y)    # ...but for one in four
    calib = torch.utils.data.TensorDataset(x[:N_CALIB], y[:N_CALIB])
    ev = torch.utils.data.TensorDataset(x[N_CALIB:], y[N_CALIB:])
    return calib, ev


def replicated_quality(ev):
    """Top-1 agreement with the float model on the whole held-out set,
    computed by every rank on the same data (no collective): bit-identical
    everywhere."""
    xs = torch.stack([ev[i][0] for i in range(len(ev))])
    with torch.no_grad():
        ref = model()(xs).argmax(1)

    def q(m):
        with torch.no_grad():
            return 100.0 * float((m(xs).argmax(1) == ref).float().mean())
    return q


def rank_batches(calib, r: int):
    """The calibration batches rank ``r`` of 2 gets from sharded_dataloader."""
    return [b for b in torch.utils.data.DataLoader(
        torch.utils.data.Subset(calib, list(D.shard_indices(len(calib), r, WORLD))),
        batch_size=BATCH)]


def record(q: nn.Module) -> dict:
    layers = {}
    for n, m in q.named_modules():
        if isinstance(m, (dnateq.nn.ExpLinear, dnateq.nn.ExpConv2d)):
            layers[n] = dict(bits=m.bits, alpha=m.alpha, sw=m.sw, bw=m.bw, sa=m.sa, ba=m.ba,
                             a_signed=m.a_signed,
                             codes=m.w_packed.reshape(-1).tolist()[:64])
    return dict(layers=layers, threshold=q.dnateq_info["threshold"],
                quality=q.dnateq_info["quality"], digest=D.assert_same_across_ranks(q))


OPTS = dict(max_loss=3.0, threshold_step=0.03, max_threshold=0.15, progress=False, seed=3,
            method="paper")


# ---------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------

def worker(d: Path, cli_args: list) -> None:
    assert E.init_distributed(backend="gloo")
    r = D.rank()
    calib, ev = data()
    loader = D.sharded_dataloader(calib, BATCH)
    assert [len(b[0]) for b in loader] == [len(b[0]) for b in rank_batches(calib, r)]
    out = dict(rank=r, world=D.world_size())
    q1 = dnateq.quantize(model(), loader, eval_fn=replicated_quality(ev),
                         calib_batches=100, sample_size=BIG, **OPTS)
    out["exact"] = record(q1)
    ev_loader = D.sharded_dataloader(ev, BATCH)
    q2 = dnateq.quantize(model(), loader, eval_fn=E.topk_eval_fn(ev_loader),
                         calib_batches=100, sample_size=SMALL, **OPTS)
    out["sampled"] = record(q2)
    out["sampled_top1"] = E.evaluate_topk(q2, ev_loader, topk=(1,), progress=False)
    (d / f"rank{r}.json").write_text(json.dumps(out))
    if cli_args:
        # the CLI under torchrun (it ends the process group itself)
        from dnateq.__main__ import main
        rc = main(cli_args)
        (d / f"cli_rc{r}.txt").write_text(str(rc))
    else:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------

def has_cifar() -> bool:
    dd = shared_data_dir()
    return all(os.path.isfile(os.path.join(dd, f)) for f in
               ("resnet20_cifar10.th", "cifar10_test_761.npz", "cifar10_train_761.npz"))


CLI = ["quantize", "--model", "cifar-resnet20", "--limit", "61", "--calib-images", "33",
       "--batch-size", "16", "--sample-size", "4096", "--bits", "3-7", "--threshold-step", "4%",
       "--max-threshold", "8%", "--no-progress"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    d = tmp_path_factory.mktemp("distq")
    cli_args = CLI + ["--out", str(d / "cli")] if has_cifar() else []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", str(Path(__file__).resolve()), "--worker", str(d),
           json.dumps(cli_args)]
    p = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        pytest.fail(f"torchrun failed (exit {p.returncode}):\n{p.stdout[-4000:]}\n"
                    f"{p.stderr[-6000:]}")
    ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return d, ranks, p.stdout, bool(cli_args)


@pytest.mark.slow
def test_ranks_build_the_same_quantized_model(launched):
    _, ranks, _, _ = launched
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2
    for key in ("exact", "sampled"):
        a, b = ranks[0][key], ranks[1][key]
        assert a == b, key                  # bits, parameters, codes, threshold, digest
        assert len(a["layers"]) == 4
        assert {v["bits"] for v in a["layers"].values()} <= {3, 4, 5, 6, 7}
    assert ranks[0]["sampled_top1"] == ranks[1]["sampled_top1"]
    assert ranks[0]["sampled_top1"]["n"] == N_EVAL     # sharded evaluation covers all


@pytest.mark.slow
def test_distributed_equals_single_process_over_the_union(launched):
    _, ranks, _, _ = launched
    calib, ev = data()
    union = rank_batches(calib, 0) + rank_batches(calib, 1)   # the same batches, one process
    q = dnateq.quantize(model(), union, eval_fn=replicated_quality(ev), calib_batches=100,
                        sample_size=BIG, **OPTS)
    single = json.loads(json.dumps(record(q)))
    assert single == ranks[0]["exact"]      # exact: fits, bits, codes, threshold, digest
    # the loop did something: it stopped at a failing threshold and kept the one
    # before, with fewer bits than the all-7 fallback
    assert single["threshold"] is not None and single["threshold"] < OPTS["max_threshold"]
    assert min(v["bits"] for v in single["layers"].values()) < 7


@pytest.mark.slow
@pytest.mark.real
def test_cli_quantize_under_torchrun(launched):
    d, _, stdout, ran = launched
    if not ran:
        pytest.skip(f"real data not found in {shared_data_dir()} (set DNATEQ_SHARED_DATA)")
    assert (d / "cli_rc0.txt").read_text() == "0" and (d / "cli_rc1.txt").read_text() == "0"
    s = json.loads((d / "cli" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["state_digest"]            # ranks checked equal
    assert s["float"]["n"] == s["dnateq"]["n"] == 61             # shards summed, no padding
    assert s["float"]["top1"] - s["dnateq"]["top1"] <= 1.0 + 1e-9
    assert stdout.count("wrote ") == 1                           # rank 0 alone writes/prints
    assert stdout.count("| conv1 | Conv2d |") == 1
    # the saved model evaluates to the same top-1 in a single process
    from dnateq.__main__ import main
    assert main(["eval", "--model", "cifar-resnet20", "--limit", "61", "--no-progress",
                 "--quantized", str(d / "cli" / "model.dnateq"),
                 "--json", str(d / "e.json")]) == 0
    assert json.loads((d / "e.json").read_text())["result"]["correct"] == s["dnateq"]["correct"]


if __name__ == "__main__" and "--worker" in sys.argv:
    i = sys.argv.index("--worker")
    worker(Path(sys.argv[i + 1]), json.loads(sys.argv[i + 2]))
