"""Fuzz test of dnateq.load (issue 14): random truncations, bit flips, byte
overwrites, and corruptions inside a still-valid zip (the pickle, a tensor
record). Every corrupted file must either raise DnateqFileError or load a model
bit-identical to the original: never another exception, never a silently
different model.

DNATEQ_FUZZ_EXAMPLES sets the number of corrupted files (default 200, a few
seconds); e.g. DNATEQ_FUZZ_EXAMPLES=5000 for a long run.
"""
from __future__ import annotations

import io
import os
import random
import zipfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dnateq
from dnateq.persistence import DnateqFileError

EXAMPLES = int(os.environ.get("DNATEQ_FUZZ_EXAMPLES", "200"))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.lin = nn.Linear(4 * 4 * 4, 8)
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x))).flatten(1)
        y = self.lin(y).unsqueeze(0)
        return self.attn(y, y, y)[0].squeeze(0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 3, 6, 6, generator=g) for _ in range(2)]
    q = dnateq.quantize(model, batches, progress=False, bits=(3, 4), max_loss=100.0)
    path = tmp_path_factory.mktemp("fuzz") / "q.dnateq"
    dnateq.save(q, path)
    return model, path.read_bytes(), dnateq.load(path, model)


def _fingerprint(m: nn.Module):
    sd = m.state_dict()
    tensors = {k: (v.dtype, tuple(v.shape), v.detach().cpu().contiguous().view(-1)
                   .view(torch.uint8).clone() if v.numel() else None)
               for k, v in sd.items() if isinstance(v, torch.Tensor)}
    others = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    types = {n: type(x).__name__ for n, x in m.named_modules()}
    return tensors, others, types, getattr(m, "dnateq_info", None)


def _same(a: nn.Module, b: nn.Module) -> bool:
    ta, oa, ya, ia = _fingerprint(a)
    tb, ob, yb, ib = _fingerprint(b)
    if ta.keys() != tb.keys() or oa != ob or ya != yb or ia != ib:
        return False
    for k, (dt, shape, raw) in ta.items():
        dt2, shape2, raw2 = tb[k]
        if dt != dt2 or shape != shape2:
            return False
        if raw is not None and not torch.equal(raw, raw2):
            return False
    return True


def _rezip(data: bytes, mutate) -> bytes:
    """Rewrite the archive with ``mutate(name, bytes) -> bytes`` applied to each
    member: the zip (and its CRCs) stays valid, only the content changes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, mutate(info.filename, zin.read(info.filename)))
    return out.getvalue()


def _flip_bits(b: bytes, rng: random.Random, k: int) -> bytes:
    b = bytearray(b)
    for _ in range(k):
        p = rng.randrange(len(b) * 8)
        b[p // 8] ^= 1 << (p % 8)
    return bytes(b)


def corrupt(data: bytes, rng: random.Random, i: int):
    kind = ("truncate", "flip", "overwrite", "pickle", "tensor")[i % 5]
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "flip":
        return kind, _flip_bits(data, rng, rng.choice((1, 1, 2, 3)))
    if kind == "overwrite":
        b = bytearray(data)
        p = rng.randrange(len(b))
        n = rng.randint(1, 16)
        b[p:p + n] = bytes(rng.randrange(256) for _ in range(len(b[p:p + n])))
        return kind, bytes(b)
    target = "data.pkl" if kind == "pickle" else "/data/"
    members = [n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if target in n]
    victim = rng.choice(members)
    k = rng.choice((1, 1, 2, 4))
    return kind, _rezip(data, lambda n, b: _flip_bits(b, rng, k) if n == victim and b else b)


def test_corrupted_files_raise_dnateq_file_error_or_load_identically(tmp_path, saved):
    model, data, reference = saved
    rng = random.Random(20261203)
    bad, counts = [], {}
    path = tmp_path / "c.dnateq"
    for i in range(EXAMPLES):
        kind, b = corrupt(data, rng, i)
        path.write_bytes(b)
        try:
            m = dnateq.load(path, model)
        except DnateqFileError as e:
            assert str(path) in str(e)
            outcome = "error"
        except Exception as e:   # noqa: BLE001 - the point of the test
            bad.append(f"#{i} {kind}: {type(e).__name__}: {str(e)[:200]}")
            continue
        else:
            outcome = "identical" if _same(m, reference) else "DIFFERENT"
            if outcome == "DIFFERENT":
                bad.append(f"#{i} {kind}: loaded a model that differs from the saved one")
        counts[(kind, outcome)] = counts.get((kind, outcome), 0) + 1
    assert not bad, f"{len(bad)} of {EXAMPLES} corrupted files:\n" + "\n".join(bad[:20])
    # the corruptions reach the checks (not all of them absorbed by the zip layer)
    assert counts.get(("pickle", "error"), 0) > 0 and counts.get(("tensor", "error"), 0) > 0


def test_uncorrupted_file_loads_identically(tmp_path, saved):
    model, data, reference = saved
    path = tmp_path / "ok.dnateq"
    path.write_bytes(_rezip(data, lambda n, b: b))
    assert _same(dnateq.load(path, model), reference)
