"""Per-output-channel weight parameters (SPEC section 9): w_scale / w_offset in
the count and LUT ops (CPU), the oracle and the fake kernels; the shared level
overflow and bias checks (csrc/checks.h)."""
import pytest
import torch

import dnateq
from dnateq import reference as ref

from conftest import assert_close_rel, gen, make_data, tensor_params


def _channel_params(w, bits):
    """alpha of the whole tensor, (S_j, beta_j) of each output row with that alpha
    (float32 [N]), and the per-row codes."""
    alpha = tensor_params(w, bits)[0]
    rows = w.reshape(w.shape[0], -1)
    S, B = [], []
    for j in range(rows.shape[0]):
        _, s, b = tensor_params(rows[j], bits, alpha)
        S.append(s)
        B.append(b)
    S = torch.tensor(S, dtype=torch.float32)
    B = torch.tensor(B, dtype=torch.float32)
    codes = torch.stack([dnateq.exp_quantize(w[j], alpha, float(S[j]), float(B[j]), bits)
                         for j in range(w.shape[0])])
    return alpha, S, B, codes


def _rows_scaled(g, N, K):
    """Weights whose rows differ in scale by orders of magnitude (where a
    per-tensor fit fails)."""
    scale = torch.logspace(-2, 1, N)[torch.randperm(N, generator=g)]
    return make_data((N, K), g) * scale[:, None]


def _mag(a_hat, w_hat):
    return a_hat.abs().double() @ w_hat.abs().double().t()


@pytest.mark.parametrize("bits", [3, 5])
@pytest.mark.parametrize("signed_a", [True, False])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 37, 300])
def test_linear_count_lut_reference_agree(bits, signed_a, M):
    g = gen(1000 + 10 * bits + M + (5 if signed_a else 0))
    N, K = 24, 1000 if M == 300 else 77   # M=300 x K=1000: the whole-decode GEMM path
    w = _rows_scaled(g, N, K)
    alpha, S, B, wc = _channel_params(w, bits)
    x = make_data((M, K), g, signed=signed_a, zero_frac=0.2)
    _, sa, ba = tensor_params(x, bits, alpha)
    bias = torch.randn(N, generator=g)
    a = dnateq.exp_quantize(x, alpha, sa, ba, bits)
    pc = dict(w_scale=S, w_offset=B)
    a_hat = dnateq.exp_dequantize(a, alpha, sa, ba, bits)
    w_hat = ref.dequantize_channels(wc, alpha, S, B, bits)
    mag = _mag(a_hat, w_hat) + bias.abs()
    want = ref.exp_linear_count(a, wc, alpha, sa, ba, 1.0, 0.0, bits, bias, **pc)
    # the oracle's count equals float64 a_hat @ w_hat^T
    assert_close_rel(want, (a_hat.double() @ w_hat.double().t() + bias.double()).float(),
                     mag, 1e-5, 1e-6, "oracle count vs dequantized matmul")
    terms = dnateq.weight_terms(wc, bits)
    for wt in (None, terms):
        got = dnateq.exp_linear_count(a, wc, alpha, sa, ba, 7.0, 3.0, bits, bias, None, wt,
                                      **pc)
        assert_close_rel(got, want, mag, 1e-6, 1e-7, f"count w_terms={wt is not None}")
    packed = dnateq.exp_pack(wc, bits, True)
    lut = dnateq.exp_linear_lut(x, packed, [N, K], alpha, sa, ba, 7.0, 3.0, bits, signed_a,
                                True, "nearest", bias, **pc)
    lut_ref = ref.exp_linear_lut(x, packed, [N, K], alpha, sa, ba, 7.0, 3.0, bits, signed_a,
                                 True, "nearest", bias, **pc)
    assert_close_rel(lut, lut_ref, mag, 1e-4, 1e-5, "lut vs oracle lut")
    assert_close_rel(lut, want, mag, 1e-4, 1e-5, "lut vs count")


@pytest.mark.parametrize("M", [1, 3, 50, 300])
@pytest.mark.parametrize("w_signed", [True, False])
def test_uniform_channels_equal_per_tensor_bitwise(M, w_signed):
    """Per-channel parameters that are all equal give the per-tensor result bit for
    bit (count and every LUT path), so the None path and the new one share the
    arithmetic."""
    g = gen(2000 + M + w_signed)
    bits = 4
    N, K = 20, 1000 if M == 300 else 64
    w = make_data((N, K), g, signed=w_signed)
    alpha, sw, bw = tensor_params(w, bits)
    sw, bw = float(torch.tensor(sw)), float(torch.tensor(bw))   # float32 values
    wc = dnateq.exp_quantize(w, alpha, sw, bw, bits)
    S, B = torch.full((N,), sw), torch.full((N,), bw)
    x = make_data((M, K), g)
    _, sa, ba = tensor_params(x, bits, alpha)
    a = dnateq.exp_quantize(x, alpha, sa, ba, bits)
    bias = torch.randn(N, generator=g)
    assert torch.equal(
        dnateq.exp_linear_count(a, wc, alpha, sa, ba, sw, bw, bits, bias),
        dnateq.exp_linear_count(a, wc, alpha, sa, ba, 1.0, 0.0, bits, bias,
                                w_scale=S, w_offset=B))
    packed = dnateq.exp_pack(wc, bits, w_signed)
    args = (x, packed, [N, K], alpha, sa, ba)
    assert torch.equal(
        dnateq.exp_linear_lut(*args, sw, bw, bits, True, w_signed, "nearest", bias),
        dnateq.exp_linear_lut(*args, 1.0, 0.0, bits, True, w_signed, "nearest", bias,
                              w_scale=S, w_offset=B))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("case", [
    # (N, C, H, W, O, k, stride, padding, dilation, groups, signed activations)
    (2, 4, 7, 6, 6, 3, 1, 1, 1, 1, True),
    (1, 4, 8, 8, 8, 3, 2, 1, 1, 2, False),
    (2, 6, 6, 5, 6, 1, 1, 0, 1, 3, True),
    (1, 2, 9, 9, 4, 3, 1, 2, 2, 1, False),
])
def test_conv_count_lut_reference_agree(bits, case):
    N, C, H, W, O, k, s, p, d, grp, signed_a = case
    g = gen(3000 + bits + sum(case[:10]))
    wt = make_data((O, C // grp, k, k), g) * torch.logspace(-1, 1, O)[:, None, None, None]
    alpha, S, B, wc = _channel_params(wt, bits)
    x = make_data((N, C, H, W), g, signed=signed_a, zero_frac=0.1)
    _, sa, ba = tensor_params(x, bits, alpha)
    bias = torch.randn(O, generator=g)
    a = dnateq.exp_quantize(x, alpha, sa, ba, bits)
    pc = dict(w_scale=S, w_offset=B)
    geo = ((s, s), (p, p), (d, d), grp)
    a_hat = dnateq.exp_dequantize(a, alpha, sa, ba, bits)
    w_hat = ref.dequantize_channels(wc, alpha, S, B, bits)
    mag = torch.nn.functional.conv2d(a_hat.abs(), w_hat.abs(), bias.abs(), *geo)
    exact = torch.nn.functional.conv2d(a_hat.double(), w_hat.double(), bias.double(), *geo)
    want = ref.exp_conv2d_count(a, wc, alpha, sa, ba, 1.0, 0.0, bits, bias, *geo, **pc)
    assert_close_rel(want, exact.float(), mag, 1e-5, 1e-6, "oracle conv count")
    for terms in (None, dnateq.weight_terms(wc, bits)):
        got = dnateq.exp_conv2d_count(a, wc, alpha, sa, ba, 9.0, 9.0, bits, bias, *geo, None,
                                      terms, **pc)
        assert_close_rel(got, want, mag, 1e-6, 1e-7, "conv count")
    packed = dnateq.exp_pack(wc, bits, True)
    largs = (x, packed, list(wc.shape), alpha, sa, ba, 9.0, 9.0, bits, signed_a, True,
             "nearest", bias, *geo)
    lut = dnateq.exp_conv2d_lut(*largs, **pc)
    assert_close_rel(lut, ref.exp_conv2d_lut(*largs, **pc), mag, 1e-4, 1e-5, "conv lut")
    assert_close_rel(lut, want, mag, 1e-4, 1e-5, "conv lut vs count")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [2, 40])
def test_half_inputs(dtype, M):
    g = gen(4000 + M)
    bits, N, K = 4, 12, 50
    w = _rows_scaled(g, N, K)
    alpha, S, B, wc = _channel_params(w, bits)
    x = make_data((M, K), g).to(dtype)
    _, sa, ba = tensor_params(x.float(), bits, alpha)
    packed = dnateq.exp_pack(wc, bits, True)
    args = (x, packed, [N, K], alpha, sa, ba, 1.0, 0.0, bits, True, True, "nearest", None)
    got = dnateq.exp_linear_lut(*args, w_scale=S, w_offset=B)
    assert got.dtype == dtype
    want = ref.exp_linear_lut(*args, w_scale=S, w_offset=B)
    a_hat = ref.exp_dequantize(ref.exp_quantize(x, alpha, sa, ba, bits), alpha, sa, ba, bits)
    mag = _mag(a_hat, ref.dequantize_channels(wc, alpha, S, B, bits))
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close_rel(got, want, mag, tol, tol, str(dtype))
    codes = dnateq.exp_quantize(x, alpha, sa, ba, bits)
    cnt = dnateq.exp_linear_count(codes, wc, alpha, sa, ba, 1.0, 0.0, bits, None,
                                  w_scale=S, w_offset=B)
    assert_close_rel(got, cnt, mag, tol, tol, f"{dtype} vs count")


# ---------------------------------------------------------------------------
# bad input: every op, errors that name the argument
# ---------------------------------------------------------------------------

def _op_calls(w_scale, w_offset, bias=None, sw=0.1, bw=0.01):
    """One call of each of the four ops with the given weight parameters."""
    bits, N, K = 3, 4, 9
    g = gen(5000)
    w = make_data((N, K), g)
    wc = dnateq.exp_quantize(w, 1.3, 0.1, 0.01, bits)
    a = dnateq.exp_quantize(make_data((2, K), g), 1.3, 0.1, 0.01, bits)
    w4 = wc.reshape(N, 1, 3, 3)
    a4 = dnateq.exp_quantize(make_data((1, 1, 4, 4), g), 1.3, 0.1, 0.01, bits)
    x = make_data((2, K), g)
    x4 = make_data((1, 1, 4, 4), g)
    packed = dnateq.exp_pack(wc, bits, True)
    pc = dict(w_scale=w_scale, w_offset=w_offset)
    geo = ((1, 1), (0, 0), (1, 1), 1)
    return {
        "linear_count": lambda: dnateq.exp_linear_count(a, wc, 1.3, 0.1, 0.01, sw, bw, bits,
                                                        bias, **pc),
        "conv2d_count": lambda: dnateq.exp_conv2d_count(a4, w4, 1.3, 0.1, 0.01, sw, bw, bits,
                                                        bias, *geo, **pc),
        "linear_lut": lambda: dnateq.exp_linear_lut(x, packed, [N, K], 1.3, 0.1, 0.01, sw, bw,
                                                    bits, True, True, "nearest", bias, **pc),
        "conv2d_lut": lambda: dnateq.exp_conv2d_lut(x4, packed, [N, 1, 3, 3], 1.3, 0.1, 0.01,
                                                    sw, bw, bits, True, True, "nearest", bias,
                                                    *geo, **pc),
    }


_GOOD = torch.full((4,), 0.1)
_BAD_CHANNEL = [
    ("float64", _GOOD.double(), _GOOD, "w_scale must be float32"),
    ("offset float16", _GOOD, _GOOD.half(), "w_offset must be float32"),
    ("shape", torch.full((5,), 0.1), _GOOD, r"w_scale must have shape \[4\]"),
    ("2-D", _GOOD, _GOOD.reshape(2, 2), r"w_offset must have shape \[4\]"),
    ("only scale", _GOOD, None, "w_scale and w_offset must be given together"),
    ("only offset", None, _GOOD, "w_scale and w_offset must be given together"),
    ("nan scale", torch.tensor([0.1, float("nan"), 0.1, 0.1]), _GOOD, "w_scale must be finite"),
    ("zero scale", torch.tensor([0.1, 0.0, 0.1, 0.1]), _GOOD, "w_scale must be finite and > 0"),
    ("negative scale", -_GOOD, _GOOD, "w_scale must be finite and > 0"),
    ("inf offset", _GOOD, torch.tensor([0.0, 0.0, float("inf"), 0.0]), "w_offset must be finite"),
    ("overflowing level", torch.full((4,), 3e38), _GOOD, "non-finite level"),
    ("overflowing offset", torch.full((4,), 1e37), torch.tensor([0.0, 3.4e38, 0.0, 0.0]),
     "non-finite level"),
]


@pytest.mark.parametrize("op", ["linear_count", "conv2d_count", "linear_lut", "conv2d_lut"])
@pytest.mark.parametrize("case", _BAD_CHANNEL, ids=[c[0] for c in _BAD_CHANNEL])
def test_bad_channel_params(op, case):
    _, s, o, msg = case
    with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
        _op_calls(s, o)[op]()
    # the oracle rejects the same input
    if op in ("linear_count", "linear_lut"):
        bits, N, K = 3, 4, 9
        g = gen(5000)
        wc = dnateq.exp_quantize(make_data((N, K), g), 1.3, 0.1, 0.01, bits)
        with pytest.raises((ValueError, TypeError), match=msg.split(r" \[")[0]):
            ref.exp_linear_count(wc[:2], wc, 1.3, 0.1, 0.01, 0.1, 0.01, bits, None,
                                 w_scale=s, w_offset=o)


@pytest.mark.parametrize("op", ["linear_count", "conv2d_count", "linear_lut", "conv2d_lut"])
def test_channel_params_on_another_device(op):
    meta = torch.empty(4, device="meta")
    with pytest.raises((RuntimeError, ValueError), match="w_scale"):
        _op_calls(meta, _GOOD)[op]()


@pytest.mark.parametrize("op", ["linear_count", "conv2d_count", "linear_lut", "conv2d_lut"])
@pytest.mark.parametrize("sw,bw,msg", [
    (1e300, 0.01, "sw=1e\\+300"),        # accepted by the count ops before (inf result)
    (0.1, 1e39, "bw=1e\\+39"),
    (3e38, 0.01, "non-finite level"),
    (0.0, 0.01, "sw must be finite and > 0"),
    (float("inf"), 0.0, "sw must be finite"),
])
def test_scalar_level_overflow_rejected_by_every_op(op, sw, bw, msg):
    with pytest.raises(RuntimeError, match=msg):
        _op_calls(None, None, sw=sw, bw=bw)[op]()


@pytest.mark.parametrize("op", ["linear_count", "conv2d_count", "linear_lut", "conv2d_lut"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_bias_rejected_by_every_op(op, bad):
    bias = torch.tensor([0.0, bad, 0.0, 0.0])
    with pytest.raises(RuntimeError, match="bias contains non-finite"):
        _op_calls(None, None, bias=bias)[op]()
    with pytest.raises(RuntimeError, match="bias contains non-finite"):
        _op_calls(_GOOD, _GOOD, bias=bias)[op]()


def test_scalars_ignored_with_channel_params():
    """Given w_scale/w_offset, sw/bw are not read (not even validated)."""
    calls = _op_calls(_GOOD, torch.full((4,), 0.01), sw=float("nan"), bw=float("inf"))
    ref_calls = _op_calls(None, None, sw=float(_GOOD[0]), bw=float(torch.tensor(0.01)))
    for name, f in calls.items():
        assert torch.equal(f(), ref_calls[name]()), name


# ---------------------------------------------------------------------------
# fake kernels and torch.compile
# ---------------------------------------------------------------------------

class _PerChannelNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = gen(6000)
        self.bits = 4
        w = _rows_scaled(g, 6, 12)
        self.alpha, S, B, wc = _channel_params(w, self.bits)
        wt = make_data((4, 3, 3, 3), g)
        _, S4, B4, wc4 = _channel_params(wt, self.bits)
        self.register_buffer("wp", dnateq.exp_pack(wc, self.bits, True))
        self.register_buffer("wc", wc)
        self.register_buffer("wp4", dnateq.exp_pack(wc4, self.bits, True))
        self.register_buffer("wc4", wc4)
        for k, v in dict(S=S, B=B, S4=S4, B4=B4).items():
            self.register_buffer(k, v)

    def forward(self, x, img):
        a, n = self.alpha, self.bits
        y1 = dnateq.exp_linear_lut(x, self.wp, [6, 12], a, 0.05, 0.0, 1.0, 0.0, n, True, True,
                                   "nearest", None, w_scale=self.S, w_offset=self.B)
        c = dnateq.exp_quantize(x, a, 0.05, 0.0, n)
        y2 = dnateq.exp_linear_count(c, self.wc, a, 0.05, 0.0, 1.0, 0.0, n, None,
                                     w_scale=self.S, w_offset=self.B)
        z1 = dnateq.exp_conv2d_lut(img, self.wp4, [4, 3, 3, 3], a, 0.05, 0.0, 1.0, 0.0, n,
                                   True, True, "nearest", None, (1, 1), (1, 1), (1, 1), 1,
                                   w_scale=self.S4, w_offset=self.B4)
        ci = dnateq.exp_quantize(img, a, 0.05, 0.0, n)
        z2 = dnateq.exp_conv2d_count(ci, self.wc4, a, 0.05, 0.0, 1.0, 0.0, n, None, (1, 1),
                                     (1, 1), (1, 1), 1, w_scale=self.S4, w_offset=self.B4)
        return y1, y2, z1, z2


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_with_channel_params(backend):
    net = _PerChannelNet()
    g = gen(6001)
    x, img = make_data((3, 12), g), make_data((2, 3, 5, 5), g)
    want = net(x, img)
    got = torch.compile(net, backend=backend, fullgraph=True)(x, img)
    for e, o in zip(want, got):
        assert torch.equal(e, o)


def test_fake_kernels_check_channel_params():
    from torch._subclasses.fake_tensor import FakeTensorMode
    net = _PerChannelNet()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(make_data((3, 12), gen(1)))
        wp = mode.from_tensor(net.wp)
        ok = dnateq.exp_linear_lut(x, wp, [6, 12], 1.2, 0.05, 0.0, 1.0, 0.0, 4, True, True,
                                   "nearest", None, w_scale=mode.from_tensor(net.S),
                                   w_offset=mode.from_tensor(net.B))
        assert ok.shape == (3, 6)
        with pytest.raises(Exception, match="w_scale must have shape"):
            dnateq.exp_linear_lut(x, wp, [6, 12], 1.2, 0.05, 0.0, 1.0, 0.0, 4, True, True,
                                  "nearest", None, w_scale=mode.from_tensor(net.S[:5]),
                                  w_offset=mode.from_tensor(net.B))
        with pytest.raises(Exception, match="w_offset must be float32"):
            dnateq.exp_linear_lut(x, wp, [6, 12], 1.2, 0.05, 0.0, 1.0, 0.0, 4, True, True,
                                  "nearest", None, w_scale=mode.from_tensor(net.S),
                                  w_offset=mode.from_tensor(net.B.double()))


def test_opcheck_channel_params():
    net = _PerChannelNet()
    g = gen(6002)
    x = make_data((3, 12), g)
    c = dnateq.exp_quantize(x, net.alpha, 0.05, 0.0, 4)
    ops = torch.ops.dnateq
    torch.library.opcheck(ops.exp_linear_lut.default,
                          (x, net.wp, [6, 12], net.alpha, 0.05, 0.0, 1.0, 0.0, 4, True, True,
                           "nearest", None, net.S, net.B))
    torch.library.opcheck(ops.exp_linear_count.default,
                          (c, net.wc, net.alpha, 0.05, 0.0, 1.0, 0.0, 4, None, None, None,
                           net.S, net.B))
