"""exp_linear_lut / exp_conv2d_lut against the fake-quantization oracle, and the
three execution modes ("count", "lut", "fake") agreeing (SPEC section 4)."""
import pytest
import torch

import dnateq
from dnateq import reference as ref

from conftest import (ALL_BITS, ROUNDINGS, assert_close_rel, conv_mag, gen, linear_mag,
                      make_data, noncontig, seed_of, tensor_params)

# tolerances per input dtype: (rtol, atol relative to the size of the summed terms)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1e-2, 1e-2)}
MODES_RTOL = 1e-4       # SPEC: "lut" agrees with "count" to rtol 1e-4 in float32
MODES_ATOL_REL = 1e-5


def _layer(x, w, bits, rounding, w_signed=True):
    """Parameters and packed weights of one layer, from float tensors."""
    alpha, sw, bw = tensor_params(w, bits)
    _, sa, ba = tensor_params(x, bits, alpha)
    w_codes = dnateq.exp_quantize(w, alpha, sw, bw, bits, rounding)
    packed = dnateq.exp_pack(w_codes, bits, w_signed)
    return (alpha, sa, ba, sw, bw), w_codes, packed


def _hats(x, w_codes, p, bits, rounding):
    alpha, sa, ba, sw, bw = p
    a_hat = ref.exp_dequantize(ref.exp_quantize(x, alpha, sa, ba, bits, rounding),
                               alpha, sa, ba, bits)
    w_hat = ref.exp_dequantize(w_codes, alpha, sw, bw, bits)
    return a_hat, w_hat


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_linear_lut_matches_oracle(bits, rounding, dtype):
    g = gen(seed_of("llut", bits, rounding, str(dtype)))
    for (M, K, N, a_signed) in [(1, 1, 1, True), (3, 7, 5, False), (4, 33, 6, True),
                                (2, 1000, 3, False)]:
        x = make_data((M, K), g, signed=a_signed, zero_frac=0.3, dtype=dtype)
        w = make_data((N, K), g, "student")
        bias = torch.randn(N, generator=g) if K != 7 else None
        p, w_codes, packed = _layer(x, w, bits, rounding)
        got = dnateq.exp_linear_lut(x, packed, [N, K], *p, bits, a_signed, True, rounding, bias)
        exp = ref.exp_linear_lut(x, packed, [N, K], *p, bits, a_signed, True, rounding, bias)
        assert got.dtype == dtype and got.shape == (M, N)
        a_hat, w_hat = _hats(x, w_codes, p, bits, rounding)
        rtol, atol = TOL[dtype]
        assert_close_rel(got, exp, linear_mag(a_hat, w_hat, bias), rtol, atol,
                         f"M,K,N={M},{K},{N}")


def _check_linear_lut_shapes(g, shapes, bits, w_signed, with_bias=(True,)):
    """exp_linear_lut against the oracle on [M, K] x [N, K] layers, with a
    bias and/or without."""
    for (M, K, N) in shapes:
        x = make_data((M, K), g, zero_frac=0.2)
        w = make_data((N, K), g, "student", signed=w_signed)
        bias = torch.randn(N, generator=g)
        p, w_codes, packed = _layer(x, w, bits, "nearest", w_signed)
        a_hat, w_hat = _hats(x, w_codes, p, bits, "nearest")
        for b in (bias if on else None for on in with_bias):
            got = dnateq.exp_linear_lut(x, packed, [N, K], *p, bits, True, w_signed,
                                        "nearest", b)
            exp = ref.exp_linear_lut(x, packed, [N, K], *p, bits, True, w_signed, "nearest", b)
            assert got.shape == (M, N)
            assert_close_rel(got, exp, linear_mag(a_hat, w_hat, b), 1e-5, 1e-5,
                             f"M,K,N={M},{K},{N} bias={b is not None}")


@pytest.mark.parametrize("bits,w_signed", [(2, False), (2, True), (4, False), (5, True),
                                           (7, False), (7, True)])
def test_linear_lut_gemv_paths(bits, w_signed):
    """The fused decode-and-dot kernel for 1..4 rows: every packed field width
    2..8, rows that are not a multiple of 8 fields, and rows longer than one
    1024-field chunk."""
    _check_linear_lut_shapes(gen(seed_of("llut-gemv", bits, w_signed)),
                             [(1, 8, 3), (2, 1031, 5), (3, 4100, 4), (4, 17, 9)],
                             bits, w_signed)


@pytest.mark.parametrize("bits,w_signed", [(2, True), (4, True), (5, False), (7, True)])
def test_linear_lut_gemm_paths(bits, w_signed):
    """The batched CPU paths: panels of weight rows decoded into a per-thread
    buffer (small activations, ragged last panel, bias slices), and the whole
    weight decoded once (activations above 2^18 floats)."""
    _check_linear_lut_shapes(gen(seed_of("llut-gemm", bits, w_signed)),
                             [(5, 33, 17), (64, 1000, 300), (37, 4099, 70), (300, 1024, 40)],
                             bits, w_signed, with_bias=(True, False))


@pytest.mark.parametrize("bits", [3, 5])
def test_linear_lut_shapes_noncontiguous_unsigned_weights(bits):
    g = gen(seed_of("llut-shapes", bits))
    rounding = "nearest"
    x = make_data((2, 3, 33), g)
    w = make_data((5, 33), g, signed=False)      # unsigned weights pack without sign
    p, w_codes, packed = _layer(x, w, bits, rounding, w_signed=False)
    assert packed.shape[1] == ref.packed_row_bytes(33, bits, False)
    got = dnateq.exp_linear_lut(x, packed, [5, 33], *p, bits, True, False, rounding)
    exp = ref.exp_linear_lut(x, packed, [5, 33], *p, bits, True, False, rounding)
    assert got.shape == (2, 3, 5)
    a_hat, w_hat = _hats(x, w_codes, p, bits, rounding)
    mag = linear_mag(a_hat.reshape(-1, 33), w_hat).reshape(2, 3, 5)
    assert_close_rel(got, exp, mag, 1e-5, 1e-5, "3-D")
    for kind in ("slice", "transpose"):
        got_nc = dnateq.exp_linear_lut(noncontig(x, kind), packed, [5, 33], *p, bits, True,
                                       False, rounding)
        assert_close_rel(got_nc, exp, mag, 1e-5, 1e-5, kind)
    got1 = dnateq.exp_linear_lut(x[0, 0], packed, [5, 33], *p, bits, True, False, rounding)
    assert got1.shape == (5,)
    e = dnateq.exp_linear_lut(x[:0], packed, [5, 33], *p, bits, True, False, rounding)
    assert e.shape == (0, 3, 5)


@pytest.mark.parametrize("bits", [3, 6])
def test_lut_negative_activations_on_unsigned_layer(bits):
    """a_signed=False is a hint only: negative inputs are still quantized with
    their sign (SPEC: never silently wrong)."""
    g = gen(seed_of("llut-neg", bits))
    x = make_data((6, 20), g, signed=False, zero_frac=0.3)
    w = make_data((4, 20), g)
    p, w_codes, packed = _layer(x, w, bits, "nearest")
    x[0, :5] = -x[0, :5] - 0.1
    got = dnateq.exp_linear_lut(x, packed, [4, 20], *p, bits, False, True, "nearest")
    exp = ref.exp_linear_lut(x, packed, [4, 20], *p, bits, True, True, "nearest")
    a_hat, w_hat = _hats(x, w_codes, p, bits, "nearest")
    assert_close_rel(got, exp, linear_mag(a_hat, w_hat), 1e-5, 1e-5, "negatives")
    xc = make_data((2, 3, 8, 8), g)
    wc = make_data((4, 3, 3, 3), g)
    p, w_codes, packed = _layer(xc, wc, bits, "nearest")
    got = dnateq.exp_conv2d_lut(xc, packed, [4, 3, 3, 3], *p, bits, False, True, "nearest",
                                None, (1, 1), (1, 1), (1, 1), 1)
    exp = ref.exp_conv2d_lut(xc, packed, [4, 3, 3, 3], *p, bits, True, True, "nearest",
                             None, (1, 1), (1, 1), (1, 1), 1)
    a_hat, w_hat = _hats(xc, w_codes, p, bits, "nearest")
    mag = conv_mag(a_hat, w_hat, None, (1, 1), (1, 1), (1, 1), 1)
    assert_close_rel(got, exp, mag, 1e-5, 1e-5, "conv negatives")


CONV_CASES = [
    # (N, C, H, W, O, kh, kw, stride, padding, dilation, groups)
    (1, 1, 5, 5, 1, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (2, 3, 7, 6, 4, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (1, 4, 9, 8, 6, 3, 2, (2, 1), (1, 2), (1, 2), 2),
    (2, 6, 6, 7, 6, 3, 3, (1, 2), (2, 0), (2, 1), 6),
]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_conv2d_lut_matches_oracle(bits, dtype):
    g = gen(seed_of("clut", bits, str(dtype)))
    for i, (N, C, H, W, O, kh, kw, s, pd, d, gr) in enumerate(CONV_CASES):
        rounding = ROUNDINGS[i % 2]
        a_signed = i % 2 == 0
        x = make_data((N, C, H, W), g, signed=a_signed, zero_frac=0.2, dtype=dtype)
        w = make_data((O, C // gr, kh, kw), g)
        bias = torch.randn(O, generator=g) if i % 2 else None
        p, w_codes, packed = _layer(x, w, bits, rounding)
        got = dnateq.exp_conv2d_lut(x, packed, list(w.shape), *p, bits, a_signed, True,
                                    rounding, bias, s, pd, d, gr)
        exp = ref.exp_conv2d_lut(x, packed, list(w.shape), *p, bits, a_signed, True,
                                 rounding, bias, s, pd, d, gr)
        assert got.dtype == dtype and got.shape == exp.shape
        a_hat, w_hat = _hats(x, w_codes, p, bits, rounding)
        rtol, atol = TOL[dtype]
        assert_close_rel(got, exp, conv_mag(a_hat, w_hat, bias, s, pd, d, gr), rtol, atol,
                         f"case {i}")


def test_conv2d_lut_noncontiguous_and_empty():
    g = gen(21)
    bits = 4
    x = make_data((2, 3, 7, 7), g)
    w = make_data((5, 3, 3, 3), g)
    p, w_codes, packed = _layer(x, w, bits, "nearest")
    args = (packed, [5, 3, 3, 3], *p, bits, True, True, "nearest", None, (1, 1), (1, 1),
            (1, 1), 1)
    base = dnateq.exp_conv2d_lut(x, *args)
    exp = ref.exp_conv2d_lut(x, *args)
    a_hat, w_hat = _hats(x, w_codes, p, bits, "nearest")
    mag = conv_mag(a_hat, w_hat, None, (1, 1), (1, 1), (1, 1), 1)
    assert_close_rel(base, exp, mag, 1e-5, 1e-5, "contiguous")
    for xn in (x.contiguous(memory_format=torch.channels_last), noncontig(x)):
        assert_close_rel(dnateq.exp_conv2d_lut(xn, *args), exp, mag, 1e-5, 1e-5, "noncontig")
    e = dnateq.exp_conv2d_lut(x[:0], *args)
    assert e.shape == (0, 5, 7, 7)


# --------------------------------------------------------------------------
# The three modes agree (float32, rtol 1e-4)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_linear_modes_agree(bits, rounding):
    g = gen(seed_of("modes-lin", bits, rounding))
    for (M, K, N, a_signed) in [(5, 33, 7, True), (4, 300, 5, False)]:
        x = make_data((M, K), g, signed=a_signed, zero_frac=0.4)
        w = make_data((N, K), g)
        bias = torch.randn(N, generator=g)
        p, w_codes, packed = _layer(x, w, bits, rounding)
        a_codes = dnateq.exp_quantize(x, p[0], p[1], p[2], bits, rounding)
        count = dnateq.exp_linear_count(a_codes, w_codes, *p, bits, bias)
        wt = None if a_signed else dnateq.weight_terms(w_codes, bits)
        count_wt = dnateq.exp_linear_count(a_codes, w_codes, *p, bits, bias, None, wt)
        lut = dnateq.exp_linear_lut(x, packed, [N, K], *p, bits, a_signed, True, rounding, bias)
        fake = ref.exp_linear_lut(x, packed, [N, K], *p, bits, a_signed, True, rounding, bias)
        a_hat, w_hat = _hats(x, w_codes, p, bits, rounding)
        mag = linear_mag(a_hat, w_hat, bias)
        assert torch.equal(count_wt, count)
        assert_close_rel(lut, count, mag, MODES_RTOL, MODES_ATOL_REL, "lut vs count")
        assert_close_rel(fake, count, mag, MODES_RTOL, MODES_ATOL_REL, "fake vs count")
        assert_close_rel(lut, fake, mag, MODES_RTOL, MODES_ATOL_REL, "lut vs fake")


@pytest.mark.parametrize("bits", [2, 4, 7])
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv2d_modes_agree(bits, case):
    N, C, H, W, O, kh, kw, s, pd, d, gr = CONV_CASES[case]
    g = gen(seed_of("modes-conv", bits, case))
    rounding = ROUNDINGS[case % 2]
    x = make_data((N, C, H, W), g, signed=False, zero_frac=0.5)
    w = make_data((O, C // gr, kh, kw), g)
    bias = torch.randn(O, generator=g)
    p, w_codes, packed = _layer(x, w, bits, rounding)
    a_codes = dnateq.exp_quantize(x, p[0], p[1], p[2], bits, rounding)
    count = dnateq.exp_conv2d_count(a_codes, w_codes, *p, bits, bias, s, pd, d, gr)
    count_wt = dnateq.exp_conv2d_count(a_codes, w_codes, *p, bits, bias, s, pd, d, gr, None,
                                       dnateq.weight_terms(w_codes, bits))
    lut = dnateq.exp_conv2d_lut(x, packed, list(w.shape), *p, bits, False, True, rounding,
                                bias, s, pd, d, gr)
    fake = ref.exp_conv2d_lut(x, packed, list(w.shape), *p, bits, False, True, rounding,
                              bias, s, pd, d, gr)
    a_hat, w_hat = _hats(x, w_codes, p, bits, rounding)
    mag = conv_mag(a_hat, w_hat, bias, s, pd, d, gr)
    assert torch.equal(count_wt, count)
    assert_close_rel(lut, count, mag, MODES_RTOL, MODES_ATOL_REL, "lut vs count")
    assert_close_rel(fake, count, mag, MODES_RTOL, MODES_ATOL_REL, "fake vs count")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_modes_agree_half_precision(dtype):
    """Half-precision "lut" agrees with the float32 count to about 1e-2."""
    g = gen(seed_of("modes-half", str(dtype)))
    bits = 5
    x = make_data((8, 64), g, signed=False, zero_frac=0.3, dtype=dtype)
    w = make_data((6, 64), g)
    bias = torch.randn(6, generator=g)
    p, w_codes, packed = _layer(x, w, bits, "nearest")
    a_codes = dnateq.exp_quantize(x, p[0], p[1], p[2], bits, "nearest")
    count = dnateq.exp_linear_count(a_codes, w_codes, *p, bits, bias)
    lut = dnateq.exp_linear_lut(x, packed, [6, 64], *p, bits, False, True, "nearest", bias)
    assert lut.dtype == dtype
    a_hat, w_hat = _hats(x, w_codes, p, bits, "nearest")
    assert_close_rel(lut, count, linear_mag(a_hat, w_hat, bias), 1e-2, 1e-2, str(dtype))


def test_lut_does_not_modify_inputs():
    g = gen(22)
    x = make_data((3, 10), g)
    w = make_data((4, 10), g)
    p, w_codes, packed = _layer(x, w, 4, "nearest")
    x0, p0 = x.clone(), packed.clone()
    bias = torch.randn(4, generator=g)
    b0 = bias.clone()
    dnateq.exp_linear_lut(x, packed, [4, 10], *p, 4, True, True, "nearest", bias)
    assert torch.equal(x, x0) and torch.equal(packed, p0) and torch.equal(bias, b0)
