"""The direct AVX-512 convolution of ``exp_conv2d_lut`` (issue 13; path
``avx512_direct_conv``, csrc/lut/direct_conv_avx512.cpp): activations
quantized into zero-padded shifted planes, a register-tiled FMA kernel, the
weights decoded from the offline layout. Checked against the pure-PyTorch
``dnateq.reference.exp_conv2d_lut`` (fp32 sums, so up to summation order) on
many geometries: odd channel counts, 1..40 pixel sides, stride 1/2/3,
padding, dilation, 1x1 to 5x5 kernels, batch 1..8, per-tensor and
per-channel weights, bias or none, bits 2..7, signed and unsigned weights,
float32/float16/bfloat16 input; each test asserts which path ran."""
import pytest
import torch
import torch.nn.functional as F

import dnateq
from dnateq import ops
from dnateq import reference as ref

from conftest import assert_close_rel, gen, make_data, random_codes, tensor_params

DIRECT = "avx512_direct_conv"


def _runs_avx512():
    old = ops.cpu_isa()
    try:
        ops.cpu_isa("avx512")
        return True
    except RuntimeError:
        return False
    finally:
        ops.cpu_isa(old)


pytestmark = pytest.mark.skipif(not _runs_avx512(),
                                reason="this CPU lacks AVX-512 (F/BW/VL/DQ/VBMI): the direct "
                                       "conv kernel does not run here")


@pytest.fixture(autouse=True)
def avx512():
    old = ops.cpu_isa()
    ops.cpu_isa("avx512")
    yield
    ops.cpu_isa(old)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _params(g, x, bits):
    w = make_data((4, 64), g, "student")
    alpha, sw, bw = tensor_params(w, bits)
    _, sa, ba = tensor_params(x.float(), bits, alpha)
    return alpha, sa, ba, sw, bw


def _tolerance(dtype):
    # float32: summation order only; float16 / bfloat16: the result rounded
    # once to the input's dtype, on either side of a rounding boundary
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def run_case(B, C, H, W, O, kh, kw, stride, padding, dilation, bits, signed, seed,
             per_channel=False, with_bias=True, dtype=torch.float32, neg_offsets=False,
             want=DIRECT, x_signed=True):
    g = gen(seed)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x = make_data((B, C, H, W), g, zero_frac=0.2, signed=x_signed).to(dtype)
    p = _params(g, x, bits)
    if neg_offsets:   # some levels below zero (SPEC: any beta)
        p = (p[0], p[1], -2.0 * p[1], p[3], -3.0 * p[3])
    shape = [O, C, kh, kw]
    codes = random_codes(shape, bits, g, signed=signed, zero_frac=0.15)
    packed = dnateq.exp_pack(codes, bits, signed)
    layout = dnateq.exp_lut_layout(packed, shape, bits, signed)
    bias = torch.randn(O, generator=g) if with_bias else None
    kw_args = {}
    if per_channel:
        kw_args = dict(w_scale=(p[3] * torch.exp(torch.randn(O, generator=g) * 0.3)).float(),
                       w_offset=(p[4] * torch.randn(O, generator=g)).float())
    args = (x, packed, shape, *p, bits, False, signed, "nearest", bias, stride, padding,
            dilation, 1)
    got = dnateq.exp_conv2d_lut(*args, w_layout=layout, **kw_args)
    ctx = (B, C, H, W, O, kh, kw, stride, padding, dilation, bits, signed, per_channel,
           with_bias, dtype)
    assert ops.last_lut_path() == want, ctx
    exp = ref.exp_conv2d_lut(*args, **kw_args)
    assert got.dtype == dtype and got.shape == exp.shape, ctx
    # the size of the summed terms, |a_hat| * |w_hat| + |bias|, for the tolerance
    wc = ref._check_channel_params(kw_args.get("w_scale"), kw_args.get("w_offset"), O, p[0],
                                   bits, x.device)
    w_hat = ref._lut_weights(packed, shape, p[0], p[3], p[4], bits, signed, wc)
    a_hat = ref._fake_quant_act(x, p[0], p[1], p[2], bits, "nearest")
    mag = F.conv2d(a_hat.double().abs(), w_hat.double().abs(), None, stride, padding, dilation)
    if bias is not None:
        mag = mag + bias.double().abs().view(1, -1, 1, 1)
    assert_close_rel(got, exp, mag, _tolerance(dtype), 1e-5, str(ctx))
    return got


# (B, C, H, W, O, kh, kw, stride, padding, dilation)
CASES = [
    (1, 16, 32, 32, 16, 3, 3, 1, 1, 1),          # ResNet-20 stage 1
    (1, 16, 32, 32, 32, 3, 3, 2, 1, 1),          # its downsampling 3x3
    (1, 32, 16, 16, 32, 3, 3, 1, 1, 1),          # stage 2
    (1, 64, 8, 8, 64, 3, 3, 1, 1, 1),            # stage 3
    (1, 16, 32, 32, 32, 1, 1, 2, 0, 1),          # a 1x1 stride-2 shortcut
    (1, 3, 32, 32, 16, 3, 3, 1, 1, 1),           # the stem
    (2, 5, 7, 9, 6, 3, 3, 1, 1, 1),
    (3, 7, 13, 11, 9, 5, 5, 1, 2, 1),
    (8, 3, 1, 1, 5, 1, 1, 1, 0, 1),              # 1x1 image
    (1, 2, 1, 1, 3, 3, 3, 1, 1, 1),              # 1x1 image, 3x3 kernel, padding 1
    (4, 6, 40, 40, 7, 3, 3, 2, 2, 1),
    (1, 9, 17, 23, 13, 3, 3, (1, 2), (2, 0), 1),
    (2, 4, 20, 18, 5, 3, 3, 1, 2, 2),            # dilation 2
    (1, 10, 37, 29, 11, 5, 5, 2, 2, 1),
    (5, 1, 6, 6, 1, 3, 3, 1, 0, 1),
    (1, 17, 12, 31, 18, 2, 3, (2, 1), (1, 0), (1, 3)),
    (7, 4, 19, 6, 4, 1, 1, 1, 0, 1),
    (1, 8, 3, 40, 3, 3, 5, 3, 1, 1),             # stride 3
    (2, 3, 25, 16, 8, 3, 3, 2, 0, 1),
    (6, 12, 11, 14, 19, 3, 1, 1, (1, 0), 1),
    (1, 33, 5, 17, 2, 3, 3, 1, 1, (2, 1)),
    (8, 16, 8, 8, 16, 3, 3, 1, 1, 1),            # batch 8
]


@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("signed", [True, False])
def test_direct_conv_matches_reference(bits, signed):
    for i, (B, C, H, W, O, kh, kw, st, pad, dil) in enumerate(CASES):
        dtype = {3: torch.float16, 4: torch.bfloat16}.get(i % 5, torch.float32)
        run_case(B, C, H, W, O, kh, kw, st, pad, dil, bits, signed, seed=1000 * bits + 10 * i
                 + signed, per_channel=i % 2 == 1, with_bias=i % 3 != 0, dtype=dtype,
                 neg_offsets=i % 4 == 1, x_signed=i % 3 != 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_direct_conv_dtypes_and_weight_params(dtype, per_channel, with_bias):
    for j, case in enumerate([(1, 16, 32, 32, 16, 3, 3, 1, 1, 1), (2, 13, 10, 21, 9, 3, 3, 2, 1, 1)]):
        run_case(*case, bits=4, signed=True, seed=50 + j, per_channel=per_channel,
                 with_bias=with_bias, dtype=dtype)


def test_sides_1_to_40():
    # every output width and height 1..40 once (tails of the 16-wide vectors,
    # tiles of 1..6 vectors), stride 1 and 2
    for s in range(1, 41):
        run_case(1, 3, s, 41 - s, 5, 3, 3, 1, 1, 1, bits=5, signed=True, seed=s)
        run_case(2, 4, s, s, 6, 3, 3, 2, 1, 1, bits=3, signed=False, seed=100 + s,
                 per_channel=True)


def test_non_contiguous_input():
    g = gen(5)
    bits, signed = 4, True
    B, C, H, W, O = 2, 6, 9, 11, 10
    x = make_data((B, C, H, 2 * W), g)[..., ::2]
    assert not x.is_contiguous()
    p = _params(g, x, bits)
    shape = [O, C, 3, 3]
    packed = dnateq.exp_pack(random_codes(shape, bits, g, signed=signed), bits, signed)
    layout = dnateq.exp_lut_layout(packed, shape, bits, signed)
    args = (x, packed, shape, *p, bits, False, signed, "nearest", None, (1, 1), (1, 1),
            (1, 1), 1)
    got = dnateq.exp_conv2d_lut(*args, w_layout=layout)
    assert ops.last_lut_path() == DIRECT
    exp = ref.exp_conv2d_lut(*args)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5 * float(exp.abs().max()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_input_raises(bad, dtype):
    g = gen(6)
    bits, signed = 4, True
    x = make_data((1, 16, 32, 32), g)
    p = _params(g, x, bits)
    shape = [16, 16, 3, 3]
    packed = dnateq.exp_pack(random_codes(shape, bits, g, signed=signed), bits, signed)
    layout = dnateq.exp_lut_layout(packed, shape, bits, signed)
    x = x.to(dtype)
    x[0, 7, 31, 30] = bad
    args = (x, packed, shape, *p, bits, False, signed, "nearest", None, (1, 1), (1, 1),
            (1, 1), 1)
    with pytest.raises(RuntimeError, match=r"dnateq: x contains non-finite values \(NaN or Inf\)"):
        dnateq.exp_conv2d_lut(*args, w_layout=layout)
    # a non-finite value in a padding position does not exist: a clean x passes
    x[0, 7, 31, 30] = 0.5
    dnateq.exp_conv2d_lut(*args, w_layout=layout)
    assert ops.last_lut_path() == DIRECT


def test_same_result_for_any_thread_count():
    # each output is summed by one task in the same (c, kh, kw) order
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(run_case(3, 20, 15, 15, 22, 3, 3, 1, 1, 1, bits=5, signed=True,
                                 seed=9, per_channel=True))
        for o in outs[1:]:
            assert torch.equal(o, outs[0])
    finally:
        torch.set_num_threads(threads)


def test_large_convs_keep_the_native_conv():
    # above the rule in fast_conv.cpp (use_direct: > 2^27 multiply-adds or a
    # workspace over 8 MB) the native conv path runs, with the same results
    run_case(8, 128, 16, 16, 128, 3, 3, 1, 1, 1, bits=4, signed=True, seed=11,
             want="avx512_conv")
    run_case(1, 3, 2000, 300, 4, 3, 3, 1, 1, 1, bits=4, signed=True, seed=12,
             want="avx512_conv")        # workspace 3 * 3 * 2002 * 300 floats
    # batch 9 and groups != 1 are not the layout conv paths at all
    run_case(9, 4, 6, 6, 5, 3, 3, 1, 1, 1, bits=4, signed=True, seed=13, want="gemm")


def test_lower_isa_does_not_run_it():
    ops.cpu_isa("avx2")
    try:
        run_case(1, 16, 8, 8, 16, 3, 3, 1, 1, 1, bits=4, signed=True, seed=14, want="gemm")
    finally:
        ops.cpu_isa("avx512")


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def geometries(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    # input at least the dilated kernel (after padding)
    H = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 40))
    W = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 40))
    return dict(B=draw(st.integers(1, 8)), C=draw(st.integers(1, 20)), H=H, W=W,
                O=draw(st.integers(1, 20)), kh=kh, kw=kw, stride=(sh, sw), padding=(ph, pw),
                dilation=(dh, dw))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geo=geometries(), bits=st.integers(2, 7), signed=st.booleans(),
       per_channel=st.booleans(), with_bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2 ** 20))
def test_random_geometries(geo, bits, signed, per_channel, with_bias, dtype, seed):
    run_case(**geo, bits=bits, signed=signed, seed=seed, per_channel=per_channel,
             with_bias=with_bias, dtype=dtype)
