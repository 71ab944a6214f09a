"""The calibration mechanisms beyond the paper (issue 12, item 2): per-channel
weight fit with one shared alpha, error-driven activation range, bias
correction, smoothing (folded or buffer), sensitivity-guided allocation.
Small synthetic layers; each test runs in well under a second."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq import ops
from dnateq.calibration import channel_fit as CF
from dnateq.calibration import clip as CL
from dnateq.calibration import passes as P
from dnateq.calibration import sensitivity as SEN


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# channel_fit
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("rounding", ["nearest", "log"])
@pytest.mark.parametrize("bits", [3, 5])
def test_fake_quant_matches_the_operators(rounding, bits):
    x = torch.randn(4, 300, generator=gen()) * 2
    x[0, :5] = 0
    alpha, S, B = 1.7, 0.05, 0.01
    codes = ops.exp_quantize(x, alpha, S, B, bits, rounding)
    want = ops.exp_dequantize(codes, alpha, S, B, bits)
    torch.testing.assert_close(CF.fake_quant(x, alpha, S, B, bits, rounding), want,
                               rtol=0, atol=0)
    # per row: row j with its own (S_j, B_j)
    Sr = torch.tensor([0.05, 0.1, 0.02, 0.3])
    Br = torch.tensor([0.01, 0.0, 0.002, 0.05])
    got = CF.fake_quant(x, alpha, Sr, Br, bits, rounding)
    for j in range(4):
        c = ops.exp_quantize(x[j], alpha, float(Sr[j]), float(Br[j]), bits, rounding)
        torch.testing.assert_close(got[j], ops.exp_dequantize(c, alpha, float(Sr[j]),
                                                              float(Br[j]), bits),
                                   rtol=0, atol=0)


def test_range_params_cover_each_rows_range_and_degenerate_rows():
    w = torch.randn(6, 50, generator=gen(1)) * torch.tensor([1, 5, .1, 1, 1, 1.]).reshape(6, 1)
    w[3] = 0.0                 # all-zero row
    w[4] = 0.0
    w[4, 7] = -0.25            # one nonzero magnitude
    alpha, bits = 1.5, 4
    S, B = CF.fit_weight_rows(w, alpha, bits)
    E = CF.exp_range(bits)
    lo, hi = CF.row_ranges(w)
    for j in (0, 1, 2, 5):
        assert float(S[j] * alpha ** -E + B[j]) == pytest.approx(float(lo[j]), rel=1e-5)
        assert float(S[j] * alpha ** E + B[j]) == pytest.approx(float(hi[j]), rel=1e-5)
    assert (float(S[3]), float(B[3])) == (1.0, 0.0)
    assert (float(S[4]), float(B[4])) == (0.25, 0.0)
    assert bool((S > 0).all())


def test_per_channel_weights_beat_per_tensor_at_the_same_alpha():
    w = torch.randn(16, 64, generator=gen(2)) * torch.logspace(-1, 1, 16).reshape(16, 1)
    for bits in (3, 4, 6):
        alpha, sw, bw, r_tensor = ops.exp_fit(w, bits)
        S, B = CF.fit_weight_rows(w, alpha, bits)
        r_rows = CF.rows_rmae(w, alpha, S, B, bits)
        assert r_rows < r_tensor
        # rows_rmae of per-tensor params is the operators' exact RMAE
        assert CF.rows_rmae(w, alpha, sw, bw, bits) == pytest.approx(r_tensor, rel=1e-5)


def test_shared_alpha_is_no_worse_than_the_candidates():
    w = torch.randn(32, 48, generator=gen(3)) * torch.logspace(-1, 0.5, 32).reshape(32, 1)
    a = torch.distributions.Exponential(2.0).sample((4000,)).float()
    bits = 4

    def objective(al):
        S, B = CF.fit_weight_rows(w, al, bits)
        sa, ba = CF.range_params(float(a[a > 0].min()), float(a.max()), al, bits)
        return (CF.rows_rmae(w, al, S, B, bits)
                + ops.exp_error(a, al, float(sa), float(ba), bits))

    cands = [ops.exp_fit(w, bits)[0], ops.exp_fit(a, bits)[0]]
    best = CF.choose_shared_alpha(w, a, bits, candidates=cands)
    assert 1.0 < best <= CF.alpha_max(bits)
    assert objective(best) <= min(objective(c) for c in cands) + 1e-9


# ---------------------------------------------------------------------------
# clip / bias correction
# ---------------------------------------------------------------------------

def heavy_tail_linear(seed=4):
    g = gen(seed)
    lin = nn.Linear(32, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 32, generator=g) * 0.2)
    x = torch.randn(256, 32, generator=g).abs()
    x[0, 0] = 60.0                      # one rare, huge activation
    return lin, x


def test_clip_lowers_the_output_error_and_never_raises_it():
    lin, x = heavy_tail_linear()
    probe = CL.LayerProbe(lin, x)
    w = lin.weight.detach()
    bits = 3
    alpha, sw, bw, _ = ops.exp_fit(w, bits)
    wh = CF.fake_quant(w, alpha, sw, bw, bits)
    full = CL.fit_activation(probe, x.reshape(-1), alpha, bits, wh, clip=False)
    clipped = CL.fit_activation(probe, x.reshape(-1), alpha, bits, wh, clip=True)
    assert full["hi_q"] == 1.0 and full["lo_q"] == 0.0
    assert full["out_err"] == pytest.approx(clipped["full_err"])
    assert clipped["out_err"] < 0.8 * full["out_err"]
    assert clipped["hi"] < 60.0


def test_bias_correction_removes_the_mean_output_error():
    lin, x = heavy_tail_linear(5)
    probe = CL.LayerProbe(lin, x)
    w = lin.weight.detach()
    bits = 3
    alpha, sw, bw, _ = ops.exp_fit(w, bits)
    wh = CF.fake_quant(w, alpha, sw, bw, bits)
    r = CL.fit_activation(probe, x.reshape(-1), alpha, bits, wh, clip=False, bias_correct=True)
    xh = CF.fake_quant(x, alpha, r["sa"], r["ba"], bits)
    err = (xh @ wh.T + r["delta"]) - x @ w.T
    assert float(err.mean(0).abs().max()) < 1e-5
    assert r["out_err"] <= r["full_err"]


def test_conv_probe_bias_delta_is_per_output_channel():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, generator=gen(6)).relu()
    probe = CL.LayerProbe(conv, x)
    d = probe.bias_delta(x * 0.9, conv.weight.detach())
    assert d.shape == (5,)
    want = (torch.nn.functional.conv2d(x, conv.weight, None, 1, 1)
            - torch.nn.functional.conv2d(x * 0.9, conv.weight, None, 1, 1)).mean((0, 2, 3))
    torch.testing.assert_close(d, want.float(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# smoothing
# ---------------------------------------------------------------------------

class PreLN(nn.Module):
    """LayerNorm -> (q, k) and a residual that bypasses the LayerNorm."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.ln(x)
        return self.out(x + torch.relu(self.q(h)) * torch.tanh(self.k(h)))


class PostLN(PreLN):
    """The LayerNorm's output also feeds the residual path (post-LN BERT)."""

    def forward(self, x):
        h = self.ln(x)
        return self.out(h + torch.relu(self.q(h)) * torch.tanh(self.k(h)))


def outlier_input(seed=7, d=16):
    x = torch.randn(64, d, generator=gen(seed))
    return x


def prepared(model_cls, seed=8):
    torch.manual_seed(seed)
    m = model_cls().eval()
    with torch.no_grad():   # an outlier channel in the LayerNorm's output
        m.ln.weight.copy_(torch.ones(16))
        m.ln.weight[3] = 25.0
    return m


def test_find_producers_matches_output_tensors():
    m = prepared(PreLN)
    prod = P.find_producers(m, ["q", "k", "out"], outlier_input())
    assert prod == {"q": "ln", "k": "ln", "out": None}


@pytest.mark.parametrize("model_cls,where", [(PreLN, "folded"), (PostLN, "buffer")])
def test_smoothing_folds_only_where_exact(model_cls, where):
    m = prepared(model_cls)
    x = outlier_input()
    with torch.no_grad():
        ref = m(x)
    names = ["q", "k"]
    li = P.capture_inputs(m, names, [x])
    rec = P.smooth_layers(m, names, li, x, mode="auto", strengths=(0.5,))
    assert {rec[n]["where"] for n in names} == {where}
    if where == "folded":
        assert rec["q"]["into"] == "ln"
        torch.testing.assert_close(rec["q"]["factor"], rec["k"]["factor"])
        assert not hasattr(m.q, "_dnateq_smooth")
    else:
        assert rec["q"]["into"] is None and hasattr(m.q, "_dnateq_smooth")
    with torch.no_grad():     # the float model computes the same function
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    # the outlier channel's range moved into the weights
    s = rec["q"]["factor"]
    assert float(s[3]) > 2.0 * float(s.median())
    assert float(li["q"].absmax[3]) < float(P.capture_inputs(prepared(model_cls), ["q"],
                                                             [x])["q"].absmax[3])


def test_forced_fold_without_a_foldable_predecessor_is_a_clear_error():
    m = prepared(PostLN)
    x = outlier_input()
    li = P.capture_inputs(m, ["q"], [x])
    with pytest.raises(ValueError, match=r"layer 'q'.*'ln'.*smoothing='auto'"):
        P.smooth_layers(m, ["q"], li, x, mode="fold", strengths=(0.5,))
    li = P.capture_inputs(m, ["out"], [x])
    with pytest.raises(ValueError, match=r"layer 'out'.*outside any module"):
        P.smooth_layers(m, ["out"], li, x, mode="fold", strengths=(0.5,))
    with pytest.raises(ValueError, match="smoothing mode"):
        P.smooth_layers(m, ["out"], li, x, mode="always")


def test_smoothing_factor_rules():
    xa = torch.tensor([1.0, 100.0, 0.0, 4.0])
    wa = torch.tensor([1.0, 1.0, 2.0, 0.0])
    s = P.smoothing_factor(xa, wa, 0.5)
    assert float(s[2]) == 1.0 and float(s[3]) == 1.0      # nothing to move
    assert float(s[1] / s[0]) == pytest.approx(10.0)
    assert torch.equal(P.smoothing_factor(xa, wa, 0.0), torch.ones(4))
    w = torch.randn(6, 4, 3, 3, generator=gen(9))
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ws = P.scale_weight_inputs(w, s)
    torch.testing.assert_close(ws[:, 2], 3.0 * w[:, 2])
    wd = torch.randn(6, 2, 3, 3, generator=gen(10))         # 2 groups of 2 inputs
    wg = P.scale_weight_inputs(wd, s, groups=2)
    torch.testing.assert_close(wg[3:, 1], 4.0 * wd[3:, 1])
    torch.testing.assert_close(wg[:3, 1], 2.0 * wd[:3, 1])
    assert P.weight_in_absmax(wd, 2).shape == (4,)


# ---------------------------------------------------------------------------
# sensitivity allocation
# ---------------------------------------------------------------------------

SENS = {"a": {3: 0.5, 4: 0.1, 5: 0.01}, "b": {3: 0.02, 4: 0.03, 5: 0.001},
        "c": {3: 0.2, 4: 0.02, 5: 0.002}}
COUNTS = {"a": 100, "b": 1000, "c": 10}


def test_greedy_path_runs_from_max_to_min_bits_monotonically():
    path = SEN.greedy_path(SENS, COUNTS, (3, 4, 5))
    assert path[0] == {"a": 5, "b": 5, "c": 5} and path[-1] == {"a": 3, "b": 3, "c": 3}
    avgs = [SEN.avg_bits(c, COUNTS) for c in path]
    assert all(x > y for x, y in zip(avgs, avgs[1:]))
    # the cheap-per-bit, large layer "b" is lowered first (straight to 3: monotone envelope)
    assert path[1] == {"a": 5, "b": 3, "c": 5}
    assert SEN.monotone(SENS["b"]) == {5: 0.001, 4: 0.03, 3: 0.03}
    cfg = SEN.at_budget(path, COUNTS, 3.5)
    assert SEN.avg_bits(cfg, COUNTS) <= 3.5
    assert SEN.predicted_loss(cfg, SENS) <= SEN.predicted_loss(path[-1], SENS)


def test_search_path_bisects_for_the_last_passing_point():
    path = [{"x": i} for i in range(20)]
    calls = []

    def evaluate(cfg):
        calls.append(cfg["x"])
        return 100.0 - 0.3 * cfg["x"]        # loss 0.3 per step

    idx, hist = SEN.search_path(path, evaluate, 100.0, 1.0)
    assert idx == 3 and len(calls) <= 7
    assert all(h["passed"] == (h["loss"] <= 1.0) for h in hist)
    idx, _ = SEN.search_path(path, lambda c: 0.0, 100.0, 1.0)
    assert idx is None


def test_measure_sensitivity_restores_the_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(32, 8)
    with torch.no_grad():
        ref = m(x)

    floats = dict(m.named_children())

    def build(name, b):      # a stand-in "quantized" layer: noisier at fewer bits
        lin = floats[name]
        q = nn.Linear(lin.in_features, lin.out_features)
        with torch.no_grad():
            q.weight.copy_(lin.weight + 2.0 ** -b)
            q.bias.copy_(lin.bias)
        return q

    sens = SEN.measure_sensitivity(m, ["0", "2"], (3, 5), build, [x], lambda mm, t: mm(t))
    assert set(sens) == {"0", "2"} and all(sens[n][3] > sens[n][5] > 0 for n in sens)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)


# ---------------------------------------------------------------------------
# dnateq.quantize with each mechanism: exact under Eq. 8 (count == LUT == reference)
# ---------------------------------------------------------------------------

from dnateq.nn import ExpConv2d, ExpLinear  # noqa: E402

PERCHAN = hasattr(ExpLinear, "set_smooth")
need_perchan = pytest.mark.skipif(not PERCHAN, reason="per-channel module support not built")


class SmallNet(nn.Module):
    """conv -> ReLU -> conv -> pool -> LayerNorm -> (fc_a, fc_b) -> fc_out, with a
    LayerNorm whose only consumers are quantized layers (foldable)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.ln = nn.LayerNorm(8)
        self.fa = nn.Linear(8, 12)
        self.fb = nn.Linear(8, 12)
        self.fo = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = self.c2(h).mean((2, 3))
        h = self.ln(h)
        return self.fo(torch.relu(self.fa(h)) + torch.tanh(self.fb(h)))


def small_net():
    torch.manual_seed(0)
    m = SmallNet().eval()
    with torch.no_grad():
        m.ln.weight[2] = 12.0        # an outlier channel for the smoothing to move
    return m


def small_batches(n=3, seed=11):
    g = gen(seed)
    return [torch.randn(8, 3, 6, 6, generator=g) for _ in range(n)]


QKW = dict(progress=False, calib_batches=2, sample_size=4096, eval_fn=lambda m: 1.0)


def modes_agree(q, x):
    outs = {}
    with torch.no_grad():
        for mode in ("count", "lut", "fake"):
            for m in q.modules():
                if isinstance(m, (ExpLinear, ExpConv2d)):
                    m.mode = mode
            outs[mode] = q(x)
    scale = float(outs["count"].abs().max())
    for mode in ("lut", "fake"):
        torch.testing.assert_close(outs[mode], outs["count"], rtol=1e-4, atol=1e-4 * scale)


def qlayers(q):
    return {n: m for n, m in q.named_modules() if isinstance(m, (ExpLinear, ExpConv2d))}


@pytest.mark.parametrize("passes", [
    pytest.param(["per_channel"], marks=need_perchan),
    pytest.param(["smoothing"], marks=need_perchan),
    ["clip"], ["bias_correction"], [],
])
def test_each_mechanism_is_exact_under_eq8(passes):
    model = small_net()
    q = dnateq.quantize(model, small_batches(), passes=passes, **QKW)
    info = q.dnateq_info
    assert info["method"] == "sensitivity" and info["passes"] == passes
    modes_agree(q, small_batches(1, seed=12)[0])
    layers = qlayers(q)
    assert set(layers) == {"c1", "c2", "fa", "fb", "fo"}
    if passes == ["per_channel"]:
        assert all(m.w_scale is not None and m.w_scale.shape == (m.w_shape[0],)
                   for m in layers.values())
    if passes == ["smoothing"]:
        rec = info["smoothing"]
        assert rec["fa"]["where"] == "folded" and rec["fa"]["into"] == "ln"
        assert rec["fa"]["strength"] == rec["fb"]["strength"]
        assert float((q.ln.weight - model.ln.weight).detach().abs().max()) > 0   # folded into ln
    if passes == ["bias_correction"]:
        assert layers["c2"].bias is not None          # created where the float layer had none
        assert not torch.equal(layers["fo"].bias, model.fo.bias)
    for n, m in layers.items():
        assert m.info.get("mechanisms", []) == info["layer_passes"].get(n, [])
    rep = dnateq.report(q).to_dict()
    assert rep["totals"]["method"] == "sensitivity"


def test_paper_method_runs_no_mechanism_and_matches_the_threshold_rule():
    model = small_net()
    q = dnateq.quantize(model, small_batches(), method="paper", **QKW)
    info = q.dnateq_info
    assert info["method"] == "paper" and info["passes"] == [] and info["layer_passes"] == {}
    assert info["threshold"] is not None
    from dnateq.calibration import choose_bits
    cfg = choose_bits(info["tables"], info["order"], info["threshold"], [3, 4, 5, 6, 7],
                      10.0, 1.0)
    assert {n: m.bits for n, m in qlayers(q).items()} == cfg
    for m in qlayers(q).values():
        assert "mechanisms" not in m.info


def test_sensitivity_budget_and_bad_options():
    model = small_net()
    q = dnateq.quantize(model, small_batches(), bits_budget=4.0, passes=[], **QKW)
    rep = dnateq.report(q).to_dict()
    assert rep["totals"]["avg_bits"] <= 4.0 + 1e-9
    assert set(q.dnateq_info["sensitivity"]) == set(qlayers(q))
    with pytest.raises(ValueError, match="bits_budget needs method='sensitivity'"):
        dnateq.quantize(model, small_batches(), method="paper", bits_budget=4.0, **QKW)
    with pytest.raises(ValueError, match="smoothing must be one of"):
        dnateq.quantize(model, small_batches(), smoothing="always", **QKW)
    with pytest.raises(ValueError, match="unknown pass"):
        dnateq.quantize(model, small_batches(), passes=["sharpen"], **QKW)


@need_perchan
def test_forced_fold_on_a_layer_without_foldable_predecessor_names_it():
    model = small_net()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'c1'.*outside any module"):
        dnateq.quantize(model, small_batches(), passes=["smoothing"], smoothing="fold", **QKW)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())


def test_mechanisms_survive_save_and_load(tmp_path):
    model = small_net()
    passes = ["clip", "bias_correction"] + (["per_channel", "smoothing"] if PERCHAN else [])
    q = dnateq.quantize(model, small_batches(), passes=passes, **QKW)
    x = small_batches(1, seed=13)[0]
    path = tmp_path / "m.dnateq"
    dnateq.save(q, path)
    r = dnateq.load(path, model)
    with torch.no_grad():
        torch.testing.assert_close(r(x), q(x), rtol=1e-5, atol=1e-6)


def test_the_default_is_the_sensitivity_method_with_the_default_passes():
    from dnateq.calibration import pipeline as PL
    model = small_net()
    q = dnateq.quantize(model, small_batches(5), progress=False, calib_batches=2,
                        eval_batches=2, sample_size=4096)      # proxy on held-out batches
    info = q.dnateq_info
    assert info["method"] == "sensitivity" and info["metric"] == "proxy"
    assert info["passes"] == list(PL.DEFAULT_PASSES["sensitivity"])
    assert info["loss"] <= 1.0 + 1e-9 or info["fallback"]
    assert all(set(info["layer_passes"][n]) >= set(info["passes"]) - {"smoothing"}
               for n in qlayers(q))
    modes_agree(q, small_batches(1, seed=14)[0])


def test_sensitivity_inputs_span_small_batches():
    """The sensitivity measurement takes its samples from as many calibration
    inputs as needed (token batches of a few sentences), in order."""
    from dnateq.calibration.sensitivity import sens_inputs
    batches = [dict(input_ids=torch.full((5, 3), i), attention_mask=torch.ones(5, 3))
               for i in range(4)]
    got = sens_inputs(batches, 12)
    assert [b["input_ids"].shape[0] for b in got] == [5, 5, 2]
    assert [int(b["input_ids"][0, 0]) for b in got] == [0, 1, 2]
    assert [t.shape[0] for t in sens_inputs([torch.zeros(40, 2)], 32)] == [32]
    assert sens_inputs([torch.zeros(4, 2)], 0) == []
