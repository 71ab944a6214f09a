"""Gradients of the LUT and count ops and the quantized modules (issue 14 item 4):
a straight-through estimator for the input (dL/dx = dL/dy @ W_hat, the
transposed conv for convs) and the exact gradient for the bias."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dnateq
from dnateq.nn import ExpConv2d, ExpLinear

from conftest import gen, make_data, random_codes

BITS = 4
P = (1.3, 0.1, 0.01, 0.2, -0.01)   # alpha, sa, ba, sw, bw
ops = torch.ops.dnateq


def _w_hat(codes):
    return dnateq.exp_dequantize(codes, P[0], P[3], P[4], BITS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_lut_ste_and_bias_grad(dtype):
    g = gen(1)
    w = random_codes((5, 7), BITS, g)
    wp = dnateq.exp_pack(w, BITS, True)
    x = make_data((2, 3, 7), g).to(dtype).requires_grad_()
    bias = torch.randn(5, generator=g).requires_grad_()
    y = dnateq.exp_linear_lut(x, wp, [5, 7], *P, BITS, True, True, "nearest", bias)
    assert y.requires_grad
    gy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(gy)
    want = (gy.float().reshape(-1, 5) @ _w_hat(w)).reshape(x.shape).to(dtype)
    assert x.grad is not None and x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, want)
    torch.testing.assert_close(bias.grad, gy.float().sum((0, 1)))


@pytest.mark.parametrize("geo", [((1, 1), (0, 0), (1, 1), 1), ((2, 1), (1, 2), (1, 2), 2)])
def test_conv2d_lut_ste_and_bias_grad(geo):
    stride, padding, dilation, groups = geo
    g = gen(2)
    w = random_codes((4, 4 // groups, 3, 3), BITS, g)
    wp = dnateq.exp_pack(w, BITS, True)
    x = make_data((2, 4, 9, 8), g).requires_grad_()
    bias = torch.randn(4, generator=g).requires_grad_()
    y = dnateq.exp_conv2d_lut(x, wp, list(w.shape), *P, BITS, True, True, "nearest", bias,
                              stride, padding, dilation, groups)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    xs = x.detach().clone().requires_grad_()
    bs = bias.detach().clone().requires_grad_()
    F.conv2d(xs, _w_hat(w), bs, stride, padding, dilation, groups).backward(gy)
    torch.testing.assert_close(x.grad, xs.grad)
    torch.testing.assert_close(bias.grad, bs.grad)


def test_count_ops_bias_grad_exact():
    g = gen(3)
    a = random_codes((3, 7), BITS, g)
    w = random_codes((5, 7), BITS, g)
    bias = torch.randn(5, generator=g).requires_grad_()
    y = dnateq.exp_linear_count(a, w, *P, BITS, bias)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    torch.testing.assert_close(bias.grad, gy.sum(0))
    a4 = random_codes((2, 2, 5, 5), BITS, g, signed=False)
    w4 = random_codes((4, 1, 3, 3), BITS, g)
    b4 = torch.randn(4, generator=g).requires_grad_()
    y4 = dnateq.exp_conv2d_count(a4, w4, *P, BITS, b4, 1, 1, 1, 2)
    y4.sum().backward()
    torch.testing.assert_close(b4.grad, torch.full((4,), 2.0 * 5 * 5))


def test_gradcheck_bias():
    """gradcheck applies where the gradient is exact: the bias (float32, so with
    loose finite-difference tolerances; the ops take no float64)."""
    g = gen(4)
    w = random_codes((5, 7), BITS, g)
    wp = dnateq.exp_pack(w, BITS, True)
    x = make_data((3, 7), g)
    a = random_codes((3, 7), BITS, g)
    w4 = random_codes((4, 2, 3, 3), BITS, g)
    x4 = make_data((1, 2, 5, 5), g)
    a4 = random_codes((1, 2, 5, 5), BITS, g)
    w4p = dnateq.exp_pack(w4, BITS, True)
    kw = dict(eps=1e-2, atol=1e-2, rtol=1e-3, nondet_tol=0.0)
    cases = [
        (lambda b: dnateq.exp_linear_lut(x, wp, [5, 7], *P, BITS, True, True, "nearest", b), 5),
        (lambda b: dnateq.exp_linear_count(a, w, *P, BITS, b), 5),
        (lambda b: dnateq.exp_conv2d_lut(x4, w4p, [4, 2, 3, 3], *P, BITS, True, True,
                                         "nearest", b, 1, 1), 4),
        (lambda b: dnateq.exp_conv2d_count(a4, w4, *P, BITS, b, 1, 1), 4),
    ]
    import warnings
    for f, n in cases:
        b = torch.randn(n, generator=g).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "not double precision"
            assert torch.autograd.gradcheck(f, (b,), **kw)


def test_gradcheck_ste_is_the_surrogate_gradient():
    """The straight-through x gradient is exactly F.linear's on W_hat:
    gradcheck of the backward against the surrogate's analytic Jacobian."""
    g = gen(5)
    w = random_codes((3, 4), BITS, g)
    wp = dnateq.exp_pack(w, BITS, True)
    x = make_data((2, 4), g).requires_grad_()
    y = dnateq.exp_linear_lut(x, wp, [3, 4], *P, BITS, True, True, "nearest", None)
    jac = torch.stack([torch.autograd.grad(y[i, j], x, retain_graph=True)[0]
                       for i in range(2) for j in range(3)])
    xs = x.detach().double().requires_grad_()
    want = torch.autograd.functional.jacobian(lambda t: F.linear(t, _w_hat(w).double()), xs)
    torch.testing.assert_close(jac.double(), want.reshape(6, 2, 4))


def _layers(g):
    lin = nn.Linear(7, 5)
    conv = nn.Conv2d(4, 6, 2, padding="same", groups=2)
    ql = ExpLinear.from_float(lin, BITS, a_params=(0.05, 0.0), a_signed=True)
    qc = ExpConv2d.from_float(conv, BITS, a_params=(0.05, 0.0), a_signed=False)
    return [(ql, make_data((2, 3, 7), g)), (qc, torch.relu(make_data((2, 4, 6, 5), g)))]


@pytest.mark.parametrize("mode", ["lut", "count", "fake"])
def test_modules_set_x_and_bias_grads(mode):
    torch.manual_seed(0)
    g = gen(6)
    for q, x in _layers(g):
        q.mode = mode
        q.bias.requires_grad_()
        x = x.requires_grad_()
        y = q(x)
        gy = torch.randn(y.shape, generator=g)
        y.backward(gy)
        assert x.grad is not None and q.bias.grad is not None, (type(q).__name__, mode)
        # the surrogate: the float layer with the dequantized weight
        xs = x.detach().clone().requires_grad_()
        bs = q.bias.detach().clone().requires_grad_()
        wh = q.dequantized_weight()
        if isinstance(q, ExpLinear):
            ys = F.linear(xs, wh, bs)
        else:   # 'same' with an even kernel: PyTorch pads one more after
            ys = F.conv2d(F.pad(xs, (0, 1, 0, 1)), wh, bs, q.stride, 0, q.dilation, q.groups)
        ys.backward(gy)
        torch.testing.assert_close(x.grad, xs.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q.bias.grad, bs.grad, rtol=1e-5, atol=1e-5)


def test_modules_without_grad_do_not_record():
    g = gen(7)
    for q, x in _layers(g):
        for mode in ("lut", "count", "fake"):
            q.mode = mode
            assert not q(x).requires_grad
            with torch.no_grad():
                assert not q(x.requires_grad_()).requires_grad
            x = x.detach()


def test_fine_tuning_step_lowers_the_loss():
    """A bias-only fine-tuning step through a quantized two-layer model."""
    torch.manual_seed(1)
    g = gen(8)
    l1 = ExpLinear.from_float(nn.Linear(6, 8), BITS, a_params=(0.05, 0.0))
    l2 = ExpLinear.from_float(nn.Linear(8, 3), BITS, a_params=(0.05, 0.0), a_signed=False)
    model = nn.Sequential(l1, nn.ReLU(), l2)
    for m in (l1, l2):
        m.bias.requires_grad_()
    x, t = make_data((16, 6), g), torch.randn(16, 3, generator=g)
    opt = torch.optim.SGD([l1.bias, l2.bias], lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["linear_lut", "conv2d_lut", "linear_count", "conv2d_count"])
def test_opcheck_with_gradients(name):
    """opcheck's autograd-registration and AOT (forward + backward) checks with
    inputs that require grad."""
    g = gen(9)
    w = random_codes((4, 7), BITS, g)
    w4 = random_codes((4, 1, 3, 3), BITS, g)
    bias = torch.randn(4, generator=g).requires_grad_()
    if name == "linear_lut":
        args = (make_data((3, 7), g).requires_grad_(), dnateq.exp_pack(w, BITS, True), [4, 7],
                *P, BITS, True, True, "nearest", bias)
        op = ops.exp_linear_lut.default
    elif name == "conv2d_lut":
        args = (make_data((1, 2, 5, 5), g).requires_grad_(), dnateq.exp_pack(w4, BITS, True),
                [4, 1, 3, 3], *P, BITS, True, True, "nearest", bias, [1, 1], [1, 1], [1, 1], 2)
        op = ops.exp_conv2d_lut.default
    elif name == "linear_count":
        args = (random_codes((3, 7), BITS, g), w, *P, BITS, bias, None, None)
        op = ops.exp_linear_count.default
    else:
        args = (random_codes((1, 2, 5, 5), BITS, g), w4, *P, BITS, bias, [1, 1], [1, 1],
                [1, 1], 2, None, None)
        op = ops.exp_conv2d_count.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiled_module_backward_matches_eager():
    g = gen(10)
    q, x = _layers(g)[1]
    q.bias.requires_grad_()
    x1 = x.clone().requires_grad_()
    q(x1).sum().backward()
    gx, gb = x1.grad.clone(), q.bias.grad.clone()
    q.bias.grad = None
    x2 = x.clone().requires_grad_()
    torch.compile(q, backend="aot_eager", fullgraph=True)(x2).sum().backward()
    torch.testing.assert_close(x2.grad, gx)
    torch.testing.assert_close(q.bias.grad, gb)


def test_per_channel_ste_uses_the_per_channel_weight():
    """With w_scale/w_offset the straight-through gradient goes through the
    per-channel dequantized weight; a gradient of w_scale/w_offset is refused."""
    from dnateq import reference as ref
    g = gen(11)
    w = random_codes((5, 7), BITS, g)
    wp = dnateq.exp_pack(w, BITS, True)
    ws = (torch.rand(5, generator=g) * 0.2 + 0.1)
    wo = torch.randn(5, generator=g) * 0.01
    x = make_data((3, 7), g).requires_grad_()
    bias = torch.randn(5, generator=g).requires_grad_()
    y = dnateq.exp_linear_lut(x, wp, [5, 7], *P, BITS, True, True, "nearest", bias,
                              w_scale=ws, w_offset=wo)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    w_hat = ref.dequantize_channels(w, P[0], ws, wo, BITS)
    torch.testing.assert_close(x.grad, gy @ w_hat)
    torch.testing.assert_close(bias.grad, gy.sum(0))
    with pytest.raises(RuntimeError, match="no gradient for its weight parameters"):
        dnateq.exp_linear_lut(x, wp, [5, 7], *P, BITS, True, True, "nearest", bias,
                              w_scale=ws.clone().requires_grad_(), w_offset=wo)
    a = random_codes((3, 7), BITS, g)
    with pytest.raises(RuntimeError, match="no gradient for its weight parameters"):
        dnateq.exp_linear_count(a, w, *P, BITS, bias, w_scale=ws, w_offset=wo.clone()
                                .requires_grad_())


@pytest.mark.parametrize("mode", ["lut", "count", "fake"])
def test_per_channel_module_grads(mode):
    torch.manual_seed(2)
    g = gen(12)
    lin = nn.Linear(6, 4)
    alpha = 1.2
    S = torch.rand(4, generator=g) * 0.05 + 0.02
    q = ExpLinear.from_float(lin, BITS, w_params=(alpha, S, torch.zeros(4)),
                             a_params=(alpha, 0.05, 0.0), mode=mode)
    assert q.per_channel
    q.bias.requires_grad_()
    x = make_data((3, 6), g).requires_grad_()
    gy = torch.randn(3, 4, generator=g)
    q(x).backward(gy)
    torch.testing.assert_close(x.grad, gy @ q.dequantized_weight(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, gy.sum(0))
