"""The CPU LUT fast path (issue 13): the offline weight layout
(``exp_lut_layout``, checked byte for byte against the reference built from
``exp_pack``'s format), and the batch-1..8 linear on it against the oracle, on
every kernel family this machine runs (AVX-512, AVX2, portable); each test
names the path that ran (``dnateq.ops.last_lut_path``)."""
import struct

import pytest
import torch

import dnateq
from dnateq import ops
from dnateq import reference as ref

from conftest import (assert_close_rel, conv_mag, gen, linear_mag, make_data, random_codes,
                      tensor_params)

ISAS = ("avx512", "avx2", "portable")


def _runs(isa):
    old = ops.cpu_isa()
    try:
        ops.cpu_isa(isa)
        return True
    except RuntimeError:
        return False
    finally:
        ops.cpu_isa(old)


RUNNABLE = [i for i in ISAS if _runs(i)]


@pytest.fixture
def isa(request):
    name = request.param
    if name not in RUNNABLE:
        pytest.skip(f"this CPU does not run the {name} kernels")
    old = ops.cpu_isa()
    ops.cpu_isa(name)
    yield name
    ops.cpu_isa(old)


def _layer(g, N, K, bits, signed=True):
    codes = random_codes((N, K), bits, g, signed=signed, zero_frac=0.15)
    packed = dnateq.exp_pack(codes, bits, signed)
    return codes, packed


@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("signed", [True, False])
def test_layout_matches_reference_bytes(bits, signed):
    g = gen(100 + bits + 10 * signed)
    for N, K in [(1, 1), (3, 31), (2, 33), (5, 64), (4, 100), (2, 1000)]:
        _, packed = _layer(g, N, K, bits, signed)
        got = dnateq.exp_lut_layout(packed, [N, K], bits, signed)
        exp = ref.exp_lut_layout(packed, [N, K], bits, signed)
        assert got.dtype == torch.uint8 and got.dim() == 1
        assert torch.equal(got, exp), (N, K)
        magic, version, n, k, b = struct.unpack_from("<IIqqI", bytes(got[:28].tolist()))
        assert (magic, version, n, k, b) == (ref.LAYOUT_MAGIC, ops.LAYOUT_VERSION, N, K, bits)


def _want_linear_path(isa, M, K=0):
    """The kernels exp_linear_lut runs with a layout: AVX-512 GEMV up to 8 rows,
    the same kernels on 8-row blocks up to 32 rows at any K (avx512_gemm),
    else the decoded native GEMM; AVX2/portable: packed-row GEMV up to 4 rows,
    then the GEMM."""
    if isa == "avx512":
        return "avx512" if M <= 8 else ("avx512_gemm" if M <= 32 else "gemm")
    return isa if M <= 4 else "gemm"


def _params(g, x, bits):
    w = make_data((4, 64), g, "student")
    alpha, sw, bw = tensor_params(w, bits)
    _, sa, ba = tensor_params(x, bits, alpha)
    return alpha, sa, ba, sw, bw


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("signed", [True, False])
def test_linear_with_layout_matches_oracle(isa, bits, signed):
    g = gen(7 * bits + signed)
    for (M, K, N) in [(1, 1, 1), (1, 64, 9), (2, 100, 7), (3, 33, 13), (4, 257, 6),
                      (5, 96, 5), (8, 130, 11), (7, 4100, 3), (8, 3000, 40), (2, 9000, 21),
                      (9, 40, 4), (13, 4100, 7), (20, 70, 37), (32, 2048, 3), (17, 5000, 19),
                      (33, 96, 9), (64, 96, 9), (65, 33, 5)]:
        x = make_data((M, K), g, zero_frac=0.2)
        p = _params(g, x, bits)
        if K % 2:   # negative offsets: some levels below zero (SPEC: any beta)
            p = (p[0], p[1], -2.0 * p[1], p[3], -3.0 * p[3])
        codes, packed = _layer(g, N, K, bits, signed)
        layout = dnateq.exp_lut_layout(packed, [N, K], bits, signed)
        bias = torch.randn(N, generator=g) if N % 2 else None
        got = dnateq.exp_linear_lut(x, packed, [N, K], *p, bits, True, signed, "nearest", bias,
                                    w_layout=layout)
        path = ops.last_lut_path()
        want = _want_linear_path(isa, M, K)
        assert path == want, (M, isa, path)
        exp = ref.exp_linear_lut(x, packed, [N, K], *p, bits, True, signed, "nearest", bias)
        a_hat = ref.exp_dequantize(ref.exp_quantize(x, p[0], p[1], p[2], bits), p[0], p[1],
                                   p[2], bits)
        w_hat = ref.exp_dequantize(codes, p[0], p[3], p[4], bits)
        assert_close_rel(got, exp, linear_mag(a_hat, w_hat, bias), 1e-5, 1e-5,
                         f"{isa} M,K,N={M},{K},{N}")
        # the same result without the layout (other kernels)
        plain = dnateq.exp_linear_lut(x, packed, [N, K], *p, bits, True, signed, "nearest", bias)
        assert_close_rel(got, plain, linear_mag(a_hat, w_hat, bias), 1e-5, 1e-5, "no layout")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_with_layout_half_and_noncontiguous(isa, dtype):
    g = gen(31)
    bits, N, K = 4, 10, 70
    x = make_data((2, 3, 2 * K), g, zero_frac=0.1)[..., ::2]   # non-contiguous [2, 3, K]
    p = _params(g, x, bits)
    codes, packed = _layer(g, N, K, bits)
    layout = dnateq.exp_lut_layout(packed, [N, K], bits, True)
    got = dnateq.exp_linear_lut(x.to(dtype), packed, [N, K], *p, bits, True, True, "nearest",
                                None, w_layout=layout)
    assert got.dtype == dtype and got.shape == (2, 3, N)
    exp = ref.exp_linear_lut(x.to(dtype), packed, [N, K], *p, bits, True, True, "nearest", None)
    torch.testing.assert_close(got.float(), exp.float(), rtol=1e-2, atol=1e-2)


def test_layout_of_another_weight_is_an_error():
    g = gen(5)
    bits, N, K = 3, 6, 40
    x = torch.randn(1, K, generator=g)
    p = _params(g, x, bits)
    _, packed = _layer(g, N, K, bits)
    layout = dnateq.exp_lut_layout(packed, [N, K], bits, True)

    def run(lay, packed=packed, shape=(N, K), b=bits, signed=True):
        xx = torch.randn(1, shape[1])
        return dnateq.exp_linear_lut(xx, packed, list(shape), *p, b, True, signed, "nearest",
                                     None, w_layout=lay)

    for isa in RUNNABLE:   # every path checks the layout, not only the one reading it
        old = ops.cpu_isa(isa)
        try:
            _, other = _layer(g, N, K + 8, bits)
            with pytest.raises(RuntimeError, match="w_layout was built for"):
                run(layout, other, (N, K + 8))
            _, other = _layer(g, N, K, bits + 1)
            with pytest.raises(RuntimeError, match="w_layout was built for"):
                run(layout, other, (N, K), bits + 1)
            _, other = _layer(g, N, K, bits, signed=False)
            with pytest.raises(RuntimeError, match="w_layout was built for"):
                run(layout, other, (N, K), bits, False)
            _, other = _layer(g, N, K, bits)
            with pytest.raises(RuntimeError, match="not built from this w_packed"):
                run(layout, other)
            old_version = layout.clone()
            old_version[4:8] = torch.tensor([0, 0, 0, 0], dtype=torch.uint8)
            with pytest.raises(RuntimeError, match="version 0.*rebuild"):
                run(old_version)
            with pytest.raises(RuntimeError, match="not a dnateq weight layout"):
                run(torch.zeros_like(layout))
            with pytest.raises(RuntimeError, match="1-D uint8"):
                run(layout.to(torch.int8))
            with pytest.raises(RuntimeError, match="corrupt"):
                run(layout[:-1].clone())
        finally:
            ops.cpu_isa(old)


def test_cpu_isa_control():
    best = ops.cpu_isa("auto")
    assert best in ISAS and best == RUNNABLE[0]
    with pytest.raises(RuntimeError, match="must be"):
        ops.cpu_isa("sse9")
    for isa in ISAS[:ISAS.index(best)]:
        with pytest.raises(RuntimeError, match="supports at most"):
            ops.cpu_isa(isa)
    assert ops.cpu_isa() == best


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_module_uses_layout_and_rebuilds_it(isa):
    g = gen(11)
    lin = torch.nn.Linear(96, 24)
    x = torch.randn(1, 96, generator=g)
    bits = 4
    alpha, sw, bw, _ = dnateq.exp_fit(lin.weight.detach(), bits)
    _, sa, ba, _ = dnateq.exp_fit(x, bits, alpha=alpha)
    q = dnateq.nn.ExpLinear.from_float(lin, bits, (alpha, sw, bw), (alpha, sa, ba))
    assert q.w_layout is not None and q.w_layout.dtype == torch.uint8
    y = q(x)
    assert ops.last_lut_path() == isa
    q.mode = "fake"
    torch.testing.assert_close(y, q(x), rtol=1e-5, atol=1e-5)
    q.mode = "lut"
    # resident weight state: packed codes + layout + weight terms + bias, no float copy
    assert not any(t.is_floating_point() and t.numel() >= lin.weight.numel()
                   for t in q.state_dict().values() if isinstance(t, torch.Tensor))
    assert q.resident_weight_bytes() < lin.weight.numel() * 4 / 2
    # new packed weights: the layout follows
    codes = random_codes(q.w_shape, bits, g)
    q.w_packed = dnateq.exp_pack(codes, bits, True)
    y2 = q(x)
    q.mode = "fake"
    torch.testing.assert_close(y2, q(x), rtol=1e-5, atol=1e-5)
    # an in-place change of the packed bytes too
    q.mode = "lut"
    q.w_packed.copy_(dnateq.exp_pack(random_codes(q.w_shape, bits, g), bits, True))
    y3 = q(x)
    q.mode = "fake"
    torch.testing.assert_close(y3, q(x), rtol=1e-5, atol=1e-5)


def test_saved_model_rebuilds_the_layout(tmp_path):
    g = gen(12)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(2, 64, generator=g)
    q = dnateq.quantize(model, [x], bits=(4,))
    y = q(x)
    dnateq.save(q, tmp_path / "m.dnateq")
    q2 = dnateq.load(tmp_path / "m.dnateq", model)
    lay = q2[0].w_layout
    assert lay is not None
    assert torch.equal(lay, dnateq.exp_lut_layout(q2[0].w_packed, q2[0].w_shape, q2[0].bits,
                                                  q2[0].w_signed))
    torch.testing.assert_close(q2(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("rounding", ["nearest", "log"])
def test_quantize_on_every_path(isa, bits, rounding):
    """exp_quantize on each kernel family (the LUT ops' activation quantization
    is checked by the linear tests above): ties at the thresholds, zeros and
    -0.0, out-of-range values, lengths that are not whole vectors."""
    g = gen(40 + bits)
    x = make_data((3001,), g, "student", zero_frac=0.05)
    alpha, s, b = tensor_params(x, bits)
    thr = ref.thresholds(alpha, s, b, bits, rounding)
    x[:len(thr)] = thr                       # exactly on a threshold: goes up
    x[len(thr):2 * len(thr)] = -thr
    x[-3:] = torch.tensor([-0.0, 1e30, -1e30])
    for n in (x.numel(), 17, 5):
        xs = x[:n]
        got = dnateq.exp_quantize(xs, alpha, s, b, bits, rounding)
        exp = ref.exp_quantize(xs, alpha, s, b, bits, rounding)
        assert torch.equal(got, exp), (isa, n)
    bad = x.clone()
    bad[100] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        dnateq.exp_quantize(bad, alpha, s, b, bits, rounding)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", range(2, 8))
def test_linear_with_layout_per_channel(isa, bits):
    """Per-output-channel weight parameters (SPEC section 9): one level table
    per weight row, built in the kernel exactly as the per-tensor one."""
    g = gen(90 + bits)
    for (M, K, N, signed) in [(1, 70, 9, True), (3, 129, 6, False), (8, 64, 5, True),
                              (19, 200, 11, False), (33, 64, 6, True)]:
        x = make_data((M, K), g, zero_frac=0.2)
        alpha, sa, ba, sw, bw = _params(g, x, bits)
        w_scale = (sw * torch.exp(torch.randn(N, generator=g) * 0.3)).float()
        w_offset = (bw * torch.randn(N, generator=g)).float()
        codes, packed = _layer(g, N, K, bits, signed)
        layout = dnateq.exp_lut_layout(packed, [N, K], bits, signed)
        args = (x, packed, [N, K], alpha, sa, ba, sw, bw, bits, True, signed, "nearest", None)
        got = dnateq.exp_linear_lut(*args, w_scale=w_scale, w_offset=w_offset, w_layout=layout)
        assert ops.last_lut_path() == _want_linear_path(isa, M, K)
        exp = ref.exp_linear_lut(*args, w_scale=w_scale, w_offset=w_offset)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5 * float(exp.abs().max()))


# ----------------------------------------------------------------- conv --
def _want_conv_path(isa, batch, groups):
    """AVX-512, batch <= 8, groups 1: the direct conv kernel for these small
    cases (the native conv on the layout above fast_conv.cpp's size rule,
    tests/test_direct_conv.py); else decode then native conv."""
    return "avx512_direct_conv" if isa == "avx512" and batch <= 8 and groups == 1 else "gemm"


CONV_CASES = [
    # (B, C, H, W, O, kh, kw, stride, padding, dilation, groups)
    (1, 3, 8, 8, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (2, 4, 9, 7, 6, 3, 3, (2, 2), (1, 1), (1, 1), 1),
    (1, 16, 6, 6, 7, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (3, 5, 10, 11, 4, 3, 2, (1, 2), (2, 0), (2, 1), 1),
    (1, 8, 5, 5, 33, 5, 5, (1, 1), (2, 2), (1, 1), 1),
    (1, 2, 4, 4, 3, 3, 3, (1, 1), (0, 0), (1, 1), 1),   # output 2x2
    (9, 3, 5, 5, 4, 3, 3, (1, 1), (1, 1), (1, 1), 1),   # batch 9: decoded GEMM path
    (1, 4, 6, 6, 4, 3, 3, (1, 1), (1, 1), (1, 1), 2),   # groups 2: decoded path
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("signed", [True, False])
def test_conv_with_layout_matches_oracle(isa, bits, signed):
    g = gen(300 + 3 * bits + signed)
    for i, (B, C, H, W, O, kh, kw, st, pad, dil, grp) in enumerate(CONV_CASES):
        x = make_data((B, C, H, W), g, zero_frac=0.2, signed=bool(i % 2 == 0))
        p = _params(g, x, bits)
        if i % 3 == 1:   # negative offsets: some levels below zero
            p = (p[0], p[1], -2.0 * p[1], p[3], -3.0 * p[3])
        shape = [O, C // grp, kh, kw]
        codes = random_codes(shape, bits, g, signed=signed, zero_frac=0.15)
        packed = dnateq.exp_pack(codes, bits, signed)
        Kc = shape[1] * kh * kw
        layout = dnateq.exp_lut_layout(packed, shape, bits, signed)
        bias = torch.randn(O, generator=g) if i % 2 else None
        args = (x, packed, shape, *p, bits, True, signed, "nearest", bias, st, pad, dil, grp)
        got = dnateq.exp_conv2d_lut(*args, w_layout=layout)
        assert ops.last_lut_path() == _want_conv_path(isa, B, grp), (isa, i)
        exp = ref.exp_conv2d_lut(*args)
        a_hat = ref.exp_dequantize(ref.exp_quantize(x, p[0], p[1], p[2], bits), p[0], p[1],
                                   p[2], bits)
        w_hat = ref.exp_dequantize(codes, p[0], p[3], p[4], bits)
        mag = conv_mag(a_hat, w_hat, bias, st, pad, dil, grp)
        assert_close_rel(got, exp, mag, 1e-5, 1e-5, f"{isa} conv case {i}")
        plain = dnateq.exp_conv2d_lut(*args)
        assert_close_rel(got, plain, mag, 1e-5, 1e-5, f"{isa} conv case {i} no layout")
        assert Kc > 0


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_conv_with_layout_per_channel_half_noncontiguous(isa):
    g = gen(77)
    bits, signed = 4, True
    B, C, H, W, O = 2, 6, 7, 9, 10
    xfull = make_data((B, C, H, 2 * W), g, zero_frac=0.1)
    x = xfull[..., ::2]                               # non-contiguous
    p = _params(g, x, bits)
    shape = [O, C, 3, 3]
    codes = random_codes(shape, bits, g, signed=signed)
    packed = dnateq.exp_pack(codes, bits, signed)
    layout = dnateq.exp_lut_layout(packed, shape, bits, signed)
    w_scale = (p[3] * torch.exp(torch.randn(O, generator=g) * 0.3)).float()
    w_offset = (p[4] * torch.randn(O, generator=g)).float()
    bias = torch.randn(O, generator=g)
    args = (x, packed, shape, *p, bits, True, signed, "nearest", bias, (1, 1), (1, 1), (1, 1), 1)
    got = dnateq.exp_conv2d_lut(*args, w_scale=w_scale, w_offset=w_offset, w_layout=layout)
    assert ops.last_lut_path() == _want_conv_path(isa, B, 1)
    exp = ref.exp_conv2d_lut(*args, w_scale=w_scale, w_offset=w_offset)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5 * float(exp.abs().max()))
    for dt in (torch.float16, torch.bfloat16):
        hargs = (x.to(dt),) + args[1:]
        got = dnateq.exp_conv2d_lut(*hargs, w_layout=layout)
        assert got.dtype == dt and ops.last_lut_path() == _want_conv_path(isa, B, 1)
        exp = ref.exp_conv2d_lut(*hargs)
        torch.testing.assert_close(got.float(), exp.float(), rtol=1e-2,
                                   atol=1e-2 * float(exp.float().abs().max()))
    bad = x.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        dnateq.exp_conv2d_lut(bad, *args[1:], w_layout=layout)
    # a layout of another weight is an error on the conv path too
    other = dnateq.exp_pack(random_codes(shape, bits, g, signed=signed), bits, signed)
    with pytest.raises(RuntimeError, match="not built from this w_packed"):
        dnateq.exp_conv2d_lut(x, other, *args[2:], w_layout=layout)
    shape5 = [O, 5, 3, 3]
    packed5 = dnateq.exp_pack(random_codes(shape5, bits, g, signed=signed), bits, signed)
    with pytest.raises(RuntimeError, match="w_layout was built for"):
        dnateq.exp_conv2d_lut(x[:, :5], packed5, shape5, *args[3:], w_layout=layout)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_quantized_resnet_block_on_the_fast_paths(isa):
    """A ResNet-like model quantized by dnateq.quantize runs its convs and its
    linear on the fast kernels at batch 1 and 4 and matches the fake mode."""
    g = gen(78)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    calib = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(2)]
    q = dnateq.quantize(model, calib, bits=(4,), progress=False).eval()
    convs = [m for m in q.modules() if isinstance(m, dnateq.nn.ExpConv2d)]
    assert convs
    seen = []
    orig = ops.exp_conv2d_lut

    for B in (1, 4):
        x = torch.randn(B, 3, 12, 12, generator=g)
        with torch.no_grad():
            y = q(x)
            seen.append(ops.last_lut_path())
            for m in q.modules():
                if isinstance(m, (dnateq.nn.ExpConv2d, dnateq.nn.ExpLinear)):
                    m.mode = "fake"
            y_fake = q(x)
            for m in q.modules():
                if isinstance(m, (dnateq.nn.ExpConv2d, dnateq.nn.ExpLinear)):
                    m.mode = "lut"
        torch.testing.assert_close(y, y_fake, rtol=1e-4, atol=1e-4 * float(y_fake.abs().max()))
    assert orig is ops.exp_conv2d_lut
    # the last quantized op of the model is the linear (M = batch rows)
    assert seen == [_want_linear_path(isa, 1), _want_linear_path(isa, 4)]
