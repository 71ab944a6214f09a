"""exp_linear_count / exp_conv2d_count (SPEC section 4) against the oracle:
exact counts, counter saturation, the precomputed weight-terms path, convs."""
import pytest
import torch
import torch.nn.functional as F

import dnateq
from dnateq import reference as ref

from conftest import (ALL_BITS, assert_close_rel, conv_mag, deq64, gen, linear_mag,
                      make_data, noncontig, quantize_pair, random_codes, random_params,
                      seed_of)

# Both sides compute exact integer counts and post-process in float64 before
# rounding to float32: only the float64 summation order may differ.
RTOL = 2e-6
ATOL_REL = 1e-6


def _params(bits, g):
    alpha, sw, bw = random_params(bits, g=g)
    _, sa, ba = random_params(bits, g=g, alpha=alpha)
    return alpha, sa, ba, sw, bw


def _check_linear(a, w, p, bits, bias=None, counter_bits=None, w_terms=None, ctx=""):
    alpha, sa, ba, sw, bw = p
    got = dnateq.exp_linear_count(a, w, alpha, sa, ba, sw, bw, bits, bias, counter_bits,
                                  w_terms)
    exp = ref.exp_linear_count(a, w, alpha, sa, ba, sw, bw, bits, bias, counter_bits)
    assert got.dtype == torch.float32
    assert got.shape == (*a.shape[:-1], w.shape[0])
    mag = linear_mag(deq64(a, alpha, sa, ba, bits).reshape(-1, a.shape[-1]),
                     deq64(w, alpha, sw, bw, bits), bias).reshape(got.shape)
    assert_close_rel(got, exp, mag, RTOL, ATOL_REL, ctx)
    return got, exp


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("a_signed", [True, False], ids=["a_signed", "a_unsigned"])
def test_linear_count_matches_oracle(bits, a_signed):
    g = gen(seed_of("lin", bits, a_signed))
    for (M, K, N) in [(1, 1, 1), (3, 7, 5), (4, 33, 6), (2, 1000, 3), (5, 16, 1)]:
        p = _params(bits, g)
        a = random_codes((M, K), bits, g, signed=a_signed, zero_frac=0.3)
        w = random_codes((N, K), bits, g, signed=True, zero_frac=0.1)
        bias = torch.randn(N, generator=g) if K % 2 else None
        _check_linear(a, w, p, bits, bias, ctx=f"M,K,N={M},{K},{N}")


@pytest.mark.parametrize("bits", [3, 6])
def test_linear_count_batch_dims_noncontiguous_empty(bits):
    g = gen(seed_of("lin-batch", bits))
    p = _params(bits, g)
    a = random_codes((2, 3, 33), bits, g)
    w = random_codes((5, 33), bits, g)
    got, _ = _check_linear(a, w, p, bits, ctx="3-D")
    got_nc = dnateq.exp_linear_count(noncontig(a), noncontig(w, "transpose"), *p, bits)
    assert torch.equal(got_nc, got)
    got_1d = dnateq.exp_linear_count(a[0, 0], w, *p, bits)
    assert got_1d.shape == (5,)
    assert torch.equal(got_1d, got[0, 0])
    # empty batch
    e = dnateq.exp_linear_count(a[:0].reshape(0, 33), w, *p, bits)
    assert e.shape == (0, 5) and e.dtype == torch.float32
    # K = 0: only the bias
    bias = torch.randn(5, generator=g)
    a0 = torch.zeros(4, 0, dtype=torch.int8)
    w0 = torch.zeros(5, 0, dtype=torch.int8)
    y = dnateq.exp_linear_count(a0, w0, *p, bits, bias)
    assert y.shape == (4, 5)
    assert torch.equal(y, bias.expand(4, 5))
    # N = 0
    y = dnateq.exp_linear_count(a[0], w[:0], *p, bits)
    assert y.shape == (3, 0)


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_linear_count_all_zero_and_extremes(bits):
    """All-zero activations give exactly the bias; extreme exponents (e = +-E on
    both sides, C1 at k = +-2E) are counted."""
    g = gen(seed_of("lin-ext", bits))
    p = _params(bits, g)
    K, N = 9, 4
    w = random_codes((N, K), bits, g)
    bias = torch.randn(N, generator=g)
    y = dnateq.exp_linear_count(torch.zeros(3, K, dtype=torch.int8), w, *p, bits, bias)
    assert torch.equal(y, bias.expand(3, N))
    top, bot = (1 << bits) - 1, 1
    a = torch.tensor([[top] * K, [bot] * K, [top | 0x80] * K], dtype=torch.int16)
    a = a.to(torch.uint8).view(torch.int8)
    wx = torch.tensor([[top] * K, [bot] * K, [bot | 0x80] * K, [0] * K], dtype=torch.int16)
    wx = wx.to(torch.uint8).view(torch.int8)
    _check_linear(a, wx, p, bits, bias, ctx="extremes")


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_linear_count_agrees_with_float64_dot(bits):
    """Eq. 8 equals the dot product of the dequantized (float64-level) tensors."""
    g = gen(seed_of("lin-f64", bits))
    x = make_data((6, 40), g, signed=False, zero_frac=0.4)
    w = make_data((7, 40), g)
    a, wc, p = quantize_pair(x, w, bits)
    alpha, sa, ba, sw, bw = p
    bias = torch.randn(7, generator=g)
    got = dnateq.exp_linear_count(a, wc, *p, bits, bias)
    ah, wh = deq64(a, alpha, sa, ba, bits), deq64(wc, alpha, sw, bw, bits)
    exp = ah @ wh.T + bias.double()
    assert_close_rel(got, exp, linear_mag(ah, wh, bias), 1e-6, 1e-6, "float64 dot")


@pytest.mark.parametrize("bits", [4, 7])
def test_count_ops_larger_shapes(bits):
    """Shapes large enough for the kernels' parallel / blocked paths."""
    g = gen(seed_of("large", bits))
    p = _params(bits, g)
    a = random_codes((64, 513), bits, g, signed=False, zero_frac=0.6)
    w = random_codes((24, 513), bits, g)
    bias = torch.randn(24, generator=g)
    got, _ = _check_linear(a, w, p, bits, bias, ctx="large linear")
    wt = dnateq.weight_terms(w, bits)
    assert torch.equal(dnateq.exp_linear_count(a, w, *p, bits, bias, None, wt), got)
    a4 = random_codes((2, 8, 16, 16), bits, g, signed=False, zero_frac=0.5)
    w4 = random_codes((8, 8, 3, 3), bits, g)
    got = _conv_check(a4, w4, p, bits, None, (1, 1), (1, 1), (1, 1), 1, ctx="large conv")
    wt4 = dnateq.weight_terms(w4, bits)
    assert torch.equal(dnateq.exp_conv2d_count(a4, w4, *p, bits, None, (1, 1), (1, 1), (1, 1),
                                                1, None, wt4), got)


# --------------------------------------------------------------------------
# counter_bits
# --------------------------------------------------------------------------

@pytest.mark.parametrize("counter_bits", [4, 8])
@pytest.mark.parametrize("bits", [3, 5])
def test_counter_bits_saturation(bits, counter_bits):
    """Counts beyond 2^(b-1)-1 (and below -2^(b-1)) are clamped per final count."""
    g = gen(seed_of("sat", bits, counter_bits))
    p = _params(bits, g)
    K = 300
    lim = (1 << (counter_bits - 1)) - 1
    assert K > lim
    c1 = 1 << (bits - 1)          # e = 0
    c2 = c1 + 1                   # e = 1
    a = torch.full((3, K), c1, dtype=torch.int16)
    a[1, :] = c2
    a[2, : K // 2] = c1 | 0x80     # half negative: partial cancellation
    a = a.to(torch.uint8).view(torch.int8)
    w = torch.full((2, K), c1, dtype=torch.int16)
    w[1] = c2 | 0x80               # all negative -> counts <= -K
    w = w.to(torch.uint8).view(torch.int8)
    bias = torch.randn(2, generator=g)
    got, exp = _check_linear(a, w, p, bits, bias, counter_bits, ctx="saturated")
    unclamped = ref.exp_linear_count(a, w, *p, bits, bias)
    assert not torch.allclose(exp, unclamped), "test inputs do not saturate"
    assert not torch.allclose(got, unclamped)
    # the clamp is on final counts: check one entry by hand (row 0, col 0):
    # C1[0] = C2[0] = C3[0] = C4 = K -> all clamped to lim
    alpha, sa, ba, sw, bw = p
    y00 = sa * sw * lim + ba * sw * lim + sa * bw * lim + ba * bw * lim + bias[0].item()
    assert got[0, 0].item() == pytest.approx(y00, rel=1e-6, abs=1e-6 * abs(y00))
    # wide counters change nothing
    wide = dnateq.exp_linear_count(a, w, *p, bits, bias, 32)
    assert torch.allclose(wide, unclamped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_counter_bits_random(bits):
    g = gen(seed_of("sat-rand", bits))
    p = _params(bits, g)
    a = random_codes((5, 200), bits, g, signed=False, zero_frac=0.1)
    w = random_codes((4, 200), bits, g, signed=True)
    for cb in (2, 3, 6, 8, 16):
        _check_linear(a, w, p, bits, None, cb, ctx=f"counter_bits={cb}")


# --------------------------------------------------------------------------
# precomputed weight terms (w_terms)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 5, 7])
@pytest.mark.parametrize("zero_frac", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_w_terms_equals_direct_count_unsigned(bits, zero_frac):
    """Unsigned activations with < half and > half zeros: exact equality."""
    g = gen(seed_of("wt", bits, zero_frac))
    p = _params(bits, g)
    K, N = 65, 6
    a = random_codes((2, 7, K), bits, g, signed=False, zero_frac=zero_frac)
    w = random_codes((N, K), bits, g, signed=True, zero_frac=0.15)
    wt = dnateq.weight_terms(w, bits)
    assert wt.dtype == torch.int32 and list(wt.shape) == [N, 1 << bits]
    bias = torch.randn(N, generator=g)
    direct = dnateq.exp_linear_count(a, w, *p, bits, bias)
    with_terms = dnateq.exp_linear_count(a, w, *p, bits, bias, None, wt)
    assert torch.equal(with_terms, direct)
    _check_linear(a, w, p, bits, bias, None, wt, ctx="w_terms")


@pytest.mark.parametrize("bits", [3, 6])
@pytest.mark.parametrize("neg_frac", [0.01, 0.5])
def test_w_terms_with_negative_activations(bits, neg_frac):
    """Negatives reaching an "unsigned" layer: still exact (counts directly)."""
    g = gen(seed_of("wt-neg", bits, neg_frac))
    p = _params(bits, g)
    K, N = 40, 5
    a = random_codes((8, K), bits, g, signed=False, zero_frac=0.5).view(torch.uint8)
    a[0, 0] = 1                    # at least one negative element
    neg = (torch.rand(8, K, generator=g) < neg_frac) & (a != 0)
    neg[0, 0] = True
    a = torch.where(neg, a | 0x80, a).view(torch.int8)
    assert bool((a < 0).any())
    w = random_codes((N, K), bits, g)
    wt = dnateq.weight_terms(w, bits)
    direct = dnateq.exp_linear_count(a, w, *p, bits)
    assert torch.equal(dnateq.exp_linear_count(a, w, *p, bits, None, None, wt), direct)
    _check_linear(a, w, p, bits, None, None, wt, ctx="w_terms negatives")


def test_w_terms_with_counter_bits_counts_directly():
    g = gen(7)
    bits = 3
    p = _params(bits, g)
    a = torch.full((2, 200), 4, dtype=torch.int8)
    a[1, :50] = 0
    w = torch.full((3, 200), 4, dtype=torch.int8)
    wt = dnateq.weight_terms(w, bits)
    got = dnateq.exp_linear_count(a, w, *p, bits, None, 8, wt)
    exp = ref.exp_linear_count(a, w, *p, bits, None, 8)
    assert torch.allclose(got, exp, rtol=1e-6, atol=1e-6 * exp.abs().max().item())


def test_weight_terms_definition():
    bits = 3
    w = torch.tensor([[4, 4, -124, 0, 1], [0, 0, 0, 0, -128]], dtype=torch.int8)
    wt = dnateq.weight_terms(w, bits)
    exp = torch.zeros(2, 8, dtype=torch.int32)
    exp[0, 4] = 2 - 1   # two +e0, one -e0 (-124 = 0x84)
    exp[0, 1] = 1
    assert torch.equal(wt, exp)


# --------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------

CONV_CASES = [
    # (N, C, H, W, O, kh, kw, stride, padding, dilation, groups)
    (1, 1, 5, 5, 1, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (2, 3, 7, 6, 4, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (1, 4, 9, 8, 6, 3, 2, (2, 1), (1, 2), (1, 2), 2),
    (2, 6, 6, 7, 6, 3, 3, (1, 2), (2, 0), (2, 1), 6),   # depthwise
    (1, 4, 5, 5, 8, 2, 2, (3, 3), (0, 1), (1, 1), 4),
    (1, 2, 3, 3, 3, 3, 3, (1, 1), (0, 0), (1, 1), 1),   # 1x1 output, K = 18
]


def _conv_check(a, w, p, bits, bias, stride, padding, dilation, groups, counter_bits=None,
                w_terms=None, ctx=""):
    alpha, sa, ba, sw, bw = p
    got = dnateq.exp_conv2d_count(a, w, alpha, sa, ba, sw, bw, bits, bias, stride, padding,
                                  dilation, groups, counter_bits, w_terms)
    exp = ref.exp_conv2d_count(a, w, alpha, sa, ba, sw, bw, bits, bias, stride, padding,
                               dilation, groups, counter_bits)
    assert got.dtype == torch.float32
    assert got.shape == exp.shape, f"{ctx}: {got.shape} vs {exp.shape}"
    mag = conv_mag(deq64(a, alpha, sa, ba, bits), deq64(w, alpha, sw, bw, bits), bias,
                   stride, padding, dilation, groups)
    assert_close_rel(got, exp, mag, RTOL, ATOL_REL, ctx)
    return got


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv2d_count_matches_oracle(bits, case):
    N, C, H, W, O, kh, kw, stride, padding, dilation, groups = CONV_CASES[case]
    g = gen(seed_of("conv", bits, case))
    p = _params(bits, g)
    a = random_codes((N, C, H, W), bits, g, signed=case % 2 == 0, zero_frac=0.3)
    w = random_codes((O, C // groups, kh, kw), bits, g)
    bias = torch.randn(O, generator=g) if case % 3 else None
    _conv_check(a, w, p, bits, bias, stride, padding, dilation, groups, ctx=f"case {case}")


@pytest.mark.parametrize("bits", [3, 5])
def test_conv2d_count_vs_float64_conv(bits):
    """Padded positions are zero codes = zero padding in float."""
    g = gen(seed_of("conv-f64", bits))
    x = make_data((2, 4, 8, 8), g, signed=False, zero_frac=0.3)
    w = make_data((6, 2, 3, 3), g)
    a, wc, p = quantize_pair(x, w, bits)
    alpha, sa, ba, sw, bw = p
    got = dnateq.exp_conv2d_count(a, wc, *p, bits, None, (1, 1), (2, 1), (1, 2), 2)
    ah, wh = deq64(a, alpha, sa, ba, bits), deq64(wc, alpha, sw, bw, bits)
    exp = F.conv2d(ah, wh, None, (1, 1), (2, 1), (1, 2), 2)
    assert_close_rel(got, exp, conv_mag(ah, wh, None, (1, 1), (2, 1), (1, 2), 2), 1e-6, 1e-6)


@pytest.mark.parametrize("bits", [3, 6])
@pytest.mark.parametrize("zero_frac", [0.2, 0.8])
def test_conv2d_w_terms_equals_direct(bits, zero_frac):
    """With padding (padded zeros must be corrected for, too) and groups."""
    g = gen(seed_of("conv-wt", bits, zero_frac))
    p = _params(bits, g)
    for (N, C, H, W, O, kh, kw, stride, padding, dilation, groups) in CONV_CASES[1:4]:
        a = random_codes((N, C, H, W), bits, g, signed=False, zero_frac=zero_frac)
        w = random_codes((O, C // groups, kh, kw), bits, g)
        wt = dnateq.weight_terms(w, bits)
        bias = torch.randn(O, generator=g)
        direct = dnateq.exp_conv2d_count(a, w, *p, bits, bias, stride, padding, dilation,
                                          groups)
        got = _conv_check(a, w, p, bits, bias, stride, padding, dilation, groups, None, wt)
        assert torch.equal(got, direct)
        # with negatives in the activations
        u = a.view(torch.uint8).clone()
        u[0, 0] = torch.where(u[0, 0] != 0, u[0, 0] | 0x80, u[0, 0])
        a2 = u.view(torch.int8)
        assert bool((a2 < 0).any())
        direct = dnateq.exp_conv2d_count(a2, w, *p, bits, bias, stride, padding, dilation,
                                          groups)
        got = _conv_check(a2, w, p, bits, bias, stride, padding, dilation, groups, None, wt)
        assert torch.equal(got, direct)


def test_conv2d_count_counter_bits():
    bits = 3
    g = gen(11)
    p = _params(bits, g)
    a = torch.full((1, 8, 6, 6), 4, dtype=torch.int8)       # e = 0 everywhere
    w = torch.full((2, 8, 3, 3), 4, dtype=torch.int8)       # K = 72 > 2^5 - 1
    got = _conv_check(a, w, p, bits, None, (1, 1), (1, 1), (1, 1), 1, counter_bits=6)
    unclamped = ref.exp_conv2d_count(a, w, *p, bits, None, (1, 1), (1, 1), (1, 1), 1)
    assert not torch.allclose(got, unclamped)


def test_conv2d_count_noncontiguous_and_empty():
    bits = 4
    g = gen(12)
    p = _params(bits, g)
    a = random_codes((2, 3, 6, 5), bits, g)
    w = random_codes((4, 3, 3, 3), bits, g)
    base = dnateq.exp_conv2d_count(a, w, *p, bits, None, (1, 1), (1, 1), (1, 1), 1)
    a_cl = a.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    assert torch.equal(dnateq.exp_conv2d_count(a_cl, w_cl, *p, bits, None, (1, 1), (1, 1),
                                                (1, 1), 1), base)
    a_sl = torch.cat([a, a], 3)[..., ::2]
    ref_sl = ref.exp_conv2d_count(a_sl.contiguous(), w, *p, bits, None, 1, 1, 1, 1)
    got_sl = dnateq.exp_conv2d_count(a_sl, w, *p, bits, None, (1, 1), (1, 1), (1, 1), 1)
    assert torch.allclose(got_sl, ref_sl, rtol=1e-6, atol=1e-6 * ref_sl.abs().max().item())
    e = dnateq.exp_conv2d_count(a[:0], w, *p, bits, None, (1, 1), (1, 1), (1, 1), 1)
    assert e.shape == (0, 4, 6, 5)
