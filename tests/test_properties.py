"""Property-based tests (hypothesis): every operator against dnateq.reference on
random shapes (including empty ones), bits, parameters, strides (non-contiguous
views), dtypes and devices (CUDA when present), and the invariants that tie the
operators together (pack/unpack round trip, w_terms = direct count, the three
module modes, golden fit never worse than the reference's).

Bounded for CI (a few examples per property, derandomized so a run is
reproducible); DNATEQ_HYPOTHESIS_EXAMPLES=N sets the examples per property for a
longer search (e.g. 500).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dnateq  # noqa: E402
from dnateq import reference as ref  # noqa: E402

from conftest import (assert_close_rel, conv_mag, deq64, gen, linear_mag,  # noqa: E402
                      make_data, random_codes, random_params)

EXAMPLES = int(os.environ.get("DNATEQ_HYPOTHESIS_EXAMPLES", "15"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
           torch.bfloat16: (1e-2, 1e-2)}

bits_st = st.integers(2, 7)
seed_st = st.integers(0, 2 ** 31 - 1)
rounding_st = st.sampled_from(["nearest", "log"])
dtype_st = st.sampled_from(DTYPES)
device_st = st.sampled_from(DEVICES)
layout_st = st.sampled_from(["contiguous", "slice", "transpose"])
shape_st = st.lists(st.integers(0, 6), min_size=0, max_size=4)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` as a (possibly) non-contiguous view with the same values."""
    if layout == "slice" and t.dim() >= 1:
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        big[..., 1::2] = t
        return big[..., 1::2]
    if layout == "transpose" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _params(bits, g, jitter=False):
    alpha, s, b = random_params(bits, g=g, offset_jitter=jitter)
    return alpha, s, b


@SETTINGS
@given(shape=shape_st, bits=bits_st, rounding=rounding_st, dtype=dtype_st, seed=seed_st,
       layout=layout_st, device=device_st, jitter=st.booleans(), zeros=st.floats(0, 0.5))
def test_quantize_dequantize_match_reference(shape, bits, rounding, dtype, seed, layout,
                                             device, jitter, zeros):
    g = gen(seed)
    alpha, s, b = _params(bits, g, jitter)
    x = make_data(shape, g, "student", zero_frac=zeros).to(dtype)
    xd = _layout(x.to(device), layout)
    codes = dnateq.exp_quantize(xd, alpha, s, b, bits, rounding)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert torch.equal(codes.cpu(), ref.exp_quantize(x, alpha, s, b, bits, rounding))
    for out in DTYPES:
        got = dnateq.exp_dequantize(_layout(codes, layout), alpha, s, b, bits, out)
        assert got.dtype == out
        assert torch.equal(got.cpu(), ref.exp_dequantize(codes.cpu(), alpha, s, b, bits, out))


@SETTINGS
@given(shape=shape_st, bits=bits_st, signed=st.booleans(), seed=seed_st, layout=layout_st,
       device=device_st)
def test_pack_unpack_match_reference_and_round_trip(shape, bits, signed, seed, layout, device):
    g = gen(seed)
    codes = random_codes(shape, bits, g, signed=signed)
    cd = _layout(codes.to(device), layout)
    packed = dnateq.exp_pack(cd, bits, signed)
    assert torch.equal(packed.cpu(), ref.exp_pack(codes, bits, signed))
    back = dnateq.exp_unpack(packed, bits, signed, list(codes.shape))
    assert torch.equal(back.cpu(), codes)


@st.composite
def linear_case(draw):
    bits = draw(bits_st)
    lead = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    k, n = draw(st.integers(0, 40)), draw(st.integers(0, 9))
    return bits, lead, k, n


@SETTINGS
@given(case=linear_case(), seed=seed_st, a_signed=st.booleans(), layout=layout_st,
       device=device_st, with_bias=st.booleans(), use_terms=st.booleans(),
       counter_bits=st.sampled_from([None, None, 4, 8, 16]))
def test_linear_count_matches_reference(case, seed, a_signed, layout, device, with_bias,
                                        use_terms, counter_bits):
    bits, lead, k, n = case
    g = gen(seed)
    alpha, sw, bw = _params(bits, g, True)
    _, sa, ba, = random_params(bits, g=g, alpha=alpha, offset_jitter=True)
    a = random_codes((*lead, k), bits, g, signed=a_signed, zero_frac=0.4)
    w = random_codes((n, k), bits, g)
    bias = torch.randn(n, generator=g) if with_bias else None
    wt = dnateq.weight_terms(w, bits) if use_terms and counter_bits is None else None
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = dnateq.exp_linear_count(_layout(dev(a), layout), dev(w), alpha, sa, ba, sw, bw, bits,
                                  dev(bias), counter_bits, dev(wt))
    exp = ref.exp_linear_count(a, w, alpha, sa, ba, sw, bw, bits, bias, counter_bits)
    assert got.dtype == torch.float32 and got.shape == (*lead, n)
    mag = linear_mag(deq64(a, alpha, sa, ba, bits).reshape(math.prod(lead), k),
                     deq64(w, alpha, sw, bw, bits),
                     bias).reshape(got.shape)
    if counter_bits is not None:   # clamped counts: the magnitude bound is the unclamped one
        mag = mag + 1.0
    assert_close_rel(got.cpu(), exp, mag, 2e-6, 1e-6, "linear_count")


@st.composite
def conv_case(draw):
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    padding = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    dilation = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 9))
    nb = draw(st.integers(1, 2))
    return dict(x=(nb, cin, h, w), w=(cout, cin // groups, kh, kw), stride=stride,
                padding=padding, dilation=dilation, groups=groups)


@SETTINGS
@given(case=conv_case(), bits=bits_st, seed=seed_st, a_signed=st.booleans(),
       device=device_st, with_bias=st.booleans(), use_terms=st.booleans(),
       channels_last=st.booleans())
def test_conv2d_count_matches_reference(case, bits, seed, a_signed, device, with_bias,
                                        use_terms, channels_last):
    g = gen(seed)
    alpha, sw, bw = _params(bits, g, True)
    _, sa, ba = random_params(bits, g=g, alpha=alpha)
    a = random_codes(case["x"], bits, g, signed=a_signed, zero_frac=0.4)
    w = random_codes(case["w"], bits, g)
    bias = torch.randn(case["w"][0], generator=g) if with_bias else None
    geo = (case["stride"], case["padding"], case["dilation"], case["groups"])
    wt = dnateq.weight_terms(w, bits) if use_terms else None
    ad = a.to(device)
    if channels_last:
        ad = ad.contiguous(memory_format=torch.channels_last)
    got = dnateq.exp_conv2d_count(ad, w.to(device), alpha, sa, ba, sw, bw, bits,
                                  None if bias is None else bias.to(device), *geo, None,
                                  None if wt is None else wt.to(device))
    exp = ref.exp_conv2d_count(a, w, alpha, sa, ba, sw, bw, bits, bias, *geo)
    mag = conv_mag(deq64(a, alpha, sa, ba, bits), deq64(w, alpha, sw, bw, bits), bias, *geo)
    assert_close_rel(got.cpu(), exp, mag, 2e-6, 1e-6, "conv2d_count")


@SETTINGS
@given(case=linear_case(), seed=seed_st, dtype=dtype_st, layout=layout_st, device=device_st,
       rounding=rounding_st, w_signed=st.booleans(), with_bias=st.booleans(),
       dist=st.sampled_from(["normal", "student", "uniform"]))
def test_linear_lut_matches_reference(case, seed, dtype, layout, device, rounding, w_signed,
                                      with_bias, dist):
    bits, lead, k, n = case
    g = gen(seed)
    alpha, sw, bw = _params(bits, g)
    _, sa, ba = random_params(bits, g=g, alpha=alpha)
    x = make_data((*lead, k), g, dist, zero_frac=0.2).to(dtype)
    w = random_codes((n, k), bits, g, signed=w_signed)
    wp = dnateq.exp_pack(w, bits, w_signed)
    bias = torch.randn(n, generator=g) if with_bias else None
    got = dnateq.exp_linear_lut(_layout(x.to(device), layout), wp.to(device), [n, k], alpha,
                                sa, ba, sw, bw, bits, True, w_signed, rounding,
                                None if bias is None else bias.to(device))
    exp = ref.exp_linear_lut(x, wp, [n, k], alpha, sa, ba, sw, bw, bits, True, w_signed,
                             rounding, bias)
    assert got.dtype == dtype and got.shape == (*lead, n)
    a_hat = ref.exp_dequantize(ref.exp_quantize(x, alpha, sa, ba, bits, rounding), alpha, sa,
                               ba, bits)
    mag = linear_mag(a_hat.reshape(math.prod(lead), k), deq64(w, alpha, sw, bw, bits),
                     bias).reshape(got.shape)
    rtol, atol = LUT_TOL[dtype]
    assert_close_rel(got.cpu(), exp, mag, rtol, atol, "linear_lut")


@SETTINGS
@given(case=conv_case(), bits=bits_st, seed=seed_st, dtype=dtype_st, device=device_st,
       rounding=rounding_st, with_bias=st.booleans(), layout=st.sampled_from(
           ["contiguous", "channels_last", "slice"]))
def test_conv2d_lut_matches_reference(case, bits, seed, dtype, device, rounding, with_bias,
                                      layout):
    g = gen(seed)
    alpha, sw, bw = _params(bits, g)
    _, sa, ba = random_params(bits, g=g, alpha=alpha)
    x = make_data(case["x"], g, zero_frac=0.2).to(dtype)
    w = random_codes(case["w"], bits, g)
    wp = dnateq.exp_pack(w, bits, True)
    bias = torch.randn(case["w"][0], generator=g) if with_bias else None
    geo = (case["stride"], case["padding"], case["dilation"], case["groups"])
    xd = x.to(device)
    xd = (xd.contiguous(memory_format=torch.channels_last) if layout == "channels_last"
          else _layout(xd, layout))
    got = dnateq.exp_conv2d_lut(xd, wp.to(device), list(case["w"]), alpha, sa, ba, sw, bw,
                                bits, True, True, rounding,
                                None if bias is None else bias.to(device), *geo)
    exp = ref.exp_conv2d_lut(x, wp, list(case["w"]), alpha, sa, ba, sw, bw, bits, True, True,
                             rounding, bias, *geo)
    assert got.dtype == dtype
    a_hat = ref.exp_dequantize(ref.exp_quantize(x, alpha, sa, ba, bits, rounding), alpha, sa,
                               ba, bits)
    mag = conv_mag(a_hat, deq64(w, alpha, sw, bw, bits), bias, *geo)
    rtol, atol = LUT_TOL[dtype]
    assert_close_rel(got.cpu(), exp, mag, rtol, atol, "conv2d_lut")


@SETTINGS
@given(n=st.integers(0, 300), bits=bits_st, seed=seed_st, rounding=rounding_st,
       dtype=dtype_st, dist=st.sampled_from(["normal", "exponential", "student", "uniform"]),
       zeros=st.floats(0, 0.9), jitter=st.booleans())
def test_exp_error_and_errors_match_reference(n, bits, seed, rounding, dtype, dist, zeros,
                                              jitter):
    g = gen(seed)
    x = make_data((n,), g, dist, zero_frac=zeros).to(dtype)
    cands = [_params(bits, g, jitter) for _ in range(3)]
    for a, s, b in cands:
        e = dnateq.exp_error(x, a, s, b, bits, rounding)
        r = ref.exp_error(x, a, s, b, bits, rounding)
        assert abs(e - r) <= 1e-9 * max(abs(r), 1e-300) + 1e-12, (e, r)
    es = dnateq.exp_errors(x, *zip(*cands), bits, rounding)
    rs = ref.exp_errors(x, *zip(*cands), bits, rounding)
    torch.testing.assert_close(es, rs, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(n=st.integers(1, 400), bits=st.integers(3, 7), seed=seed_st, rounding=rounding_st,
       dist=st.sampled_from(["normal", "exponential", "student", "pareto", "uniform"]),
       zeros=st.floats(0, 0.5))
def test_golden_fit_never_worse_than_reference(n, bits, seed, rounding, dist, zeros):
    g = gen(seed)
    x = make_data((n,), g, dist, zero_frac=zeros) * 10 ** float(torch.rand((), generator=g) * 4 - 2)
    a, s, b, e = dnateq.exp_fit(x, bits, "golden", rounding)
    _, _, _, rg = ref.exp_fit(x, bits, "golden", rounding)
    _, _, _, rp = ref.exp_fit(x, bits, "paper", rounding)
    assert e <= rg * (1 + 1e-9) + 1e-300 and e <= rp * (1 + 1e-9) + 1e-300, (e, rg, rp)
    assert math.isfinite(a) and a > 1 and s > 0
    assert abs(dnateq.exp_error(x, a, s, b, bits, rounding) - e) <= 1e-9 * max(e, 1e-300)


@SETTINGS
@given(k=st.integers(1, 24), n=st.integers(1, 6), bits=st.integers(3, 6), seed=seed_st,
       a_signed=st.booleans(), lead=st.integers(1, 4))
def test_module_modes_agree(k, n, bits, seed, a_signed, lead):
    """lut, count and fake agree (SPEC section 4: rtol 1e-4 in float32)."""
    g = gen(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(make_data((n, k), g))
        lin.bias.copy_(torch.randn(n, generator=g))
    x = make_data((lead, k), g, signed=a_signed)
    _, sa, ba = random_params(bits, g=g, lo=max(float(x.abs()[x != 0].min()), 1e-3)
                              if bool((x != 0).any()) else 1e-3,
                              hi=float(x.abs().max()) + 1e-3)
    q = dnateq.nn.ExpLinear.from_float(lin, bits, a_params=(sa, ba), a_signed=a_signed)
    outs = {}
    for mode in ("lut", "count", "fake"):
        q.mode = mode
        outs[mode] = q(x)
    a_hat = ref.exp_dequantize(ref.exp_quantize(x, q.alpha, q.sa, q.ba, bits), q.alpha, q.sa,
                               q.ba, bits)
    mag = linear_mag(a_hat, q.dequantized_weight(), q.bias)
    assert_close_rel(outs["lut"], outs["count"], mag, 1e-4, 1e-5, "lut vs count")
    assert_close_rel(outs["fake"], outs["count"], mag, 1e-4, 1e-5, "fake vs count")
