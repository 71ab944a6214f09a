"""dnateq.eval under torch.distributed: exact sharding, all-reduced top-k,
gathered BLEU hypotheses, merged calibration traces, and errors that reach
every rank instead of hanging them.

The multi-process checks launch this file once under
``python -m torch.distributed.run --standalone --nproc_per_node=2`` (gloo,
CPU); every rank writes its results to JSON and the tests compare them with
the same evaluations run here in a single process. The stand-in data have
sizes that 2 does not divide (13 images, 7 sentences, 5 trace batches), so
the shards are uneven.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dnateq  # noqa: F401  (loads the operators)
from dnateq import eval as E
from dnateq.calibrate import _Trace
from dnateq.eval import distributed as D
from dnateq.nn import ExpLinear
from dnateq.models import TransformerTranslator, Vocab, pretrained_cifar_resnet, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]
N_IMAGES = 13                        # 2 per class, 3 in the last one
RANKS = [0, 0, 1, 0, 4, 5, 0, 3, 0, 2, 5, 0, 1]
SRC = ["ein kleiner Test .", "das Haus ist rot .", "guten Morgen", "wir sehen uns morgen .",
       "die Katze schläft", "es regnet", "ein roter Hund"]
REF = ["a small test .", "the house is red .", "good morning", "see you tomorrow .",
       "the cat sleeps", "it rains", "a red dog"]
BIG, SMALL = 1 << 16, 40             # trace sample sizes: keeps everything / subsamples


# ---------------------------------------------------------------------------
# stand-ins (used by both the workers and the single-process references)
# ---------------------------------------------------------------------------

def labels() -> list:
    return [min(i // 2, len(CLASSES) - 1) for i in range(N_IMAGES)]


class TableModel(nn.Module):
    """Reads the image id from the red channel (10 * id) and returns ``table[id]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        red = x[:, 0].mean((1, 2)) * E.IMAGENET_STD[0] + E.IMAGENET_MEAN[0]
        return self.table[torch.round(red * 255 / 10).long()]


def table() -> torch.Tensor:
    rows = []
    for r, y in zip(RANKS, labels()):
        others = [c for c in range(len(CLASSES)) if c != y]
        order = others[:r] + [y] + others[r:]
        row = torch.empty(len(CLASSES))
        for pos, c in enumerate(order):
            row[c] = float(len(CLASSES) - pos)
        rows.append(row)
    return torch.stack(rows)


def make_stand_ins(d: Path) -> None:
    from PIL import Image
    for i, y in enumerate(labels()):
        cls = d / "val" / CLASSES[y]
        cls.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 7 * i, 36), (10 * i, 100, 50)).save(cls / f"im{i:02d}.png")
    (d / "src.txt").write_text("\n".join(SRC) + "\n", encoding="utf-8")
    (d / "ref.txt").write_text("\n".join(REF) + "\n", encoding="utf-8")
    vocab = Vocab.build(SRC + REF)
    torch.manual_seed(0)
    m = TransformerTranslator(len(vocab), len(vocab), d_model=16, nhead=2, num_encoder_layers=1,
                              num_decoder_layers=1, dim_feedforward=32, dropout=0.0)
    m.save_checkpoint(d / "translator.pt")


def translator(d: Path, search: str):
    vocab = Vocab.build(SRC + REF)
    model = TransformerTranslator.from_checkpoint(d / "translator.pt")
    return E.make_translator(model, vocab.encode, vocab.decode, search=search, beam_size=3,
                             max_len_b=4)


def trace_batches() -> list:
    """5 activation batches; only batch 3 has negative values, batch 1 has the
    largest magnitude, batch 4 the smallest nonzero one."""
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(5):
        x = torch.rand(6, 7, generator=g) + 0.5
        x[0, 0] = 0.0
        if i == 1:
            x[2, 3] = 9.0
        if i == 3:
            x[1, 1] = -0.7
        if i == 4:
            x[3, 3] = 1e-3
        out.append(x)
    return out


def run_trace(batches, size: int, seed: int) -> _Trace:
    g = torch.Generator()
    g.manual_seed(seed)
    t = _Trace(size, g)
    for b in batches:
        t.add(b, "layer")
    return t


def trace_record(t: _Trace) -> dict:
    return dict(lo=t.lo, hi=t.hi, lo_val=t.lo_val, hi_val=t.hi_val, negative=t.negative,
                count=t.count, calls=t.calls, n=int(t.vals.numel()),
                vmin=getattr(t, "vmin", None), vmax=getattr(t, "vmax", None),
                vals=sorted(t.vals.tolist()), keys=t.keys.tolist())


def jsonable(x):
    return json.loads(json.dumps(x))


# ---------------------------------------------------------------------------
# the worker (one per rank, under torchrun)
# ---------------------------------------------------------------------------

def worker(d: Path) -> None:
    assert E.init_distributed(backend="gloo")
    r, w = D.rank(), D.world_size()
    out: dict = dict(rank=r, world=w)

    model = TableModel(table())
    out["imagenet"] = E.evaluate_imagenet(model, d / "val", batch_size=4, workers=0,
                                          progress=False)
    out["imagenet_limit"] = E.evaluate_imagenet(model, d / "val", batch_size=2, workers=1,
                                                limit=7, topk=(1, 2), progress=True)
    out["unsharded"] = E.evaluate_imagenet(model, d / "val", batch_size=4, workers=0,
                                           progress=False, distributed=False)
    loader = E.imagefolder_loader(d / "val", batch_size=3, workers=0)
    out["my_labels"] = [int(v) for _, y in loader for v in y]

    for search in ("greedy", "beam"):
        res = E.evaluate_bleu(translator(d, search), d / "src.txt", d / "ref.txt", batch_size=2,
                              progress=False, output_path=d / f"hyp_{search}.txt")
        out[f"bleu_{search}"] = res

    # errors on every rank, and on one rank only: nobody hangs
    try:
        E.evaluate_imagenet(model, d / "val", topk=(1, 7), workers=0, progress=False)
    except ValueError as e:
        out["err_all"] = str(e)

    def flaky(xs):
        if D.rank() == 1:
            raise ValueError("rank 1 cannot translate")
        return xs
    try:
        E.evaluate_bleu(flaky, d / "src.txt", d / "ref.txt", progress=False)
    except Exception as e:
        out["err_one"] = f"{type(e).__name__}: {e}"

    # collectives
    out["gathered"] = D.gather_in_order(list(D.shard_indices(9)),
                                        [f"item{i}" for i in D.shard_indices(9)], 9)
    out["reduced"] = D.all_reduce_sum([1, r + 1], dtype=torch.int64).tolist()
    out["broadcast"] = D.broadcast_object({"from": r}, src=1)

    # a replicated model passes the check; a rank-dependent one fails everywhere
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    out["digest"] = D.assert_same_across_ranks(net)
    with torch.no_grad():
        net.bias[0] += r
    try:
        D.assert_same_across_ranks(net, "quantized model")
    except RuntimeError as e:
        out["err_digest"] = str(e)

    # calibration traces: each rank traces its batches, then the merge
    mine = trace_batches()[r::w]
    for size in (BIG, SMALL):
        t = run_trace(mine, size, seed=100 + r)
        D.merge_traces({"layer": t})
        out[f"trace_{size}"] = trace_record(t)

    # the real CIFAR subset, when present
    if os.path.isfile(os.path.join(shared_data_dir(), "resnet20_cifar10.th")):
        net = pretrained_cifar_resnet(20)
        out["cifar"] = E.evaluate_topk(net, E.cifar10_loader("test", batch_size=32, limit=101),
                                       progress=False)
    (d / f"rank{r}.json").write_text(json.dumps(jsonable(out)))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------
# tests: single process (no launch)
# ---------------------------------------------------------------------------

def test_shards_partition_exactly():
    for n in range(0, 12):
        for w in range(1, 5):
            parts = [list(D.ShardSampler(n, r, w)) for r in range(w)]
            flat = sorted(i for p in parts for i in p)
            assert flat == list(range(n))                   # no padding, no duplicates
            assert [len(p) for p in parts] == [len(D.ShardSampler(n, r, w)) for r in range(w)]
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert list(D.ShardSampler(5)) == [0, 1, 2, 3, 4]       # no process group: everything
    with pytest.raises(ValueError, match="rank"):
        D.shard_indices(5, 2, 2)


def test_helpers_are_identities_in_one_process():
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1
    assert D.is_main_process()
    assert not E.init_distributed()            # WORLD_SIZE unset: stays single-process
    assert D.all_reduce_sum([1, 2], dtype=torch.int64).tolist() == [1, 2]
    assert D.all_gather_objects("x") == ["x"] and D.broadcast_object(3) == 3
    assert D.gather_in_order([2, 0, 1], ["c", "a", "b"], 3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="produced by no rank"):
        D.gather_in_order([0], ["a"], 2)
    with pytest.raises(RuntimeError, match="two ranks"):
        D.gather_in_order([0, 0], ["a", "b"], 2)
    t = run_trace(trace_batches(), BIG, 0)
    before = trace_record(t)
    D.merge_traces({"layer": t})
    assert trace_record(t) == before
    D.raise_if_any_failed(None, "nothing")
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    q = copy.deepcopy(net)
    q[0] = ExpLinear.from_float(net[0], 4, a_params=(1.0, 0.0))   # packed codes + extra state
    assert D.assert_same_across_ranks(q) == D.assert_same_across_ranks(copy.deepcopy(q))
    assert D.assert_same_across_ranks(q) != D.assert_same_across_ranks(net)
    with pytest.raises(KeyError):
        D.raise_if_any_failed(KeyError("x"), "x")
    ds = torch.utils.data.TensorDataset(torch.arange(7))
    batches = [b[0].tolist() for b in D.sharded_dataloader(ds, 3)]
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="batch_size"):
        D.sharded_dataloader(ds, 0)
    with pytest.raises(ValueError, match="workers"):
        D.sharded_dataloader(ds, 2, workers=-1)


# ---------------------------------------------------------------------------
# tests: two processes under torchrun (gloo, CPU)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    make_stand_ins(d)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")   # single node: loopback is enough
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", str(Path(__file__).resolve()), "--worker", str(d)]
    p = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        pytest.fail(f"torchrun failed (exit {p.returncode}):\n{p.stdout[-4000:]}\n"
                    f"{p.stderr[-6000:]}")
    ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return d, ranks, p.stderr


@pytest.mark.slow
def test_launch_ran_two_gloo_ranks(launched):
    _, ranks, _ = launched
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert ranks[0]["my_labels"] == labels()[0::2] and ranks[1]["my_labels"] == labels()[1::2]
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == [f"item{i}" for i in range(9)]
    assert ranks[0]["reduced"] == ranks[1]["reduced"] == [2, 3]
    assert ranks[0]["broadcast"] == ranks[1]["broadcast"] == {"from": 1}
    assert ranks[0]["digest"] == ranks[1]["digest"]
    for r in ranks:
        assert "quantized model differs between ranks" in r["err_digest"]


@pytest.mark.slow
def test_sharded_topk_equals_single_process(launched):
    d, ranks, stderr = launched
    model = TableModel(table())
    single = E.evaluate_imagenet(model, d / "val", batch_size=5, workers=0, progress=False)
    assert single["n"] == 13 and single["correct"] == {1: 6, 5: 11}
    for r in ranks:
        assert r["imagenet"] == jsonable(single)
        assert r["unsharded"] == jsonable(single)   # distributed=False: the whole set, locally
    lim = E.evaluate_imagenet(model, d / "val", batch_size=7, workers=0, limit=7, topk=(1, 2),
                              progress=False)
    for r in ranks:
        assert r["imagenet_limit"] == jsonable(lim)
    assert stderr.count("dnateq: ImageNet") >= 1   # rank 0's bar (rank 1 draws none)


@pytest.mark.slow
def test_sharded_bleu_equals_single_process(launched):
    d, ranks, _ = launched
    for search in ("greedy", "beam"):
        single = E.evaluate_bleu(translator(d, search), d / "src.txt", d / "ref.txt",
                                 batch_size=3, progress=False)
        for r in ranks:
            got = r[f"bleu_{search}"]
            assert got["hypotheses"] == single["hypotheses"]
            assert got["bleu"] == single["bleu"] and got["signature"] == single["signature"]
            assert got["n"] == 7
        written = (d / f"hyp_{search}.txt").read_text(encoding="utf-8").split("\n")[:-1]
        assert written == single["hypotheses"]


@pytest.mark.slow
def test_errors_reach_every_rank(launched):
    _, ranks, _ = launched
    for r in ranks:
        assert "topk=(1, 7)" in r["err_all"]
    assert ranks[1]["err_one"] == "ValueError: rank 1 cannot translate"
    assert ranks[0]["err_one"].startswith("RuntimeError: dnateq.eval: evaluate_bleu failed on "
                                          "1 other rank")


@pytest.mark.slow
def test_merged_traces_equal_the_single_process_trace(launched):
    _, ranks, _ = launched
    single = trace_record(run_trace(trace_batches(), BIG, seed=0))
    for r in ranks:
        got = r[f"trace_{BIG}"]
        for k in ("lo", "hi", "lo_val", "hi_val", "negative", "count", "calls", "n", "vals",
                  "vmin", "vmax"):
            assert got[k] == single[k], k   # JSON round-trips floats exactly
    assert single["negative"] and single["hi"] == 9.0 and single["lo"] == pytest.approx(1e-3)
    assert single["calls"] == 5 and single["count"] == 5 * 42
    if single["vmin"] is not None:
        assert single["vmin"] == pytest.approx(-0.7) and single["vmax"] == 9.0
    # sub-sampled: the bound holds, values come from the data, ranks agree exactly
    small = [r[f"trace_{SMALL}"] for r in ranks]
    assert small[0] == small[1]
    assert small[0]["n"] == SMALL and small[0]["count"] == 5 * 42
    data = {round(v, 6) for b in trace_batches() for v in b.flatten().tolist()}
    assert all(round(v, 6) in data for v in small[0]["vals"])
    # the kept keys are the smallest of the union of both ranks' keys
    assert max(small[0]["keys"]) <= 1.0 and len(set(small[0]["keys"])) == SMALL


@pytest.mark.slow
@pytest.mark.real
def test_sharded_cifar_resnet20_equals_single_process(launched):
    _, ranks, _ = launched
    if not os.path.isfile(os.path.join(shared_data_dir(), "resnet20_cifar10.th")):
        pytest.skip(f"real data not found in {shared_data_dir()} (set DNATEQ_SHARED_DATA)")
    net = pretrained_cifar_resnet(20)
    single = E.evaluate_topk(net, E.cifar10_loader("test", batch_size=101, limit=101),
                             progress=False)
    assert single["n"] == 101
    for r in ranks:
        assert r["cifar"] == jsonable(single)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
