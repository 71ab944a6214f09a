"""The number format of SPEC section 1: the worked example, thresholds, ties,
zero handling, code layout and bit accounting, for the C++ ops and the oracle."""

import pytest
import torch

import dnateq
from dnateq import reference as ref

from conftest import ALL_BITS, ROUNDINGS, assert_codes_equal, random_params, gen, seed_of

IMPLS = {"cpp": dnateq, "ref": ref}

# SPEC section 1 worked example: n = 3, alpha = 2, S = 0.5, beta = 0.1.
EX = dict(alpha=2.0, scale=0.5, offset=0.1, bits=3)
EX_X = [1.3, 1.58, -0.05, 0.0, 100.0]
EX_E = {"log": [1, 2, -3, None, 3], "nearest": [1, 1, -3, None, 3]}
EX_CODES_LOG = [5, 6, -127, 0, 7]
EX_XHAT_LOG = [1.1, 2.1, -0.1625, 0.0, 4.1]
EX_LEVELS = [0.1625, 0.225, 0.35, 0.6, 1.1, 2.1, 4.1]


def _codes_from_e(es, xs, bits):
    bias = 1 << (bits - 1)
    out = []
    for e, x in zip(es, xs):
        if e is None:
            out.append(0)
        else:
            c = e + bias
            out.append(c - 128 if x < 0 else c)  # bit 7 set -> negative int8
    return out


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_worked_example_codes(impl, rounding):
    m = IMPLS[impl]
    x = torch.tensor(EX_X, dtype=torch.float32)
    codes = m.exp_quantize(x, EX["alpha"], EX["scale"], EX["offset"], EX["bits"], rounding)
    expected = torch.tensor(_codes_from_e(EX_E[rounding], EX_X, 3), dtype=torch.int8)
    assert_codes_equal(codes, expected, f"{impl} {rounding}")
    if rounding == "log":
        assert codes.tolist() == EX_CODES_LOG
        # 0x81 = sign bit + biased exponent 1
        assert (codes[2].view(torch.uint8).item()) == 0x81
        assert codes[0].view(torch.uint8).item() == 0b0000_0101


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_worked_example_dequantize(impl, rounding):
    m = IMPLS[impl]
    x = torch.tensor(EX_X, dtype=torch.float32)
    codes = m.exp_quantize(x, 2.0, 0.5, 0.1, 3, rounding)
    xhat = m.exp_dequantize(codes, 2.0, 0.5, 0.1, 3)
    assert xhat.dtype == torch.float32
    if rounding == "log":
        expected = EX_XHAT_LOG
    else:
        expected = [1.1, 1.1, -0.1625, 0.0, 4.1]
    # levels are rounded once from float64 to float32
    assert xhat.tolist() == torch.tensor(expected, dtype=torch.float64).float().tolist()


def test_worked_example_levels_and_thresholds():
    lv = ref.levels(2.0, 0.5, 0.1, 3)
    assert lv.dtype == torch.float32
    assert lv.tolist() == torch.tensor(EX_LEVELS, dtype=torch.float64).float().tolist()
    t = ref.thresholds(2.0, 0.5, 0.1, 3, "log")
    assert t.dtype == torch.float32 and t.numel() == 6
    assert abs(t[4].item() - 1.514) < 1e-3  # 0.1 + 0.5 * 2^1.5
    tn = ref.thresholds(2.0, 0.5, 0.1, 3, "nearest")
    assert tn[4].item() == pytest.approx(1.6)  # (1.1 + 2.1) / 2
    exact = [0.1 + 0.5 * 2 ** (j + 0.5) for j in range(-3, 3)]
    assert t.tolist() == torch.tensor(exact, dtype=torch.float64).float().tolist()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_worked_example_packed_size(impl):
    m = IMPLS[impl]
    codes = m.exp_quantize(torch.tensor(EX_X), 2.0, 0.5, 0.1, 3, "log")
    packed = m.exp_pack(codes, 3, True)
    # signed, n = 3: 4 bits per element, 5 elements = 20 bits -> one 32-bit word
    assert packed.dtype == torch.uint8
    assert list(packed.shape) == [1, 4]
    # fields LSB-first: 5, 6, 0b1001 (sign + biased 1), 0, 7
    assert packed.tolist() == [[5 | (6 << 4), 9 | (0 << 4), 7, 0]]
    assert_codes_equal(m.exp_unpack(packed, 3, True, [5]), codes, impl)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_ties_go_up(bits, rounding):
    """|x| exactly at a float32 threshold takes the upper exponent; the float32
    just below it takes the lower one (both signs)."""
    g = gen(seed_of("ties", bits, rounding))
    alpha, S, beta = random_params(bits, g=g)
    thr = ref.thresholds(alpha, S, beta, bits, rounding)
    below = torch.nextafter(thr, torch.zeros_like(thr))
    x = torch.cat([thr, below, -thr, -below])
    n = thr.numel()
    codes = dnateq.exp_quantize(x, alpha, S, beta, bits, rounding)
    assert_codes_equal(codes, ref.exp_quantize(x, alpha, S, beta, bits, rounding), "vs ref")
    mag = (codes.to(torch.int16) & 0x7F)
    # thresholds may coincide after rounding; count how many are <= each value
    exp_at = 1 + (thr.unsqueeze(1) <= thr.unsqueeze(0)).sum(0)
    exp_below = 1 + (thr.unsqueeze(1) <= below.unsqueeze(0)).sum(0)
    assert mag[:n].tolist() == exp_at.tolist()
    assert mag[n:2 * n].tolist() == exp_below.tolist()
    assert mag[2 * n:3 * n].tolist() == exp_at.tolist()
    assert mag[3 * n:].tolist() == exp_below.tolist()
    sign = (codes.view(torch.uint8) & 0x80) != 0
    assert not sign[:2 * n].any() and sign[2 * n:].all()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_and_negative_zero(impl, dtype):
    m = IMPLS[impl]
    x = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype)
    c = m.exp_quantize(x, 2.0, 0.5, 0.1, 3)
    assert c[:2].tolist() == [0, 0]
    assert c[2].item() != 0 and c[3].item() < 0
    # the zero code dequantizes to 0 whatever its sign bit
    z = torch.tensor([0, -128], dtype=torch.int8)
    assert m.exp_dequantize(z, 2.0, 0.5, 0.1, 3).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_code_layout(bits):
    """bits n..6 are always 0; biased exponents span 1..2^n-1; sign in bit 7;
    below-lowest magnitudes (|x| - beta <= 0) and huge ones clamp."""
    alpha, S, beta = 1.3, 0.25, 1e-9
    E = ref.exp_range(bits)
    lv = ref.levels_f64(alpha, S, beta, bits)
    x = torch.cat([lv, -lv, torch.tensor([1e-30, 1e-9, 1e30, -1e30], dtype=torch.float64)]).float()
    lvf = ref.levels(alpha, S, beta, bits)
    if not torch.isfinite(lvf).all():
        pytest.skip("levels overflow float32 at this alpha")
    c = dnateq.exp_quantize(x, alpha, S, beta, bits, "nearest")
    u = c.view(torch.uint8).to(torch.int16)
    assert bool(((u & 0x7F) >> bits == 0).all())
    n_lv = 2 * E + 1
    assert (u[:n_lv] & 0x7F).tolist() == list(range(1, 2 ** bits))
    assert (u[n_lv:2 * n_lv]).tolist() == [0x80 | b for b in range(1, 2 ** bits)]
    tail = (u[2 * n_lv:] & 0x7F).tolist()
    assert tail == [1, 1, 2 ** bits - 1, 2 ** bits - 1]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_levels_round_once(bits, impl):
    """Dequantized levels are float64 S*alpha^e+beta rounded once to float32 (then
    to the requested dtype)."""
    m = IMPLS[impl]
    alpha, S, beta = random_params(bits, g=gen(seed_of("levels", bits)))
    codes = torch.arange(1, 2 ** bits, dtype=torch.int8)
    E = ref.exp_range(bits)
    exact = [S * alpha ** e + beta for e in range(-E, E + 1)]
    f32 = torch.tensor(exact, dtype=torch.float64).float()
    out = m.exp_dequantize(codes, alpha, S, beta, bits)
    assert out.tolist() == f32.tolist()
    for dt in (torch.float16, torch.bfloat16):
        out = m.exp_dequantize(codes, alpha, S, beta, bits, dt)
        assert out.dtype == dt
        assert out.tolist() == f32.to(dt).tolist()


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_nearest_never_worse_than_log(bits):
    """For the same levels, "nearest" never has a larger absolute error than "log"
    (up to the float32 rounding of the thresholds)."""
    g = gen(seed_of("nearest-vs-log", bits))
    alpha, S, beta = random_params(bits, g=g)
    x = torch.rand(20000, generator=g) * 1.2 * (S * alpha ** ref.exp_range(bits) + beta)
    errs = {}
    for r in ROUNDINGS:
        c = dnateq.exp_quantize(x, alpha, S, beta, bits, r)
        xh = dnateq.exp_dequantize(c, alpha, S, beta, bits).double()
        errs[r] = (x.double() - xh).abs()
    slack = 1e-6 * x.double().abs() + 1e-30
    assert bool((errs["nearest"] <= errs["log"] + slack).all())
    assert errs["nearest"].sum() <= errs["log"].sum()


def test_below_offset_goes_to_lowest():
    """|x| - beta <= 0 gives e = -E (SPEC), also with "log" rounding."""
    for r in ROUNDINGS:
        c = dnateq.exp_quantize(torch.tensor([0.05, 0.1, -0.1]), 2.0, 0.5, 0.1, 3, r)
        assert (c.view(torch.uint8) & 0x7F).tolist() == [1, 1, 1]
