"""Numerics policy of the LUT ops (issue 17, fixes 1 and 2), checked on the CPU:
float32 x_hat and w_hat and float32 accumulation at every batch size and for
every input dtype, one rounding to x.dtype at the end; no TF32 in the
reference; and the bf16x3 emulation the CUDA GEMM path uses for fp16/bf16
(and the TF32 rounding it replaces) measured on the data the CUDA tests use.
tests/test_cuda_ops.py checks the same properties on a GPU."""
import pytest
import torch
import torch.nn.functional as F

import dnateq
from dnateq import reference as ref


def _layer(M, K, N, bits, seed=0, w_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(M, K, generator=g))
    w = torch.randn(N, K, generator=g) / K ** 0.5 * w_scale
    a, sa, ba, _ = dnateq.exp_fit(x, bits)
    _, sw, bw, _ = dnateq.exp_fit(w, bits, alpha=a)
    wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, bits), bits, True)
    return x, wp, (a, sa, ba, sw, bw)


def _lut(x, wp, N, K, p, bits, bias=None):
    return dnateq.exp_linear_lut(x, wp, [N, K], *p, bits, False, True, "nearest", bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 4, 5, 64, 600])   # GEMV, panel and whole-GEMM paths
def test_half_inputs_compute_in_float32(dtype, M):
    """y(x in fp16/bf16) == y(x.float()) rounded once to the dtype, bit for bit."""
    N, K, bits = 40, 384, 4
    x, wp, p = _layer(M, K, N, bits, seed=M)
    xh = x.to(dtype)
    bias = torch.randn(N)
    y = _lut(xh, wp, N, K, p, bits, bias)
    assert y.dtype == dtype
    y32 = _lut(xh.float(), wp, N, K, p, bits, bias)
    assert torch.equal(y, y32.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_batch_size_dependent_numerics(dtype):
    """A row's result does not depend on how many rows come with it: the float32
    results agree to float32 rounding, the rounded ones within one ulp."""
    N, K, bits = 33, 512, 3
    x, wp, p = _layer(300, K, N, bits, seed=1)
    xh = x.to(dtype)
    rows = {M: _lut(xh[:M], wp, N, K, p, bits) for M in (1, 2, 4, 8, 9, 16, 64, 300)}
    rows32 = {M: _lut(xh[:M].float(), wp, N, K, p, bits) for M in rows}
    for M in rows:
        torch.testing.assert_close(rows32[M][:1], rows32[1], rtol=1e-5, atol=1e-6)
        ulp = torch.finfo(dtype).eps * rows32[1].abs().clamp_min(torch.finfo(dtype).tiny)
        assert bool(((rows[M][:1].float() - rows[1].float()).abs() <= 2 * ulp).all()), M


def test_fp16_weight_levels_above_fp16_range():
    """Weight levels above 65504 (Inf in fp16) with an output that fits fp16: the
    result is finite at every batch size (decoding to fp16 would give Inf)."""
    N, K, bits = 8, 256, 4
    g = torch.Generator().manual_seed(5)
    x = torch.rand(64, K, generator=g) * 1e-3
    w = torch.randn(N, K, generator=g) * 3e5
    a, sa, ba, _ = dnateq.exp_fit(x, bits)
    _, sw, bw, _ = dnateq.exp_fit(w, bits, alpha=a)
    wc = dnateq.exp_quantize(w, a, sw, bw, bits)
    assert float(dnateq.exp_dequantize(wc, a, sw, bw, bits).abs().max()) > 65504
    wp = dnateq.exp_pack(wc, bits, True)
    for M in (1, 8, 9, 64):
        y = _lut(x[:M].half(), wp, N, K, (a, sa, ba, sw, bw), bits)
        assert bool(torch.isfinite(y).all()), M
        y32 = _lut(x[:M].half().float(), wp, N, K, (a, sa, ba, sw, bw), bits)
        assert float(y32.abs().max()) < 60000
        torch.testing.assert_close(y, y32.half())


def test_reference_native_ops_run_in_float32_on_the_cpu(monkeypatch):
    """The fake/reference LUT path runs its F.linear / F.conv2d on CPU float32
    tensors, where TF32 does not exist, whatever the input device and the TF32
    flags say (so the oracle is never a TF32 result)."""
    seen = []
    real_linear, real_conv = F.linear, F.conv2d

    def spy(real):
        def f(inp, weight, *args, **kw):
            seen.append((inp.device.type, inp.dtype, weight.device.type, weight.dtype))
            return real(inp, weight, *args, **kw)
        return f

    monkeypatch.setattr(torch.nn.functional, "linear", spy(real_linear))
    monkeypatch.setattr(torch.nn.functional, "conv2d", spy(real_conv))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    bits = 4
    x, wp, p = _layer(3, 64, 5, bits)
    ref.exp_linear_lut(x.half(), wp, [5, 64], *p, bits, False, True, "nearest", None)
    xc = torch.relu(torch.randn(1, 4, 6, 6))
    wc = dnateq.exp_quantize(torch.randn(3, 4, 3, 3) / 6, p[0], p[3], p[4], bits)
    ref.exp_conv2d_lut(xc.bfloat16(), dnateq.exp_pack(wc, bits, True), [3, 4, 3, 3], *p, bits,
                       False, True, "nearest", None)
    assert seen and all(s == ("cpu", torch.float32, "cpu", torch.float32) for s in seen), seen


# --- the CUDA GEMM path's arithmetic, emulated ----------------------------------

def _round_mantissa(v, keep):
    """Round float32 v to `keep` explicit mantissa bits (nearest even)."""
    b = v.contiguous().view(torch.int32).to(torch.int64)
    drop = 23 - keep
    half = 1 << (drop - 1)
    lsb = (b >> drop) & 1
    b = ((b + half - 1 + lsb) >> drop) << drop
    return b.to(torch.int32).view(torch.float32)


def _conv_data():
    """The data of tests/test_cuda_ops.py::test_conv_count_and_lut, as a GEMM."""
    torch.manual_seed(1)
    bits = 4
    x = torch.relu(torch.randn(2, 8, 11, 9))
    w = torch.randn(12, 8, 3, 3) / 5
    a, sa, ba, _ = dnateq.exp_fit(x, bits)
    _, sw, bw, _ = dnateq.exp_fit(w, bits, alpha=a)
    xq = dnateq.exp_dequantize(dnateq.exp_quantize(x, a, sa, ba, bits), a, sa, ba, bits)
    wq = dnateq.exp_dequantize(dnateq.exp_quantize(w, a, sw, bw, bits), a, sw, bw, bits)
    cols = F.unfold(xq, 3, padding=1).transpose(1, 2).reshape(-1, 72)
    return cols, wq.reshape(12, 72)


def _layer_data():
    x, wp, p = _layer(64, 1024, 70, 4, seed=64)
    a, sa, ba, sw, bw = p
    xq = dnateq.exp_dequantize(dnateq.exp_quantize(x, a, sa, ba, 4), a, sa, ba, 4)
    wq = dnateq.exp_dequantize(dnateq.exp_unpack(wp, 4, True, [70, 1024]), a, sw, bw, 4)
    return xq, wq


@pytest.mark.parametrize("data", [_conv_data, _layer_data])
def test_bf16x3_is_float32_faithful_and_tf32_is_not(data):
    """bf16x3 (hi*hi + hi*lo + lo*hi, as csrc/lut/gemv.cu bf16x3_linear) stays far
    inside SPEC section 4's float32 tolerance (1e-4 x max); TF32 (10-bit
    mantissas, what cuDNN used for the fp32 conv) does not, which is what the
    CUDA conv test sees when TF32 is left on."""
    xq, wq = data()
    exact = xq.double() @ wq.double().T
    scale = float(exact.abs().max())

    def split(v):
        hi = v.bfloat16().float()
        return hi, (v - hi).bfloat16().float()
    xh, xl = split(xq)
    wh, wl = split(wq)
    b3 = xh.double() @ wh.double().T + xh.double() @ wl.double().T + xl.double() @ wh.double().T
    err_b3 = float((b3 - exact).abs().max()) / scale
    tf = _round_mantissa(xq, 10).double() @ _round_mantissa(wq, 10).double().T
    err_tf32 = float((tf - exact).abs().max()) / scale
    assert err_b3 < 1e-5, err_b3
    assert err_tf32 > 1e-4, err_tf32   # the fp32 tolerance would catch TF32
