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
