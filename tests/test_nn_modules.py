"""Quantized modules: ExpLinear, ExpConv2d, ExpMultiheadAttention (SPEC sections 4, 6)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dnateq
from dnateq.nn import ExpConv2d, ExpLinear, ExpMultiheadAttention
from conftest import gen


def _params(w, x, bits, rounding="nearest"):
    alpha, sw, bw, _ = dnateq.exp_fit(w, bits, "golden", rounding)
    _, sa, ba, _ = dnateq.exp_fit(x, bits, "golden", rounding, alpha)
    return (alpha, sw, bw), (alpha, sa, ba)


def _run_modes(q, x):
    out = {}
    for mode in ("count", "lut", "fake"):
        q.mode = mode
        out[mode] = q(x)
    return out


def _close(a, b, mag, rtol=1e-4):
    # rtol relative to the size of the summed terms (cancellation-safe).
    err = (a.double() - b.double()).abs()
    tol = rtol * (b.double().abs() + mag.double()) + 1e-6
    assert bool((err <= tol).all()), f"max err {err.max().item():.3e}"


@pytest.mark.parametrize("bits", [3, 5, 7])
@pytest.mark.parametrize("signed_input", [True, False])
@pytest.mark.parametrize("rounding", ["nearest", "log"])
def test_linear_modes_agree(bits, signed_input, rounding):
    g = gen(100 + bits + 10 * signed_input)
    lin = nn.Linear(48, 20)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 48, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(20, generator=g))
    x = torch.randn(3, 5, 48, generator=g)
    if not signed_input:
        x = F.relu(x)
    wp, ap = _params(lin.weight, x, bits, rounding)
    q = ExpLinear.from_float(lin, bits, wp, ap, a_signed=signed_input, rounding=rounding)
    assert q.mode == "lut"
    assert q.w_packed.dtype == torch.uint8 and q.w_terms.dtype == torch.int32
    assert q.w_shape == [20, 48]
    assert torch.equal(q.bias, lin.bias.detach())
    out = _run_modes(q, x)
    assert out["lut"].shape == (3, 5, 20)
    mag = (x.abs() @ q.dequantized_weight().abs().T) + q.bias.abs()
    _close(out["lut"], out["count"], mag)
    _close(out["fake"], out["count"], mag)
    # The quantized layer approximates the float layer.
    ref = lin(x).detach()
    rel = (out["lut"] - ref).norm() / ref.norm()
    assert rel < {3: 0.5, 5: 0.15, 7: 0.05}[bits]


def test_unsigned_layer_negative_input_is_exact():
    g = gen(7)
    lin = nn.Linear(32, 8)
    x = F.relu(torch.randn(6, 32, generator=g))
    wp, ap = _params(lin.weight, x, 4)
    q = ExpLinear.from_float(lin, 4, wp, ap, a_signed=False)
    xn = x.clone()
    xn[0, :5] = -x[0, :5] - 0.3   # negatives at run time
    xn[2, 3] = -1.0
    out = _run_modes(q, xn)
    # count with w_terms == direct count == lut
    a = dnateq.exp_quantize(xn, *ap, 4)
    direct = dnateq.exp_linear_count(a, q.w_codes(), ap[0], ap[1], ap[2], wp[1], wp[2], 4,
                                     q.bias, None, None)
    assert torch.equal(out["count"], direct)
    mag = xn.abs() @ q.dequantized_weight().abs().T + q.bias.abs()
    _close(out["lut"], out["count"], mag)


def test_count_uses_weight_terms_exactly():
    g = gen(8)
    lin = nn.Linear(40, 12, bias=False)
    x = F.relu(torch.randn(5, 40, generator=g))
    wp, ap = _params(lin.weight, x, 5)
    q = ExpLinear.from_float(lin, 5, wp, ap, a_signed=False, mode="count")
    assert torch.equal(q.w_terms, dnateq.weight_terms(q.w_codes(), 5))
    a = dnateq.exp_quantize(x, *ap, 5)
    direct = dnateq.exp_linear_count(a, q.w_codes(), ap[0], ap[1], ap[2], wp[1], wp[2], 5,
                                     None, None, None)
    assert torch.equal(q(x), direct)


CONV_CASES = [
    dict(cin=4, cout=6, k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(cin=4, cout=6, k=3, stride=2, padding=0, dilation=1, groups=2),
    dict(cin=6, cout=6, k=3, stride=1, padding=2, dilation=2, groups=6),
    dict(cin=4, cout=5, k=4, stride=1, padding="same", dilation=1, groups=1),
    dict(cin=4, cout=5, k=2, stride=1, padding="same", dilation=3, groups=1),
    dict(cin=4, cout=5, k=3, stride=1, padding="valid", dilation=1, groups=1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("signed_input", [True, False])
def test_conv_modes_agree(case, signed_input):
    g = gen(200 + signed_input)
    conv = nn.Conv2d(case["cin"], case["cout"], case["k"], stride=case["stride"],
                     padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    x = torch.randn(2, case["cin"], 9, 8, generator=g)
    if not signed_input:
        x = F.relu(x)
    wp, ap = _params(conv.weight, x, 4)
    q = ExpConv2d.from_float(conv, 4, wp, ap, a_signed=signed_input)
    out = _run_modes(q, x)
    ref = conv(x).detach()
    assert out["lut"].shape == ref.shape
    w_hat = q.dequantized_weight()
    xp, pad = q._geometry(x)
    mag = F.conv2d(xp.abs(), w_hat.abs(), q.bias.abs(), q.stride, pad, q.dilation, q.groups)
    _close(out["lut"], out["count"], mag)
    _close(out["fake"], out["count"], mag)
    # And equals the float conv of the dequantized tensors (the "same" padding).
    a_hat = dnateq.exp_dequantize(dnateq.exp_quantize(x, *ap, 4), *ap, 4)
    expect = F.conv2d(a_hat, w_hat, q.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    _close(out["fake"], expect, mag)


def test_conv_padding_mode_refused():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        ExpConv2d.from_float(conv, 4, None, (1.0, 0.0))


def test_from_float_round_trip_and_state_dict():
    g = gen(9)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16, generator=g)
    wp, ap = _params(lin.weight, x, 6)
    q = ExpLinear.from_float(lin, 6, wp, ap)
    # weights: the packed codes are exactly the quantized weights
    codes = dnateq.exp_quantize(lin.weight.detach(), *wp, 6)
    assert torch.equal(q.w_codes(), codes)
    assert torch.equal(q.w_packed, dnateq.exp_pack(codes, 6, True))
    # fitted w_params when omitted; (S, beta) for activations
    q2 = ExpLinear.from_float(lin, 6, None, ap)
    assert q2.alpha == pytest.approx(wp[0])
    q3 = ExpLinear.from_float(lin, 6, wp, ap[1:])
    assert torch.equal(q3(x), q(x))
    # state_dict round trip into a fresh module
    sd = q.state_dict()
    assert sd["w_packed"].dtype == torch.uint8
    other = ExpLinear.from_float(nn.Linear(16, 8), 6, wp, ap)
    other.load_state_dict(sd)
    assert torch.equal(other(x), q(x))
    # validation
    with pytest.raises(ValueError, match="share alpha"):
        ExpLinear.from_float(lin, 6, wp, (wp[0] * 1.1, 1.0, 0.0))
    with pytest.raises(ValueError, match="a_params"):
        ExpLinear.from_float(lin, 6, wp, None)
    with pytest.raises(ValueError, match="mode"):
        ExpLinear.from_float(lin, 6, wp, ap, mode="fast")
    with pytest.raises(ValueError, match="bits"):
        ExpLinear.from_float(lin, 9, wp, ap)


def test_non_finite_input_raises():
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    wp, ap = _params(lin.weight, x, 4)
    q = ExpLinear.from_float(lin, 4, wp, ap)
    x[0, 0] = float("nan")
    for mode in ("lut", "count", "fake"):
        q.mode = mode
        with pytest.raises((RuntimeError, ValueError)):
            q(x)


def test_half_input_dtype():
    lin = nn.Linear(32, 8)
    x = torch.randn(3, 32)
    wp, ap = _params(lin.weight, x, 5)
    q = ExpLinear.from_float(lin, 5, wp, ap)
    y = q(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), q(x), rtol=2e-2, atol=2e-2)
    y64 = q(x.double())
    assert y64.dtype == torch.float64


# ---------------------------------------------------------------------------
# MultiheadAttention
# ---------------------------------------------------------------------------

MHA_CASES = [
    dict(batch_first=True, bias=True, add_bias_kv=False, add_zero_attn=False, kdim=None),
    dict(batch_first=False, bias=True, add_bias_kv=False, add_zero_attn=False, kdim=None),
    dict(batch_first=False, bias=False, add_bias_kv=True, add_zero_attn=True, kdim=None),
    dict(batch_first=True, bias=True, add_bias_kv=False, add_zero_attn=False, kdim=12),
]


@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "attn", "kpm", "both"])
def test_mha_equivalence(case, need_weights, masks):
    torch.manual_seed(0)
    E, H, L, S, B = 16, 4, 5, 7, 3
    kd = case["kdim"]
    mha = nn.MultiheadAttention(E, H, bias=case["bias"], add_bias_kv=case["add_bias_kv"],
                                add_zero_attn=case["add_zero_attn"], kdim=kd, vdim=kd,
                                batch_first=case["batch_first"])
    if case["add_bias_kv"]:
        nn.init.normal_(mha.bias_k)
        nn.init.normal_(mha.bias_v)
    e = ExpMultiheadAttention.from_float(mha)
    assert isinstance(e.q_proj, nn.Linear) and isinstance(e.out_proj, nn.Linear)
    shp = (lambda n, d: (B, n, d)) if case["batch_first"] else (lambda n, d: (n, B, d))
    q = torch.randn(shp(L, E))
    if kd is None:
        k = v = torch.randn(shp(S, E))
    else:
        k, v = torch.randn(shp(S, kd)), torch.randn(shp(S, kd))
    attn_mask = kpm = None
    if masks in ("attn", "both"):
        attn_mask = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=3)
    if masks in ("kpm", "both"):
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[1, -2:] = True
    # training mode (no dropout): both take the same, non-fused path -> equal bits
    for mod in (mha, e):
        mod.train()
    o1, w1 = mha(q, k, v, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask)
    o2, w2 = e(q, k, v, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask)
    assert torch.equal(o1, o2)
    if need_weights:
        assert torch.equal(w1, w2)
    else:
        assert w1 is None and w2 is None
    # self-attention, eval + no_grad (the original may take its fused fast path)
    for mod in (mha, e):
        mod.eval()
    if kd is None:
        with torch.no_grad():
            o1, _ = mha(q, q, q, key_padding_mask=None, need_weights=need_weights)
            o2, _ = e(q, q, q, key_padding_mask=None, need_weights=need_weights)
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)


def test_mha_unbatched_and_per_head_weights():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2)
    e = ExpMultiheadAttention.from_float(mha)
    x = torch.randn(5, 8)
    o1, w1 = mha(x, x, x, average_attn_weights=False)
    o2, w2 = e(x, x, x, average_attn_weights=False)
    assert torch.equal(o1, o2) and torch.equal(w1, w2)


def test_mha_projections_quantize():
    """After replacement the four Linears are quantized like any other."""
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    e = ExpMultiheadAttention.from_float(mha).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        ref, _ = e(x, x, x)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lin = getattr(e, name)
            inp = x if name != "out_proj" else torch.randn(12, 16)
            wp, ap = _params(lin.weight, inp, 7)
            setattr(e, name, ExpLinear.from_float(lin, 7, wp, ap))
        out, _ = e(x, x, x)
    assert (out - ref).norm() / ref.norm() < 0.2
