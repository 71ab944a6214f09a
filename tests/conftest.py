"""Shared fixtures and helpers of the dnateq operator tests.

Test modules import helpers with ``from conftest import ...`` (pytest puts
this directory on ``sys.path``). ``ref`` is :mod:`dnateq.reference`, the
pure-PyTorch oracle; the operators under test are ``dnateq.exp_*``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import pytest
import torch

import dnateq
from dnateq import reference as ref

ALL_BITS = [2, 3, 4, 5, 6, 7]
ROUNDINGS = ["log", "nearest"]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def seed_of(*parts) -> int:
    """A stable seed from test parameters (``hash`` of str is salted per run)."""
    s = 0
    for ch in repr(parts):
        s = (s * 131 + ord(ch)) % 1000003
    return s


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def random_params(bits: int, signed: bool = True, g: Optional[torch.Generator] = None,
                  alpha: Optional[float] = None, lo: Optional[float] = None,
                  hi: Optional[float] = None, offset_jitter: bool = False
                  ) -> Tuple[float, float, float]:
    """Sensible ``(alpha, scale, offset)`` for ``bits``: levels spanning a random
    magnitude range ``[lo, hi]`` (SPEC section 2 formulas), alpha near the
    paper's starting point ``(hi/lo)^(1/(2E))``. ``offset_jitter`` moves beta
    by up to one lowest level either way (operators take any beta).

    ``signed`` does not change the parameters (the format is symmetric); it is
    accepted so that call sites document the tensor's kind.
    """
    del signed
    g = g if g is not None else gen(seed_of("random_params", bits))
    E = ref.exp_range(bits)
    if lo is None:
        lo = 10 ** uniform(g, -3.0, -1.0)
    if hi is None:
        hi = 10 ** uniform(g, 0.0, 1.0)
    if alpha is None:
        a0 = (hi / lo) ** (1.0 / (2 * E))
        alpha = a0 * math.exp(uniform(g, -0.3, 0.3) / E)
        alpha = min(max(alpha, 1.01), ref.alpha_max(bits) * 0.9)
    S, beta = ref.fit_scale_offset(lo, hi, alpha, bits)
    if offset_jitter:
        beta += uniform(g, -1.0, 1.0) * lo
    return float(alpha), float(S), float(beta)


def make_data(shape: Sequence[int], g: torch.Generator, dist: str = "normal",
              signed: bool = True, zero_frac: float = 0.0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random data of ``shape``: ``dist`` in normal/exponential/student/pareto/
    uniform; ``signed=False`` gives non-negative values (ReLU-like);
    ``zero_frac`` sets that fraction of elements to exactly zero."""
    shape = tuple(shape)
    if dist == "normal":
        x = torch.randn(shape, generator=g)
    elif dist == "exponential":
        x = -torch.log(torch.rand(shape, generator=g).clamp_min(1e-12))
        x = x * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    elif dist == "student":
        z = torch.randn(shape, generator=g)
        chi = torch.randn(shape + (3,), generator=g).pow(2).sum(-1) / 3
        x = z / chi.sqrt().clamp_min(1e-3)
    elif dist == "pareto":
        u = torch.rand(shape, generator=g).clamp_min(1e-6)
        x = u.pow(-1.0 / 1.5) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    elif dist == "uniform":
        x = torch.rand(shape, generator=g) * 2 - 1
    else:
        raise ValueError(dist)
    if not signed:
        x = x.abs()
    if zero_frac > 0:
        x = torch.where(torch.rand(shape, generator=g) < zero_frac, torch.zeros(()), x)
    return x.to(dtype)


def random_codes(shape: Sequence[int], bits: int, g: torch.Generator, signed: bool = True,
                 zero_frac: float = 0.1) -> torch.Tensor:
    """Uniformly random valid int8 codes (biased exponent 1..2^n-1, sign bit if
    ``signed``), with about ``zero_frac`` zero codes."""
    shape = tuple(shape)
    mag = torch.randint(1, 1 << bits, shape, generator=g)
    mag = torch.where(torch.rand(shape, generator=g) < zero_frac, torch.zeros((), dtype=mag.dtype), mag)
    if signed:
        neg = torch.rand(shape, generator=g) < 0.5
        mag = mag | torch.where(neg & (mag != 0), 0x80, 0)
    return mag.to(torch.uint8).view(torch.int8)


def noncontig(t: torch.Tensor, kind: str = "slice") -> torch.Tensor:
    """A non-contiguous tensor equal to ``t``: ``"slice"`` (every other element of
    a bigger buffer along the last dim) or ``"transpose"`` (a transposed view of
    a transposed copy; needs ``dim >= 2``)."""
    if kind == "transpose":
        assert t.dim() >= 2
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        assert t.dim() >= 1
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        big[..., 1::2] = t
        out = big[..., 1::2]
    assert torch.equal(out, t)
    if t.numel() > 1 and t.shape[-1] > 1:
        assert not out.is_contiguous()
    return out


def assert_codes_equal(actual: torch.Tensor, expected: torch.Tensor, ctx: str = "") -> None:
    """Bit-for-bit equality of code (or byte) tensors, with the first mismatch."""
    assert actual.dtype == expected.dtype, f"{ctx}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{ctx}: shape {actual.shape} != {expected.shape}"
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{ctx}: {bad.shape[0]} of {actual.numel()} elements differ; first at {i}: "
            f"got {actual[i].item()}, expected {expected[i].item()}")


def assert_bitwise_equal_float(actual: torch.Tensor, expected: torch.Tensor, ctx: str = ""):
    """Float tensors equal bit for bit, except that -0.0 == +0.0."""
    assert actual.dtype == expected.dtype, f"{ctx}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{ctx}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{ctx}: {m}")


def deq64(codes: torch.Tensor, alpha: float, scale: float, offset: float, bits: int
          ) -> torch.Tensor:
    """Dequantize with the exact float64 levels (for error bounds)."""
    sign, biased, nz = ref.decode_codes(codes, bits)
    lv = ref.level_table(alpha, scale, offset, bits, torch.float64)
    return torch.where(nz, sign.to(torch.float64) * lv[biased],
                       torch.zeros((), dtype=torch.float64))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, mag: torch.Tensor,
                     rtol: float, atol_rel: float, ctx: str = "") -> None:
    """``|actual - expected| <= rtol*|expected| + atol_rel*mag`` elementwise, where
    ``mag`` bounds the size of the terms summed into each element (e.g.
    ``|a_hat| @ |w_hat|^T + |bias|``), so cancellation does not make the check
    meaningless."""
    assert actual.shape == expected.shape, f"{ctx}: shape {actual.shape} != {expected.shape}"
    a = actual.to(torch.float64)
    e = expected.to(torch.float64)
    m = mag.to(torch.float64).expand_as(e)
    tol = rtol * e.abs() + atol_rel * m + 1e-30
    err = (a - e).abs()
    if not bool((err <= tol).all()):
        i = torch.unravel_index((err - tol).flatten().argmax(), err.shape)
        i = tuple(int(t) for t in i)
        raise AssertionError(
            f"{ctx}: {(err > tol).sum().item()} of {err.numel()} elements out of tolerance; "
            f"worst at {i}: got {a[i].item()!r}, expected {e[i].item()!r}, |diff|="
            f"{err[i].item():.3e} > tol {tol[i].item():.3e} (mag {m[i].item():.3e})")


def linear_mag(a_hat: torch.Tensor, w_hat: torch.Tensor, bias=None) -> torch.Tensor:
    """``|a_hat| @ |w_hat|^T (+ |bias|)`` in float64: the size of the summed terms."""
    m = a_hat.to(torch.float64).abs() @ w_hat.to(torch.float64).abs().T
    if bias is not None:
        m = m + bias.to(torch.float64).abs()
    return m


def conv_mag(a_hat, w_hat, bias, stride, padding, dilation, groups) -> torch.Tensor:
    import torch.nn.functional as F
    m = F.conv2d(a_hat.to(torch.float64).abs(), w_hat.to(torch.float64).abs(), None,
                 stride, padding, dilation, groups)
    if bias is not None:
        m = m + bias.to(torch.float64).abs().view(1, -1, 1, 1)
    return m


def tensor_params(t: torch.Tensor, bits: int, alpha: Optional[float] = None
                  ) -> Tuple[float, float, float]:
    """``(alpha, S, beta)`` for tensor ``t`` from SPEC section 2's formulas, with
    ``alpha`` the paper's starting point (clamped) unless given. Independent of
    the C++ ``exp_fit`` so operator tests do not rely on it."""
    m = t.detach().float().abs().flatten()
    m = m[m != 0]
    if m.numel() == 0:
        return (alpha or 2.0), 1.0, 0.0
    lo, hi = float(m.min()), float(m.max())
    if alpha is None:
        E = ref.exp_range(bits)
        alpha = (hi / lo) ** (1.0 / (2 * E)) if hi > lo else 2.0
        alpha = min(max(alpha, 1.01), ref.alpha_max(bits) * 0.9)
    if hi == lo:
        return float(alpha), lo, 0.0
    S, beta = ref.fit_scale_offset(lo, hi, alpha, bits)
    return float(alpha), float(S), float(beta)


def quantize_pair(x: torch.Tensor, w: torch.Tensor, bits: int, rounding: str = "nearest"):
    """Parameters for activations ``x`` and weights ``w`` sharing one alpha (from
    the weights), and both tensors quantized with the C++ op.

    Returns ``(a_codes, w_codes, (alpha, sa, ba, sw, bw))``.
    """
    alpha, sw, bw = tensor_params(w, bits)
    _, sa, ba = tensor_params(x, bits, alpha)
    a_codes = dnateq.exp_quantize(x, alpha, sa, ba, bits, rounding)
    w_codes = dnateq.exp_quantize(w, alpha, sw, bw, bits, rounding)
    return a_codes, w_codes, (alpha, sa, ba, sw, bw)


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded from the test's node id (stable across runs)."""
    return gen(seed_of(request.node.nodeid))
