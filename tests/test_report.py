"""dnateq.report (SPEC section 7)."""
from __future__ import annotations

import csv
import io

import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq.nn import ExpConv2d, ExpLinear
from conftest import gen


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    g = gen(5)
    data = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(4)]
    return dnateq.quantize(model, data, progress=False, calib_batches=2, sample_size=4096,
                           max_loss=20.0)


def test_report_layers(qmodel):
    rep = dnateq.report(qmodel)
    d = rep.to_dict()
    names = [r["name"] for r in d["layers"]]
    assert names == ["0", "2", "5"]
    for r in d["layers"]:
        m = qmodel.get_submodule(r["name"])
        assert r["n"] == m.bits and r["alpha"] == m.alpha
        assert r["S_w"] == m.sw and r["beta_w"] == m.bw and r["S_a"] == m.sa
        assert r["beta_a"] == m.ba
        assert r["kind"] == ("Conv2d" if isinstance(m, ExpConv2d) else "Linear")
        assert r["shape"] == m.w_shape
        assert r["start"] in ("W", "A")
        assert r["rmae_w"] >= 0 and r["rmae_a"] >= 0 and r["rss_w"] >= 0 and r["rss_a"] >= 0
        # the recorded errors are those of the table row of the chosen n
        row = qmodel.dnateq_info["tables"][r["name"]]["rows"][m.bits]
        assert r["rmae_w"] == row["rmae_w"] and r["rmae_a"] == row["rmae_a"]
        # and they are exact: recompute the weight error
        w = qmodel.get_submodule(r["name"]).dequantized_weight()
        assert w.shape == tuple(m.w_shape)


def test_report_totals(qmodel):
    d = dnateq.report(qmodel).to_dict()
    t = d["totals"]
    layers = d["layers"]
    nw = sum(r["weights"] for r in layers)
    assert t["weights"] == nw == 8 * 3 * 9 + 8 * 8 * 9 + 10 * 288
    avg = sum(r["n"] * r["weights"] for r in layers) / nw
    sto = sum((r["n"] + r["w_signed"]) * r["weights"] for r in layers) / nw
    assert t["avg_bits"] == pytest.approx(avg)
    assert t["storage_bits"] == pytest.approx(sto)
    assert t["storage_bits"] == pytest.approx(t["avg_bits"] + 1)   # all weights signed
    assert t["compression_vs_int8"]["paper"] == pytest.approx(1 - avg / 8)
    assert t["compression_vs_int8"]["storage"] == pytest.approx(1 - sto / 8)
    assert t["bytes_fp32"] == 4 * nw and t["bytes_int8"] == nw
    assert t["bytes_packed"] == sum(qmodel.get_submodule(r["name"]).w_packed.numel()
                                    for r in layers)
    # packed bytes never exceed the bit claim by more than 31 bits per row
    claim = sum((r["n"] + 1) * r["weights"] for r in layers) / 8
    rows = sum(r["shape"][0] for r in layers)
    assert claim <= t["bytes_packed"] <= claim + rows * 4
    assert t["fallback"] is False and t["metric"] == "proxy"


def test_report_formats(qmodel):
    rep = dnateq.report(qmodel)
    md = rep.to_markdown()
    assert md.startswith("| name | kind | shape | n |")
    assert "average bits" in md and "compression vs INT8" in md
    rows = list(csv.DictReader(io.StringIO(rep.to_csv())))
    assert [r["name"] for r in rows] == ["0", "2", "5"]
    assert rows[0]["shape"] == "8x3x3x3"
    assert int(rows[2]["n"]) == qmodel[5].bits


def test_report_hand_built_module():
    torch.manual_seed(1)
    lin = nn.Linear(16, 4)
    x = torch.relu(torch.randn(8, 16))
    alpha, sw, bw, _ = dnateq.exp_fit(lin.weight, 4)
    _, sa, ba, _ = dnateq.exp_fit(x, 4, alpha=alpha)
    model = nn.Sequential(ExpLinear.from_float(lin, 4, (alpha, sw, bw), (alpha, sa, ba),
                                               a_signed=False))
    d = dnateq.report(model).to_dict()
    assert d["totals"]["avg_bits"] == 4.0 and d["totals"]["storage_bits"] == 5.0
    assert d["layers"][0]["rmae_w"] is None   # no calibration record
    assert "base_quality" not in d["totals"]


def test_report_needs_quantized_layers():
    with pytest.raises(ValueError, match="no dnateq quantized layer"):
        dnateq.report(nn.Linear(3, 3))
    with pytest.raises(TypeError):
        dnateq.report("model")
