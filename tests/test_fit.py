"""exp_fit and exp_error (SPEC section 2)."""
import math

import pytest
import torch

import dnateq
from dnateq import reference as ref

from conftest import ALL_BITS, FLOAT_DTYPES, ROUNDINGS, gen, make_data, random_params, seed_of

DISTS = ["normal", "exponential", "student", "pareto", "uniform", "constant", "zeros",
         "single", "mixed_zeros", "relu", "two_values"]


def random_tensor(i: int):
    """Tensor ``i`` of the 200-tensor zoo, with its bits and rounding."""
    g = gen(seed_of("zoo", i))
    dist = DISTS[i % len(DISTS)]
    bits = 3 + int(torch.randint(0, 5, (), generator=g))
    rounding = ROUNDINGS[int(torch.randint(0, 2, (), generator=g))]
    n = int(torch.randint(1, 1500, (), generator=g))
    scale = 10 ** float(torch.rand((), generator=g) * 4 - 2)
    if dist == "constant":
        x = torch.full((n,), scale) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    elif dist == "zeros":
        x = torch.zeros(n)
    elif dist == "single":
        x = torch.full((1,), scale * (1 if i % 2 else -1))
    elif dist == "mixed_zeros":
        x = make_data((n,), g, "student", zero_frac=0.6) * scale
    elif dist == "relu":
        x = torch.relu(make_data((n,), g, "normal")) * scale
    elif dist == "two_values":
        x = torch.where(torch.rand(n, generator=g) < 0.5, scale, 3 * scale)
    else:
        x = make_data((n,), g, dist) * scale
    return x, bits, rounding, dist


ZOO = list(range(200))


def _rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def test_golden_never_worse_than_paper_zoo():
    """200 random tensors (normal, exponential, heavy-tailed, constant, all-zero,
    single-element, mixed with zeros), bits in 3..7: "golden" <= "paper"; the
    reported RMAE is the exact error of the returned parameters."""
    failures = []
    for i in ZOO:
        x, bits, rounding, dist = random_tensor(i)
        ag, sg, bg, eg = dnateq.exp_fit(x, bits, "golden", rounding)
        ap, sp, bp, ep = dnateq.exp_fit(x, bits, "paper", rounding)
        ctx = f"#{i} {dist} n={x.numel()} bits={bits} {rounding}"
        if not eg <= ep * (1 + 1e-12) + 1e-300:
            failures.append(f"{ctx}: golden {eg} > paper {ep}")
        for (a, s, b, e, name) in ((ag, sg, bg, eg, "golden"), (ap, sp, bp, ep, "paper")):
            if not (math.isfinite(a) and a > 1 and s > 0 and math.isfinite(b)):
                failures.append(f"{ctx}: {name} bad params {(a, s, b)}")
                continue
            m = x.abs()
            degenerate = torch.unique(m[m != 0]).numel() <= 1  # alpha = 2 by SPEC
            if not degenerate and not (1 + 1e-4 - 1e-12 <= a <= ref.alpha_max(bits) + 1e-12):
                failures.append(f"{ctx}: {name} alpha {a} outside [1+1e-4, alpha_max]")
            err = dnateq.exp_error(x, a, s, b, bits, rounding)
            if abs(err - e) > 1e-9 * max(err, e) + 1e-300:
                failures.append(f"{ctx}: {name} rmae {e} != exp_error {err}")
    assert not failures, "\n".join(failures[:20])


def test_paper_search_matches_oracle():
    """Algorithm 1 is deterministic: the C++ and the oracle agree closely."""
    failures = []
    for i in ZOO[::4]:
        x, bits, rounding, dist = random_tensor(i)
        a, s, b, e = dnateq.exp_fit(x, bits, "paper", rounding)
        ra, rs, rb, re_ = ref.exp_fit(x, bits, "paper", rounding)
        ctx = f"#{i} {dist} n={x.numel()} bits={bits} {rounding}"
        if _rel(a, ra) > 1e-9 or _rel(e, re_) > 1e-6 or _rel(s, rs) > 1e-6:
            failures.append(f"{ctx}: cpp {(a, s, b, e)} vs ref {(ra, rs, rb, re_)}")
    assert not failures, "\n".join(failures)


def test_golden_quality_vs_oracle():
    """The C++ golden search evaluates every point the oracle's does (same grid,
    bracket and golden steps) and also the paper's answer, so it is never worse
    than the oracle's golden answer (up to the last bits of the two error sums)
    nor than the paper's. 30 fits: 20 zoo tensors at their bits, 10 at bits 7
    (issue 14: it was worse in 16 of 60, up to 2 % relative RMAE at n=7)."""
    worse = []
    cases = [(i, None) for i in ZOO[::10]] + [(i, 7) for i in ZOO[5::20]]
    for i, bits_override in cases:
        x, bits, rounding, dist = random_tensor(i)
        bits = bits_override or bits
        e = dnateq.exp_fit(x, bits, "golden", rounding)[3]
        rp = ref.exp_fit(x, bits, "paper", rounding)[3]
        rg = ref.exp_fit(x, bits, "golden", rounding)[3]
        assert e <= rp * (1 + 1e-9) + 1e-300, f"#{i} {dist}: cpp golden {e} > ref paper {rp}"
        if e > rg * (1 + 1e-9) + 1e-300:
            worse.append(f"#{i} {dist} bits={bits}: cpp golden {e} vs ref golden {rg}")
    assert not worse, f"{len(worse)} of {len(cases)}:\n" + "\n".join(worse)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fit_covers_range(bits, rounding):
    """Levels cover [lo, hi] exactly: lowest level lo, highest hi, all > 0."""
    g = gen(seed_of("cover", bits, rounding))
    x = make_data((777,), g, "student")
    m = x.abs()
    lo, hi = float(m[m > 0].min()), float(m.max())
    for search in ("golden", "paper"):
        a, s, b, e = dnateq.exp_fit(x, bits, search, rounding)
        E = ref.exp_range(bits)
        assert s * a ** -E + b == pytest.approx(lo, rel=1e-9, abs=1e-12 * hi)
        assert s * a ** E + b == pytest.approx(hi, rel=1e-9)
        assert s > 0 and s * a ** -E + b > 0
        assert 1 + 1e-4 - 1e-12 <= a <= ref.alpha_max(bits) * (1 + 1e-12)
        assert 0 <= e < 1


@pytest.mark.parametrize("bits", [3, 5, 7])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fit_with_given_alpha(bits, rounding):
    g = gen(seed_of("given", bits, rounding))
    x = make_data((500,), g, "exponential", zero_frac=0.1)
    m = x.abs()
    lo, hi = float(m[m > 0].min()), float(m.max())
    for alpha in (1.01, 1.1, 1.5):
        a, s, b, e = dnateq.exp_fit(x, bits, "golden", rounding, alpha)
        assert a == alpha
        S, beta = ref.fit_scale_offset(lo, hi, alpha, bits)
        assert s == pytest.approx(S, rel=1e-12)
        assert b == pytest.approx(beta, rel=1e-9, abs=1e-12 * hi)
        assert e == pytest.approx(dnateq.exp_error(x, a, s, b, bits, rounding), rel=1e-9)
        # the search method does not matter when alpha is given
        assert dnateq.exp_fit(x, bits, "paper", rounding, alpha) == pytest.approx((a, s, b, e),
                                                                                   rel=1e-12)


@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("search", ["golden", "paper"])
def test_fit_degenerate_cases(impl, search):
    fit = dnateq.exp_fit if impl == "cpp" else ref.exp_fit
    bits = 4
    # all-zero and empty -> alpha 2, S 1, beta 0, RMAE 0
    for x in (torch.zeros(10), torch.zeros(0), torch.zeros(3, 0), torch.tensor([0.0, -0.0])):
        assert fit(x, bits, search) == (2.0, 1.0, 0.0, 0.0)
    # one distinct nonzero magnitude -> S = lo, beta = 0, alpha 2 (or as given)
    for x, lo in ((torch.tensor([0.75]), 0.75), (torch.tensor([-3.0]), 3.0),
                  (torch.tensor([0.5, -0.5, 0.0, 0.5]), 0.5),
                  (torch.full((7,), 1e-3), float(torch.tensor(1e-3)))):
        for r in ROUNDINGS:
            assert fit(x, bits, search, r) == (2.0, lo, 0.0, 0.0), (x, r)
            assert fit(x, bits, search, r, 1.3) == (1.3, lo, 0.0, 0.0), (x, r)
    # half precision input is widened: lo is the float32 value of the half
    xh = torch.tensor([0.1, -0.1], dtype=torch.float16)
    assert fit(xh, bits, search) == (2.0, float(xh[0].float()), 0.0, 0.0)


@pytest.mark.parametrize("impl", ["cpp", "ref"])
def test_fit_all_zero_with_alpha_given(impl):
    """SPEC: all-zero or empty -> alpha = 2, S = 1, beta = 0, RMAE = 0."""
    fit = dnateq.exp_fit if impl == "cpp" else ref.exp_fit
    a, s, b, e = fit(torch.zeros(5), 4, "golden", "nearest", 1.3)
    assert (s, b, e) == (1.0, 0.0, 0.0)
    assert a in (2.0, 1.3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fit_dtypes(dtype):
    g = gen(seed_of("fit-dtype", str(dtype)))
    x = make_data((300,), g, dtype=dtype)
    a, s, b, e = dnateq.exp_fit(x, 5)
    assert e == pytest.approx(dnateq.exp_error(x, a, s, b, 5), rel=1e-9)
    assert e == pytest.approx(ref.exp_error(x, a, s, b, 5), rel=1e-9)
    # half/bf16 are widened exactly: same fit as the float32 copy
    assert dnateq.exp_fit(x.float(), 5) == pytest.approx((a, s, b, e), rel=1e-12)


def test_fit_default_search_is_golden():
    g = gen(5)
    x = make_data((400,), g, "pareto")
    assert dnateq.exp_fit(x, 4) == dnateq.exp_fit(x, 4, "golden", "nearest")


def test_fit_does_not_modify_input():
    g = gen(6)
    x = make_data((3, 50), g)
    x0 = x.clone()
    dnateq.exp_fit(x, 4)
    dnateq.exp_error(x, 1.2, 0.1, 0.0, 4)
    assert torch.equal(x, x0)


# --------------------------------------------------------------------------
# exp_error
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_exp_error_equals_brute_force(bits, rounding):
    g = gen(seed_of("err", bits, rounding))
    for dist, shape, zf in [("normal", (1000,), 0.0), ("student", (33, 7), 0.3),
                            ("pareto", (1,), 0.0), ("exponential", (7,), 0.5),
                            ("uniform", (4, 5, 6), 0.1)]:
        x = make_data(shape, g, dist, zero_frac=zf)
        for jitter in (False, True):
            alpha, S, beta = random_params(bits, g=g, offset_jitter=jitter)
            got = dnateq.exp_error(x, alpha, S, beta, bits, rounding)
            exp = ref.exp_error(x, alpha, S, beta, bits, rounding)
            assert isinstance(got, float)
            assert got == pytest.approx(exp, rel=1e-9, abs=1e-300), (dist, shape, jitter)


def test_exp_error_definition_worked_example():
    """RMAE = sum|x - x_hat| / sum|x|, x_hat = the dequantized (float32) levels."""
    x = torch.tensor([1.3, 1.58, -0.05, 0.0, 100.0])
    xs = [float(v) for v in x.double()]
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float64).float())  # noqa: E731
    for r, xhat in (("log", [f32(v) for v in [1.1, 2.1, -0.1625, 0.0, 4.1]]),
                    ("nearest", [f32(v) for v in [1.1, 1.1, -0.1625, 0.0, 4.1]])):
        exp = sum(abs(a - b) for a, b in zip(xs, xhat)) / sum(abs(a) for a in xs)
        assert dnateq.exp_error(x, 2.0, 0.5, 0.1, 3, r) == pytest.approx(exp, rel=1e-9)


def test_exp_error_degenerate_and_default():
    assert dnateq.exp_error(torch.zeros(8), 2.0, 1.0, 0.0, 4) == 0.0
    assert dnateq.exp_error(torch.zeros(0), 2.0, 1.0, 0.0, 4) == 0.0
    x = torch.tensor([1.58])
    assert dnateq.exp_error(x, 2.0, 0.5, 0.1, 3) == dnateq.exp_error(x, 2.0, 0.5, 0.1, 3,
                                                                     "nearest")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_exp_error_dtypes_and_noncontiguous(dtype):
    g = gen(seed_of("err-dt", str(dtype)))
    x = make_data((20, 30), g, "student", dtype=dtype)
    alpha, S, beta = random_params(5, g=g)
    exp = ref.exp_error(x, alpha, S, beta, 5, "log")
    assert dnateq.exp_error(x, alpha, S, beta, 5, "log") == pytest.approx(exp, rel=1e-9)
    assert dnateq.exp_error(x.t(), alpha, S, beta, 5, "log") == pytest.approx(exp, rel=1e-9)


# --------------------------------------------------------------------------
# exp_errors (many candidates, one sort)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 7])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_exp_errors_matches_exp_error(bits, rounding):
    g = gen(seed_of("errors", bits, rounding))
    x = make_data((3, 111), g, "student", zero_frac=0.2)
    cands = [random_params(bits, g=g, offset_jitter=bool(i % 2)) for i in range(9)]
    al, sc, of = (list(t) for t in zip(*cands))
    got = dnateq.exp_errors(x, al, sc, of, bits, rounding)
    assert got.dtype == torch.float64 and got.shape == (9,)
    for i, (a, s, o) in enumerate(cands):
        assert got[i].item() == pytest.approx(dnateq.exp_error(x, a, s, o, bits, rounding),
                                              rel=1e-12, abs=1e-300)
        assert got[i].item() == pytest.approx(ref.exp_error(x, a, s, o, bits, rounding),
                                              rel=1e-9, abs=1e-300)
    assert dnateq.exp_errors(x, [], [], [], bits, rounding).shape == (0,)
    assert dnateq.exp_errors(torch.zeros(5), al, sc, of, bits).tolist() == [0.0] * 9


@pytest.mark.parametrize("search", ["golden", "paper"])
def test_exp_fits_bit_identical_to_exp_fit(search):
    """exp_fits sorts once for all bit widths and answers exactly as one exp_fit per width,
    with and without a given alpha (the calibration's second tensor)."""
    bits = [3, 4, 5, 6, 7]
    for i in range(0, 60, 3):
        x, _, rounding, _ = random_tensor(i)
        got = dnateq.exp_fits(x, bits, search, rounding)
        assert got.dtype == torch.float64 and got.shape == (len(bits), 4)
        want = [dnateq.exp_fit(x, b, search, rounding) for b in bits]
        assert got.tolist() == [list(w) for w in want]
        alphas = [1.05 + 0.1 * k for k in range(len(bits))]
        got = dnateq.exp_fits(x, bits, search, rounding, alphas)
        want = [dnateq.exp_fit(x, b, search, rounding, a) for b, a in zip(bits, alphas)]
        assert got.tolist() == [list(w) for w in want]


def test_exp_fits_reference_and_bad_input():
    x = make_data((500,), gen(3), "normal")
    got, want = dnateq.exp_fits(x, [3, 5], "paper"), ref.exp_fits(x, [3, 5], "paper")
    assert want.shape == (2, 4) and torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    with pytest.raises(Exception, match="bits"):
        dnateq.exp_fits(x, [3, 8])
    with pytest.raises(Exception, match="bits"):
        dnateq.exp_fits(x, [])
    with pytest.raises(Exception, match="alpha"):
        dnateq.exp_fits(x, [3, 4], alpha=[1.5])
    with pytest.raises(Exception, match="alpha"):
        dnateq.exp_fits(x, [3], alpha=[0.5])
    with pytest.raises(Exception, match="search"):
        dnateq.exp_fits(x, [3], search="fast")
    with pytest.raises(Exception, match="non-finite"):
        dnateq.exp_fits(torch.tensor([1.0, float("nan")]), [3])
