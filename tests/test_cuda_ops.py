"""CUDA operators against the CPU operators (which are tested against the
reference). Skipped, with a reason, where there is no GPU or the extension
was built without CUDA."""
import pytest
import torch

import dnateq

pytestmark = pytest.mark.cuda


def _cuda_kernels_present():
    if not torch.cuda.is_available():
        return False
    try:
        dnateq.exp_quantize(torch.ones(1, device="cuda"), 2.0, 1.0, 0.0, 3)
        return True
    except (RuntimeError, NotImplementedError):
        return False


if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine: CUDA kernels compile here but run only on a GPU",
                allow_module_level=True)
if not _cuda_kernels_present():
    pytest.skip("dnateq was built without CUDA kernels (DNATEQ_CUDA=0 or no nvcc)",
                allow_module_level=True)

DEV = "cuda"


def params(x, bits, alpha=None):
    a, s, b, _ = dnateq.exp_fit(x, bits, alpha=alpha)
    return a, s, b


@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("rounding", ["log", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_bit_exact(bits, rounding, dtype):
    torch.manual_seed(bits)
    x = (torch.randn(1001, 37) * 3).to(dtype)
    x[::7] = 0
    a, s, b = params(x.float(), bits)
    cpu = dnateq.exp_quantize(x, a, s, b, bits, rounding)
    gpu = dnateq.exp_quantize(x.to(DEV), a, s, b, bits, rounding)
    assert torch.equal(cpu, gpu.cpu())
    # non-contiguous input
    gpu_t = dnateq.exp_quantize(x.to(DEV).t(), a, s, b, bits, rounding)
    assert torch.equal(dnateq.exp_quantize(x.t(), a, s, b, bits, rounding), gpu_t.cpu())
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        d_cpu = dnateq.exp_dequantize(cpu, a, s, b, bits, out_dtype)
        d_gpu = dnateq.exp_dequantize(gpu, a, s, b, bits, out_dtype)
        assert torch.equal(d_cpu, d_gpu.cpu())


@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 33), (7, 2, 3, 3), (0, 4), (4, 1000)])
def test_pack_unpack(bits, signed, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    if not signed:
        x = x.abs()
    a, s, b = params(x, bits) if x.numel() else (2.0, 1.0, 0.0)
    codes = dnateq.exp_quantize(x, a, s, b, bits)
    p_cpu = dnateq.exp_pack(codes, bits, signed)
    p_gpu = dnateq.exp_pack(codes.to(DEV), bits, signed)
    assert torch.equal(p_cpu, p_gpu.cpu())
    assert torch.equal(dnateq.exp_unpack(p_gpu, bits, signed, list(shape)).cpu(), codes)


def _layer(M, K, N, bits, relu=True):
    x = torch.randn(M, K)
    if relu:
        x = torch.relu(x)
    w = torch.randn(N, K) / K ** 0.5
    a, sa, ba = params(x, bits)
    _, sw, bw = params(w, bits, alpha=a)
    return x, w, a, sa, ba, sw, bw


@pytest.mark.parametrize("bits", [3, 4, 5, 7])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("counter_bits", [None, 8])
def test_linear_count(bits, relu, counter_bits):
    torch.manual_seed(bits)
    x, w, a, sa, ba, sw, bw = _layer(9, 300, 17, bits, relu)
    ac = dnateq.exp_quantize(x, a, sa, ba, bits)
    wc = dnateq.exp_quantize(w, a, sw, bw, bits)
    bias = torch.randn(17)
    terms = dnateq.weight_terms(wc, bits)
    for t in (None, terms):
        y_cpu = dnateq.exp_linear_count(ac, wc, a, sa, ba, sw, bw, bits, bias, counter_bits, t)
        y_gpu = dnateq.exp_linear_count(ac.to(DEV), wc.to(DEV), a, sa, ba, sw, bw, bits,
                                        bias.to(DEV), counter_bits,
                                        None if t is None else t.to(DEV))
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stride,padding,dilation,groups",
                         [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 2), (2, 1, 1, 4)])
def test_conv_count_and_lut(stride, padding, dilation, groups):
    torch.manual_seed(1)
    bits = 4
    x = torch.relu(torch.randn(2, 8, 11, 9))
    w = torch.randn(12, 8 // groups, 3, 3) / 5
    a, sa, ba = params(x, bits)
    _, sw, bw = params(w, bits, alpha=a)
    ac = dnateq.exp_quantize(x, a, sa, ba, bits)
    wc = dnateq.exp_quantize(w, a, sw, bw, bits)
    geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y_cpu = dnateq.exp_conv2d_count(ac, wc, a, sa, ba, sw, bw, bits, **geo)
    y_gpu = dnateq.exp_conv2d_count(ac.to(DEV), wc.to(DEV), a, sa, ba, sw, bw, bits, **geo)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-6, atol=1e-6)
    wp = dnateq.exp_pack(wc, bits, True)
    l_cpu = dnateq.exp_conv2d_lut(x, wp, list(w.shape), a, sa, ba, sw, bw, bits, False, True,
                                  "nearest", None, **geo)
    l_gpu = dnateq.exp_conv2d_lut(x.to(DEV), wp.to(DEV), list(w.shape), a, sa, ba, sw, bw,
                                  bits, False, True, "nearest", None, **geo)
    scale = float(l_cpu.abs().max())
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("M", [1, 3, 8, 64])
@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2),
                                       (torch.bfloat16, 2e-2)])
def test_linear_lut_gemv_and_gemm(M, bits, dtype, tol):
    torch.manual_seed(M)
    x, w, a, sa, ba, sw, bw = _layer(M, 1000, 70, bits)
    wc = dnateq.exp_quantize(w, a, sw, bw, bits)
    wp = dnateq.exp_pack(wc, bits, True)
    bias = torch.randn(70)
    ac = dnateq.exp_quantize(x, a, sa, ba, bits)
    y_count = dnateq.exp_linear_count(ac, wc, a, sa, ba, sw, bw, bits, bias, None)
    y_gpu = dnateq.exp_linear_lut(x.to(DEV, dtype), wp.to(DEV), [70, 1000], a, sa, ba, sw, bw,
                                  bits, False, True, "nearest", bias.to(DEV))
    assert y_gpu.dtype == dtype
    scale = float(y_count.abs().max())
    torch.testing.assert_close(y_gpu.float().cpu(), y_count, rtol=tol, atol=tol * scale)


def test_fit_and_error_match_cpu():
    torch.manual_seed(3)
    x = torch.randn(100_000) ** 3
    for bits in (3, 5, 7):
        fit_cpu = dnateq.exp_fit(x, bits)
        fit_gpu = dnateq.exp_fit(x.to(DEV), bits)
        assert fit_gpu == pytest.approx(fit_cpu, rel=1e-12)
        e_cpu = dnateq.exp_error(x, *fit_cpu[:3], bits)
        e_gpu = dnateq.exp_error(x.to(DEV), *fit_cpu[:3], bits)
        assert e_gpu == pytest.approx(e_cpu, rel=1e-9)


def test_bad_input_on_cuda():
    x = torch.randn(10, device=DEV)
    x[3] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        dnateq.exp_quantize(x, 2.0, 1.0, 0.0, 4)
    a = torch.zeros(2, 8, dtype=torch.int8, device=DEV)
    w = torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="same device"):
        dnateq.exp_linear_count(a, w, 2.0, 1.0, 0.0, 1.0, 0.0, 4, None, None)
    with pytest.raises(RuntimeError, match="bits"):
        dnateq.exp_quantize(torch.ones(3, device=DEV), 2.0, 1.0, 0.0, 8)
    with pytest.raises(RuntimeError, match="x must be float32"):
        dnateq.exp_quantize(torch.ones(3, dtype=torch.float64, device=DEV), 2.0, 1.0, 0.0, 4)


@pytest.mark.parametrize("mode", ["lut", "count", "fake"])
def test_module_forward_cuda_equals_cpu(mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    q = dnateq.quantize(model, data, mode=mode, progress=False)
    x = torch.randn(2, 3, 8, 8)
    y_cpu = q(x)
    y_gpu = q.to(DEV)(x.to(DEV)).cpu()
    scale = float(y_cpu.abs().max())
    torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-4, atol=1e-4 * scale)


# --------------------------------------------------------------------------
# per-output-channel weight parameters (w_scale / w_offset, SPEC section 9)
# --------------------------------------------------------------------------

def _channel_layer(N, K, bits, conv=False):
    w = torch.randn((N, 4, 3, 3) if conv else (N, K)) * torch.logspace(
        -2, 1, N).reshape([-1] + [1] * (3 if conv else 1))
    a = params(w, bits)[0]
    S, B = [], []
    for j in range(N):
        _, s, b = params(w[j], bits, alpha=a)
        S.append(s)
        B.append(b)
    S, B = torch.tensor(S), torch.tensor(B)
    wc = torch.stack([dnateq.exp_quantize(w[j], a, float(S[j]), float(B[j]), bits)
                      for j in range(N)])
    return a, S, B, wc


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("M", [1, 3, 8, 64])
def test_linear_channel_params_cuda_equals_cpu(relu, M):
    torch.manual_seed(M)
    bits, N, K = 4, 33, 300
    a, S, B, wc = _channel_layer(N, K, bits)
    x = torch.randn(M, K)
    if relu:
        x = torch.relu(x)
    _, sa, ba = params(x, bits, alpha=a)
    ac = dnateq.exp_quantize(x, a, sa, ba, bits)
    bias = torch.randn(N)
    pc = dict(w_scale=S, w_offset=B)
    pcd = dict(w_scale=S.to(DEV), w_offset=B.to(DEV))
    terms = dnateq.weight_terms(wc, bits)
    for t in (None, terms):
        y_cpu = dnateq.exp_linear_count(ac, wc, a, sa, ba, 1.0, 0.0, bits, bias, None, t, **pc)
        y_gpu = dnateq.exp_linear_count(ac.to(DEV), wc.to(DEV), a, sa, ba, 1.0, 0.0, bits,
                                        bias.to(DEV), None, None if t is None else t.to(DEV),
                                        **pcd)
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-6, atol=1e-6)
    wp = dnateq.exp_pack(wc, bits, True)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
        l_cpu = dnateq.exp_linear_lut(x, wp, [N, K], a, sa, ba, 1.0, 0.0, bits, True, True,
                                      "nearest", bias, **pc)
        l_gpu = dnateq.exp_linear_lut(x.to(DEV, dtype), wp.to(DEV), [N, K], a, sa, ba, 1.0, 0.0,
                                      bits, True, True, "nearest", bias.to(DEV), **pcd)
        assert l_gpu.dtype == dtype
        scale = float(l_cpu.abs().max())
        torch.testing.assert_close(l_gpu.float().cpu(), l_cpu, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 0, 2)])
def test_conv_channel_params_cuda_equals_cpu(stride, padding, groups):
    torch.manual_seed(2)
    bits = 4
    a, S, B, wc = _channel_layer(8, 0, bits, conv=True)
    x = torch.relu(torch.randn(2, 4 * groups, 9, 9))
    _, sa, ba = params(x, bits, alpha=a)
    ac = dnateq.exp_quantize(x, a, sa, ba, bits)
    geo = dict(stride=stride, padding=padding, groups=groups)
    pc = dict(w_scale=S, w_offset=B)
    pcd = dict(w_scale=S.to(DEV), w_offset=B.to(DEV))
    y_cpu = dnateq.exp_conv2d_count(ac, wc, a, sa, ba, 1.0, 0.0, bits, **geo, **pc)
    y_gpu = dnateq.exp_conv2d_count(ac.to(DEV), wc.to(DEV), a, sa, ba, 1.0, 0.0, bits, **geo,
                                    **pcd)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-6, atol=1e-6)
    wp = dnateq.exp_pack(wc, bits, True)
    l_cpu = dnateq.exp_conv2d_lut(x, wp, list(wc.shape), a, sa, ba, 1.0, 0.0, bits, False,
                                  True, "nearest", None, **geo, **pc)
    l_gpu = dnateq.exp_conv2d_lut(x.to(DEV), wp.to(DEV), list(wc.shape), a, sa, ba, 1.0, 0.0,
                                  bits, False, True, "nearest", None, **geo, **pcd)
    scale = float(l_cpu.abs().max())
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, rtol=1e-4, atol=1e-4 * scale)


def test_channel_params_bad_input_on_cuda():
    bits, N, K = 3, 4, 8
    ac = torch.zeros(2, K, dtype=torch.int8, device=DEV)
    wc = torch.zeros(N, K, dtype=torch.int8, device=DEV)
    good = torch.full((N,), 0.1, device=DEV)
    cases = [
        (good.cpu(), good, "same device"),
        (good.double(), good, "w_scale must be float32"),
        (good[:3], good, r"w_scale must have shape \[4\]"),
        (good, None, "given together"),
        (torch.tensor([0.1, 0.0, 0.1, 0.1], device=DEV), good, "w_scale must be finite and > 0"),
        (torch.full((N,), 3e38, device=DEV), good, "non-finite level"),
    ]
    x = torch.randn(2, K, device=DEV)
    wp = dnateq.exp_pack(wc, bits, True)
    for s, o, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            dnateq.exp_linear_count(ac, wc, 1.3, 0.1, 0.0, 0.1, 0.0, bits, None,
                                    w_scale=s, w_offset=o)
        with pytest.raises(RuntimeError, match=msg):
            dnateq.exp_linear_lut(x, wp, [N, K], 1.3, 0.1, 0.0, 0.1, 0.0, bits, True, True,
                                  "nearest", None, w_scale=s, w_offset=o)
    with pytest.raises(RuntimeError, match="sw=1e\\+300"):
        dnateq.exp_linear_count(ac, wc, 1.3, 0.1, 0.0, 1e300, 0.0, bits, None)
    with pytest.raises(RuntimeError, match="bias contains non-finite"):
        dnateq.exp_linear_lut(x, wp, [N, K], 1.3, 0.1, 0.0, 0.1, 0.0, bits, True, True,
                              "nearest", torch.tensor([0.0, float("nan"), 0.0, 0.0], device=DEV))

# --- issue 17: numerics policy, non-finite input, the GEMV redesign -------------

def _lut_layer(M, K, N, bits, signed=True, seed=0, relu=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if relu:
        x = torch.relu(x)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    if not signed:
        w = w.abs()
    a, sa, ba = params(x, bits)
    _, sw, bw = params(w, bits, alpha=a)
    wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, bits), bits, signed)
    return x, wp, (a, sa, ba, sw, bw)


def _ulps_apart(y, y32, dtype, n=1):
    """|y - y32| within n ulps of dtype at y32's magnitude."""
    ulp = torch.finfo(dtype).eps * y32.abs().clamp_min(torch.finfo(dtype).tiny)
    return bool(((y.float() - y32).abs() <= n * ulp + torch.finfo(dtype).tiny).all())


@pytest.mark.parametrize("tf32", [True, False])
def test_conv_lut_fp32_never_tf32(tf32, monkeypatch):
    """Fix 1: cuDNN's TF32 (on by default for convolutions) gave ~3e-4 x max."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    torch.manual_seed(2)
    bits = 4
    x = torch.relu(torch.randn(2, 32, 12, 12))
    w = torch.randn(48, 32, 3, 3) / 17
    a, sa, ba = params(x, bits)
    _, sw, bw = params(w, bits, alpha=a)
    wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, bits), bits, True)
    args = (list(w.shape), a, sa, ba, sw, bw, bits, False, True, "nearest", None, 1, 1, 1, 1)
    y_cpu = dnateq.exp_conv2d_lut(x, wp, *args)
    y_gpu = dnateq.exp_conv2d_lut(x.to(DEV), wp.to(DEV), *args).cpu()
    scale = float(y_cpu.abs().max())
    torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-5, atol=1e-5 * scale)
    assert torch.backends.cudnn.allow_tf32 == tf32


@pytest.mark.parametrize("tf32", [True, False])
def test_linear_lut_fp32_gemm_never_tf32(tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    x, wp, p = _lut_layer(64, 1024, 70, 4, seed=3)
    y_cpu = dnateq.exp_linear_lut(x, wp, [70, 1024], *p, 4, False, True, "nearest", None)
    y_gpu = dnateq.exp_linear_lut(x.to(DEV), wp.to(DEV), [70, 1024], *p, 4, False, True,
                                  "nearest", None).cpu()
    scale = float(y_cpu.abs().max())
    torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-5, atol=1e-5 * scale)
    assert torch.backends.cuda.matmul.allow_tf32 == tf32   # the guard restored it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [1000, 1024])   # fallback GEMV / gemv2 for M <= 8
def test_linear_lut_half_no_batch_size_dependence(dtype, K):
    """Fix 2: every M computes in float32 and rounds once (the CPU's policy)."""
    N, bits = 37, 3
    x, wp, p = _lut_layer(300, K, N, bits, seed=4)
    xh = x.to(dtype)
    for M in (1, 2, 8, 9, 16, 64, 300):
        y32 = dnateq.exp_linear_lut(xh[:M].float(), wp, [N, K], *p, bits, False, True,
                                    "nearest", None)
        y = dnateq.exp_linear_lut(xh[:M].to(DEV), wp.to(DEV), [N, K], *p, bits, False, True,
                                  "nearest", None)
        assert y.dtype == dtype
        assert _ulps_apart(y.cpu(), y32, dtype), M


def test_linear_lut_fp16_levels_beyond_fp16_range():
    N, K, bits = 8, 256, 4
    g = torch.Generator().manual_seed(5)
    x = torch.rand(64, K, generator=g) * 1e-3
    w = torch.randn(N, K, generator=g) * 3e5
    a, sa, ba = params(x, bits)
    _, sw, bw = params(w, bits, alpha=a)
    wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, bits), bits, True)
    for M in (1, 8, 9, 64):
        y32 = dnateq.exp_linear_lut(x[:M].half().float(), wp, [N, K], a, sa, ba, sw, bw, bits,
                                    False, True, "nearest", None)
        y = dnateq.exp_linear_lut(x[:M].half().to(DEV), wp.to(DEV), [N, K], a, sa, ba, sw, bw,
                                  bits, False, True, "nearest", None).cpu()
        assert bool(torch.isfinite(y).all()), M
        assert _ulps_apart(y, y32, torch.float16, 2), M


@pytest.mark.parametrize("case", ["gemv2", "gemv_fallback", "gemm", "conv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lut_non_finite_raises_like_cpu(case, bad, dtype):
    """Fix 3: the CPU raises on NaN/Inf activations; CUDA must too, same message."""
    bits = 4
    if case == "conv":
        x = torch.relu(torch.randn(1, 4, 6, 6))
        w = torch.randn(3, 4, 3, 3) / 6
        a, sa, ba = params(x, bits)
        _, sw, bw = params(w, bits, alpha=a)
        wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, bits), bits, True)
        x[0, 1, 2, 3] = bad

        def op(xx, pp):
            return dnateq.exp_conv2d_lut(xx, pp, [3, 4, 3, 3], a, sa, ba, sw, bw, bits, False,
                                         True, "nearest", None, 1, 1, 1, 1)
    else:
        M, K = {"gemv2": (1, 256), "gemv_fallback": (3, 1000), "gemm": (64, 256)}[case]
        x, wp, p = _lut_layer(M, K, 9, bits)
        x[M - 1, K // 2] = bad

        def op(xx, pp):
            return dnateq.exp_linear_lut(xx, pp, [9, K], *p, bits, False, True, "nearest", None)
    x = x.to(dtype)
    with pytest.raises(RuntimeError, match="non-finite") as e_cpu:
        op(x, wp)
    with pytest.raises(RuntimeError, match="non-finite") as e_gpu:
        op(x.to(DEV), wp.to(DEV))
    first = lambda e: str(e.value).splitlines()[0]  # noqa: E731
    assert first(e_gpu) == first(e_cpu)


@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("signed", [True, False])
def test_gemv2_every_width(bits, signed):
    """csrc/lut/gemv.cu at every field width, M = 1..8, against the CPU op."""
    for M, K, N in ((1, 128, 1), (2, 1024, 70), (3, 384, 257), (5, 2048, 33), (8, 1024, 129)):
        x, wp, p = _lut_layer(M, K, N, bits, signed, seed=bits * 10 + M, relu=False)
        bias = torch.randn(N)
        y_cpu = dnateq.exp_linear_lut(x, wp, [N, K], *p, bits, True, signed, "nearest", bias)
        y_gpu = dnateq.exp_linear_lut(x.to(DEV), wp.to(DEV), [N, K], *p, bits, True, signed,
                                      "nearest", bias.to(DEV)).cpu()
        scale = float(y_cpu.abs().max())
        torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("M,K,N", [(8, 8192, 40), (1, 16384, 3), (4, 4096, 2000),
                                   (1, 8192, 1024)])
def test_gemv2_split_k_and_large(M, K, N):
    """Split-K (partials summed by a second kernel) and the target's K (the
    benchmark checks the full 8192 x 8192 shape against a float64 reference)."""
    x, wp, p = _lut_layer(M, K, N, 3, seed=M)
    y_cpu = dnateq.exp_linear_lut(x, wp, [N, K], *p, 3, False, True, "nearest", None)
    y_gpu = dnateq.exp_linear_lut(x.to(DEV), wp.to(DEV), [N, K], *p, 3, False, True,
                                  "nearest", None).cpu()
    scale = float(y_cpu.abs().max())
    torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-5, atol=1e-5 * scale)
    for dt in (torch.float16, torch.bfloat16):
        y32 = dnateq.exp_linear_lut(x.to(dt).float(), wp, [N, K], *p, 3, False, True,
                                    "nearest", None)
        y = dnateq.exp_linear_lut(x.to(DEV, dt), wp.to(DEV), [N, K], *p, 3, False, True,
                                  "nearest", None).cpu()
        assert _ulps_apart(y, y32, dt), dt


def test_gemv2_misaligned_and_views_fall_back():
    """A packed view whose base is not 16-byte aligned, and non-contiguous x."""
    x, wp, p = _lut_layer(2, 256, 8, 4)
    big = torch.zeros(wp.numel() + 4, dtype=torch.uint8, device=DEV)
    view = big[4:].view(wp.shape)       # 4-byte but not 16-byte aligned
    view.copy_(wp)
    want = dnateq.exp_linear_lut(x, wp, [8, 256], *p, 4, False, True, "nearest", None)
    got = dnateq.exp_linear_lut(x.to(DEV).t().contiguous().t(), view, [8, 256],
                                *p, 4, False, True, "nearest", None)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_lut_ops_capture_in_cuda_graph():
    """No host synchronization inside capture: the GEMV and GEMM paths record
    into a CUDA graph and replay to the eager result."""
    for M, K in ((1, 1024), (3, 1000), (32, 256)):
        x, wp, p = _lut_layer(M, K, 64, 3, seed=M)
        xd, wd = x.to(DEV), wp.to(DEV)

        def op():
            return dnateq.exp_linear_lut(xd, wd, [64, K], *p, 3, False, True, "nearest", None)
        eager = op()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            op()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = op()
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
