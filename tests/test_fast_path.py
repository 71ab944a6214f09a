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

from conftest import assert_close_rel, gen, linear_mag, make_data, random_codes, tensor_params

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
                      (5, 96, 5), (8, 130, 11), (7, 4100, 3), (9, 40, 4)]:
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
        want = ("gemm" if M > 8 else isa) if isa == "avx512" else (
            isa if M <= 4 else "gemm")
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
    for (M, K, N, signed) in [(1, 70, 9, True), (3, 129, 6, False), (8, 64, 5, True)]:
        x = make_data((M, K), g, zero_frac=0.2)
        alpha, sa, ba, sw, bw = _params(g, x, bits)
        w_scale = (sw * torch.exp(torch.randn(N, generator=g) * 0.3)).float()
        w_offset = (bw * torch.randn(N, generator=g)).float()
        codes, packed = _layer(g, N, K, bits, signed)
        layout = dnateq.exp_lut_layout(packed, [N, K], bits, signed)
        args = (x, packed, [N, K], alpha, sa, ba, sw, bw, bits, True, signed, "nearest", None)
        got = dnateq.exp_linear_lut(*args, w_scale=w_scale, w_offset=w_offset, w_layout=layout)
        assert ops.last_lut_path() == (isa if isa == "avx512" else (isa if M <= 4 else "gemm"))
        exp = ref.exp_linear_lut(*args, w_scale=w_scale, w_offset=w_offset)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5 * float(exp.abs().max()))
