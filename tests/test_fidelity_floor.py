"""The output-fidelity floor of the sensitivity allocation (issue 12: ``min_cosine``).

A configuration passes the search only when its loss is within ``max_loss``
and the mean cosine of its outputs to the float model's, on loader batches
that follow the calibration ones, is at least ``min_cosine``. These tests
check the measure against a direct computation, the search with the floor,
the options' validation, and that ``dnateq.quantize`` keeps the floor on a
model whose metric passes everything (so that only the floor can stop it)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dnateq
from dnateq.calibration import QuantizeConfig
from dnateq.calibration import sensitivity as SEN
from dnateq.calibration.quality import mean_cosine


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 8)).eval()


def _batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 16, generator=g) for _ in range(n)]


KW = dict(progress=False, calib_batches=2, eval_batches=2, sample_size=4096, passes=[],
          eval_fn=lambda m: 1.0)     # a metric that passes every configuration


def _cosine(model, q, xs):
    with torch.no_grad():
        return float(torch.cat([F.cosine_similarity(model(x), q(x), dim=1) for x in xs]).mean())


def test_mean_cosine_per_sample_and_per_valid_token():
    g = torch.Generator().manual_seed(0)
    r, o = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    assert mean_cosine([r], [o]) == pytest.approx(float(F.cosine_similarity(r, o).mean()),
                                                  abs=1e-6)
    # [B, T, D] with a mask: only the valid tokens count, each one a sample
    r3, o3 = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    v = mask.bool()
    want = float(F.cosine_similarity(r3[v], o3[v], dim=1).mean())
    assert mean_cosine([r3], [o3], [mask]) == pytest.approx(want, abs=1e-6)
    o3[~v] = 1e3            # padded positions may hold anything
    assert mean_cosine([r3], [o3], [mask]) == pytest.approx(want, abs=1e-6)
    assert mean_cosine([r], [r.clone()]) == pytest.approx(1.0, abs=1e-6)


def test_search_path_with_a_floor_stops_where_the_cosine_falls_below_it():
    path = [{"x": i} for i in range(20)]
    cos_calls = []

    def cosine(cfg):
        cos_calls.append(cfg["x"])
        return 1.0 - 0.001 * cfg["x"]

    idx, hist = SEN.search_path(path, lambda c: 100.0, 100.0, 1.0, cosine, 0.99)
    assert idx == 10                      # 1 - 0.010 >= 0.99 > 1 - 0.011
    assert SEN.search_limit(idx, hist, len(path)) == "fidelity"
    assert all(h["passed"] == (h["cosine"] >= 0.99) for h in hist)
    assert {h["failed"] for h in hist if not h["passed"]} == {"fidelity"}
    # without a floor the same metric runs to the end of the path
    idx, hist = SEN.search_path(path, lambda c: 100.0, 100.0, 1.0, cosine, None)
    assert idx == 19 and SEN.search_limit(idx, hist, len(path)) == "path_end"
    # the loss limit binds first: the cosine is not even measured where the loss fails
    cos_calls.clear()
    idx, hist = SEN.search_path(path, lambda c: 100.0 - 0.3 * c["x"], 100.0, 1.0, cosine, 0.9)
    assert idx == 3 and SEN.search_limit(idx, hist, len(path)) == "loss"
    assert all(h["cosine"] is None for h in hist if h["failed"] == "loss")
    assert set(cos_calls) == {h["index"] for h in hist if h["failed"] != "loss"}
    # nothing passes: None, and the reason of the first point
    idx, hist = SEN.search_path(path, lambda c: 100.0, 100.0, 1.0, lambda c: 0.5, 0.99)
    assert idx is None and SEN.search_limit(idx, hist, len(path)) == "fidelity"


def test_min_cosine_options():
    assert QuantizeConfig().validated().min_cosine == 0.99          # sensitivity default
    assert QuantizeConfig(method="paper").validated().min_cosine is None
    assert QuantizeConfig(min_cosine=None).validated().min_cosine is None
    assert QuantizeConfig(min_cosine=0.95).validated().min_cosine == 0.95
    for bad, err in ((1.5, ValueError), (-1.0, ValueError), ("high", ValueError),
                     (True, TypeError), ([0.9], TypeError)):
        with pytest.raises(err, match="min_cosine"):
            QuantizeConfig(min_cosine=bad).validated()
    with pytest.raises(ValueError, match="min_cosine needs method='sensitivity'"):
        QuantizeConfig(method="paper", min_cosine=0.99).validated()


def test_quantize_keeps_the_floor_when_the_metric_passes_everything():
    model, xs = _net(), _batches(4)
    free = dnateq.quantize(model, xs, min_cosine=None, **KW)
    assert free.dnateq_info["limit"] == "path_end"
    assert all(m.bits == 3 for m in free.modules() if isinstance(m, dnateq.nn.ExpLinear))
    held = xs[2:]                                   # what follows the 2 calibration batches
    c_free = _cosine(model, free, held)
    floor = min(0.9999, (1.0 + c_free) / 2)         # above what the all-3-bit model keeps
    q = dnateq.quantize(model, xs, min_cosine=floor, **KW)
    info = q.dnateq_info
    assert info["min_cosine"] == floor and info["limit"] in ("fidelity", "path_end")
    assert info["limit"] == "fidelity"              # the all-3-bit end is below the floor
    c = _cosine(model, q, held)
    assert c >= floor - 1e-5 and info["cosine"] == pytest.approx(c, abs=1e-5)
    avg_q = dnateq.report(q).to_dict()["totals"]["avg_bits"]
    assert avg_q > dnateq.report(free).to_dict()["totals"]["avg_bits"]
    text = str(dnateq.report(q))
    assert "output fidelity: mean cosine to float" in text and "cosine floor" in text
    # the caller's model is untouched and the search history names the failed floor
    assert any(h.get("failed") == "fidelity" for h in info["history"])


def test_budget_reports_the_cosine_without_enforcing_it():
    model, xs = _net(), _batches(4)
    q = dnateq.quantize(model, xs, bits_budget=3.0, min_cosine=0.99999, **KW)
    info = q.dnateq_info
    assert info["limit"] == "budget"
    assert all(m.bits == 3 for m in q.modules() if isinstance(m, dnateq.nn.ExpLinear))
    assert info["cosine"] == pytest.approx(_cosine(model, q, xs[2:]), abs=1e-5)


def test_floor_without_held_out_batches_uses_calibration_batches():
    model, xs = _net(), _batches(2)                  # nothing follows calibration
    q = dnateq.quantize(model, xs, min_cosine=0.5, **KW)
    info = q.dnateq_info
    assert info["estimate"]["on_calibration_batches"] is True
    assert info["cosine"] == pytest.approx(_cosine(model, q, xs), abs=1e-5)
