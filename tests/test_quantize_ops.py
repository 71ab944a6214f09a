"""exp_quantize / exp_dequantize against the oracle, bit for bit."""
import pytest
import torch

import dnateq
from dnateq import reference as ref

from conftest import (ALL_BITS, FLOAT_DTYPES, ROUNDINGS, assert_bitwise_equal_float,
                      assert_codes_equal, gen, make_data, noncontig, random_codes,
                      random_params, seed_of)

SHAPES = [(), (1,), (7,), (33,), (1000,), (3, 0), (0,), (4, 7, 5), (2, 3, 1, 33)]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_matches_oracle(bits, rounding, dtype, signed):
    g = gen(seed_of("q", bits, rounding, str(dtype), signed))
    for shape in SHAPES:
        alpha, S, beta = random_params(bits, signed, g=g)
        x = make_data(shape, g, "normal", signed, zero_frac=0.1, dtype=dtype) * 3
        got = dnateq.exp_quantize(x, alpha, S, beta, bits, rounding)
        exp = ref.exp_quantize(x, alpha, S, beta, bits, rounding)
        assert got.dtype == torch.int8 and got.shape == x.shape
        assert_codes_equal(got, exp, f"shape={shape}")
        if not signed:
            assert not bool((got < 0).any())


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_quantize_offset_jitter_and_distributions(bits, rounding):
    """Any beta (also negative), heavy-tailed data, values far outside the levels."""
    g = gen(seed_of("q-jitter", bits, rounding))
    for dist in ["normal", "exponential", "student", "pareto", "uniform"]:
        alpha, S, beta = random_params(bits, g=g, offset_jitter=True)
        x = make_data((257,), g, dist, zero_frac=0.05) * float(10 ** (torch.rand((), generator=g) * 2 - 1))
        got = dnateq.exp_quantize(x, alpha, S, beta, bits, rounding)
        assert_codes_equal(got, ref.exp_quantize(x, alpha, S, beta, bits, rounding), dist)


@pytest.mark.parametrize("bits", [2, 4, 7])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_quantize_noncontiguous(bits, dtype):
    g = gen(seed_of("q-nc", bits, str(dtype)))
    alpha, S, beta = random_params(bits, g=g)
    x = make_data((9, 33), g, dtype=dtype)
    for kind in ["slice", "transpose"]:
        xn = noncontig(x, kind)
        got = dnateq.exp_quantize(xn, alpha, S, beta, bits, "nearest")
        assert_codes_equal(got, dnateq.exp_quantize(x.contiguous(), alpha, S, beta, bits), kind)
        assert_codes_equal(got, ref.exp_quantize(x, alpha, S, beta, bits), kind)
    # expanded (stride 0) input
    xe = x[:1].expand(5, 33)
    assert_codes_equal(dnateq.exp_quantize(xe, alpha, S, beta, bits),
                       ref.exp_quantize(xe.contiguous(), alpha, S, beta, bits), "expand")


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_quantize_large_tensor(rounding):
    """Large enough for the CPU kernel's parallel path."""
    g = gen(seed_of("q-large", rounding))
    for bits in (3, 7):
        alpha, S, beta = random_params(bits, g=g)
        x = make_data((300, 701), g, "student", zero_frac=0.2)
        assert_codes_equal(dnateq.exp_quantize(x, alpha, S, beta, bits, rounding),
                           ref.exp_quantize(x, alpha, S, beta, bits, rounding), f"bits={bits}")


def test_quantize_default_rounding_is_nearest():
    x = torch.tensor([1.58])
    assert dnateq.exp_quantize(x, 2.0, 0.5, 0.1, 3).item() == 5
    assert dnateq.exp_quantize(x, 2.0, 0.5, 0.1, 3, "log").item() == 6


def test_quantize_check_finite_false_on_finite_data():
    g = gen(1)
    x = make_data((100,), g)
    a = dnateq.exp_quantize(x, 1.3, 0.1, 0.01, 5, "nearest", False)
    b = dnateq.exp_quantize(x, 1.3, 0.1, 0.01, 5, "nearest", True)
    assert_codes_equal(a, b)


def test_quantize_does_not_modify_input():
    g = gen(2)
    x = make_data((50,), g)
    x0 = x.clone()
    dnateq.exp_quantize(x, 1.3, 0.1, 0.01, 5)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES + [None], ids=str)
def test_dequantize_all_codes_matches_oracle(bits, out_dtype):
    """Every valid code (both signs, incl. the signed zero code 0x80)."""
    g = gen(seed_of("dq", bits, str(out_dtype)))
    alpha, S, beta = random_params(bits, g=g, offset_jitter=True)
    mags = torch.arange(0, 1 << bits, dtype=torch.int16)
    codes = torch.cat([mags, mags | 0x80]).to(torch.uint8).view(torch.int8)
    if out_dtype is None:
        got = dnateq.exp_dequantize(codes, alpha, S, beta, bits)
        exp = ref.exp_dequantize(codes, alpha, S, beta, bits)
        assert got.dtype == torch.float32
    else:
        got = dnateq.exp_dequantize(codes, alpha, S, beta, bits, out_dtype)
        exp = ref.exp_dequantize(codes, alpha, S, beta, bits, out_dtype)
        assert got.dtype == out_dtype
    assert_bitwise_equal_float(got, exp, f"bits={bits}")
    assert got[0].item() == 0 and got[1 << bits].item() == 0
    # sign symmetry
    n = 1 << bits
    assert torch.equal(got[n + 1:], -got[1:n])


@pytest.mark.parametrize("bits", [2, 5, 7])
def test_dequantize_shapes_and_noncontiguous(bits):
    g = gen(seed_of("dq-shapes", bits))
    alpha, S, beta = random_params(bits, g=g)
    for shape in SHAPES:
        c = random_codes(shape, bits, g)
        got = dnateq.exp_dequantize(c, alpha, S, beta, bits)
        assert got.shape == c.shape
        assert_bitwise_equal_float(got, ref.exp_dequantize(c, alpha, S, beta, bits), str(shape))
    c = random_codes((6, 17), bits, g)
    for kind in ["slice", "transpose"]:
        got = dnateq.exp_dequantize(noncontig(c, kind), alpha, S, beta, bits)
        assert_bitwise_equal_float(got, ref.exp_dequantize(c, alpha, S, beta, bits), kind)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_quantize_dequantize_roundtrip(bits, rounding):
    """Every level quantizes back to its own code (alpha well above 1)."""
    g = gen(seed_of("rt", bits, rounding))
    alpha, S, beta = random_params(bits, g=g)
    if alpha < 1.01:
        pytest.skip("alpha too close to 1 for an exact round trip")
    mags = torch.arange(1, 1 << bits, dtype=torch.int16)
    codes = torch.cat([mags, mags | 0x80]).to(torch.uint8).view(torch.int8)
    xh = dnateq.exp_dequantize(codes, alpha, S, beta, bits)
    back = dnateq.exp_quantize(xh, alpha, S, beta, bits, rounding)
    assert_codes_equal(back, codes)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_quantize_half_widened_to_float32(dtype):
    """Half/bfloat16 inputs are widened to float32 before comparing: codes equal
    those of the same values given as float32."""
    g = gen(seed_of("widen", str(dtype)))
    alpha, S, beta = random_params(5, g=g)
    x = make_data((500,), g, dtype=dtype)
    assert_codes_equal(dnateq.exp_quantize(x, alpha, S, beta, 5),
                       dnateq.exp_quantize(x.float(), alpha, S, beta, 5))


# -- the bucket-table quantizer (tensors of >= 32768 elements) ----------------

def _threshold_probes(alpha, S, beta, bits, rounding, g, n=1 << 16):
    """Every threshold, its float32 neighbours on both sides, zeros of both
    signs, denormals, huge values, and random data: the hard cases of a
    table-driven comparator, in a tensor large enough to take that path."""
    E = (1 << (bits - 1)) - 1
    j = torch.arange(-E, E, dtype=torch.float64)
    if rounding == "log":
        t = beta + S * alpha ** (j + 0.5)
    else:
        t = beta + S * 0.5 * (alpha ** j + alpha ** (j + 1))
    t = t.float()
    near = torch.cat([t, torch.nextafter(t, torch.full_like(t, -1e30)),
                      torch.nextafter(t, torch.full_like(t, 1e30))])
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, 3e38, -3e38, 1e-30])
    body = torch.randn(n, generator=g) * float(t.abs().max())
    x = torch.cat([near, -near, special, body])
    return x[torch.randperm(x.numel(), generator=g)]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("case", ["fit", "negative_beta", "alpha_near_1"])
def test_fast_paths_are_bit_exact(bits, rounding, case):
    # bits <= 3: the register compare encoder; larger: the bucket table, or
    # the counting comparator where the thresholds are too dense for it.
    g = gen(seed_of("bucket", bits, rounding, case))
    if case == "fit":
        alpha, S, beta = random_params(bits, g=g)
    elif case == "negative_beta":
        alpha, S, beta = random_params(bits, g=g)
        beta = -3.0 * S            # some thresholds <= 0: below every magnitude
    else:
        alpha, S, beta = 1.0 + 1e-3, 1.0, 0.0   # too dense for the table: counting path
    x = _threshold_probes(alpha, S, beta, bits, rounding, g)
    assert x.numel() >= 1 << 15
    assert_codes_equal(dnateq.exp_quantize(x, alpha, S, beta, bits, rounding),
                       ref.exp_quantize(x, alpha, S, beta, bits, rounding), case)
    # half/bfloat16 inputs widen to float32 first, then take the same path
    for dt in (torch.float16, torch.bfloat16):
        xh = x.clamp(-6e4, 6e4).to(dt)
        assert_codes_equal(dnateq.exp_quantize(xh, alpha, S, beta, bits, rounding),
                           ref.exp_quantize(xh, alpha, S, beta, bits, rounding), str(dt))
    # fake quantization (the LUT operators' input path) uses the same table
    xm = x[: x.numel() // 8 * 8].reshape(-1, 8)
    w = torch.randn(3, 8, generator=g)
    wp = dnateq.exp_pack(dnateq.exp_quantize(w, alpha, S, abs(beta), bits, rounding), bits, True)
    args = (wp, list(w.shape), alpha, S, beta, S, abs(beta), bits, True, True, rounding, None)
    torch.testing.assert_close(dnateq.exp_linear_lut(xm, *args),
                               ref.exp_linear_lut(xm, *args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 5, 6, 7])
@pytest.mark.parametrize("alpha", [1.01, 1.3])
def test_word_search_key_ties_are_exact(bits, alpha):
    # The AVX-512 codes search on the top 16 bits of |x| and corrects the one
    # threshold whose top half equals |x|'s: magnitudes with a threshold's top
    # half and the lowest / highest low half, and the threshold's neighbours,
    # must get the exact count (alpha 1.01: thresholds 1 % apart, keys 2^-7).
    g = gen(seed_of("word", bits, alpha))
    x = _threshold_probes(alpha, 1.0, 0.0, bits, "nearest", g, n=1 << 15)
    hi = (x.view(torch.int32) & ~0xFFFF)
    ties = torch.cat([hi.view(torch.float32), (hi | 0xFFFF).view(torch.float32)])
    x = torch.cat([x, ties[torch.isfinite(ties)], torch.tensor([1.0] * 5)])  # odd length: a tail
    assert_codes_equal(dnateq.exp_quantize(x, alpha, 1.0, 0.0, bits),
                       ref.exp_quantize(x, alpha, 1.0, 0.0, bits), "ties")


# Parameter sets and the AVX-512 code encoder each takes: the key search whose
# first 5 / 4 steps are one lookup of 64 key cells (thresholds about evenly
# spread in log scale: cells from the smallest probe; fits of N(0, 1), beta <
# 0: the smallest positive threshold lies far below the rest, alone in cell 0;
# probes too close for 64 cells at 5 steps, but not at 4), the key search
# alone (thresholds just above 0, beta < 0: too uneven for either), and the
# float search (beta >> S: threshold keys collide).
_WORD_PLANS = [(6, 1.05, 0.5, 0.0, "avx512_word_cell5"),
               (4, 1.2, 0.5, 0.0, "avx512_word_cell4"),
               (7, 1.0199, 1.444, -0.4184, "avx512_word_cell5"),
               (5, 1.05, 1.5, -0.8, "avx512_word_cell4"),
               (7, 1.1, 1.5, 0.05, "avx512_word_cell4"),
               (5, 1.05, 0.5, -1.0, "avx512_word"),
               (5, 1.05, 0.5, 10.0, "avx512_float")]


@pytest.mark.parametrize("bits,alpha,S,beta,plan", _WORD_PLANS)
def test_word_search_plans_are_exact(bits, alpha, S, beta, plan):
    # Every finite 16-bit key (so every cell of the cell start, whole), each
    # with the lowest, the highest and a random low half, both signs, plus
    # the thresholds and their neighbours: the codes of every plan must equal
    # the reference's, and the plan must be the one this parameter set takes.
    g = gen(seed_of("plans", bits, alpha, beta))
    keys = torch.arange(0, 0x7F80, dtype=torch.int32) << 16
    low = torch.randint(0, 1 << 16, keys.shape, generator=g, dtype=torch.int32)
    mags = torch.cat([keys, keys | 0xFFFF, keys | low]).view(torch.float32)
    x = torch.cat([mags, -mags, _threshold_probes(alpha, S, beta, bits, "nearest", g, n=64)])
    x = x[torch.randperm(x.numel(), generator=g)]
    got = dnateq.exp_quantize(x, alpha, S, beta, bits)
    if dnateq.ops.cpu_isa() == "avx512":
        assert dnateq.ops.last_quantize_path() == plan
    assert_codes_equal(got, ref.exp_quantize(x, alpha, S, beta, bits), plan)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("bits", [3, 4])    # compare encoder, bucket table
def test_fast_paths_reject_non_finite(bad, bits):
    g = gen(7)
    alpha, S, beta = random_params(bits, g=g)
    x = torch.randn(1 << 16, generator=g)
    x[12345] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        dnateq.exp_quantize(x, alpha, S, beta, bits)
    x[12345] = 0.0
    x[-3] = bad                                               # the scalar tail too
    with pytest.raises(RuntimeError, match="non-finite"):
        dnateq.exp_quantize(x[:-1], alpha, S, beta, bits)
    with pytest.raises(RuntimeError, match="non-finite"):     # fake quantization
        dnateq.exp_linear_lut(x[:-1].reshape(-1, 5), dnateq.exp_pack(
            torch.ones(2, 5, dtype=torch.int8), bits, True), [2, 5], alpha, S, beta, S, beta,
            bits, True, True, "nearest", None)


def test_table_cache_keeps_checks_and_results():
    # The CPU keeps the last tables each thread built, by their exact
    # parameters. A cached parameter set must not let a bad argument through
    # (bits is narrowed to int in the key), and more sets in turn than the
    # cache holds must give the reference's codes on every pass.
    g = gen(seed_of("table-cache"))
    x = torch.randn(4096, generator=g)
    dnateq.exp_quantize(x, 1.3, 0.5, 0.0, 4)
    for bits in (8, 1, 4 + (1 << 32)):
        with pytest.raises(RuntimeError, match="bits"):
            dnateq.exp_quantize(x, 1.3, 0.5, 0.0, bits)
    with pytest.raises(RuntimeError, match="scale"):
        dnateq.exp_quantize(x, 1.3, -0.5, 0.0, 4)
    sets = [(1.1 + 0.05 * i, 0.3 + 0.01 * i, -0.02 * i, 3 + i % 5) for i in range(20)]
    for _ in range(2):
        for a, s, b, bits in sets:
            assert_codes_equal(dnateq.exp_quantize(x, a, s, b, bits),
                               ref.exp_quantize(x, a, s, b, bits), (a, s, b, bits))
