"""ExpLinear / ExpConv2d with per-output-channel weight parameters and the
smoothing vector: the three modes agree, dequantized weights, report, .double(),
and repr (save/load: test_per_channel_persistence.py)."""
import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq import reference as ref
from dnateq.nn import ExpConv2d, ExpLinear

from conftest import assert_close_rel, gen, make_data, tensor_params

def _channel_w_params(w, bits):
    alpha = tensor_params(w, bits)[0]
    rows = w.reshape(w.shape[0], -1)
    S = torch.tensor([tensor_params(rows[j], bits, alpha)[1] for j in range(len(rows))])
    B = torch.tensor([tensor_params(rows[j], bits, alpha)[2] for j in range(len(rows))])
    return alpha, S, B


def _linear(g, bits=4, signed_a=True, smooth=False, bias=True):
    lin = nn.Linear(40, 12, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, 12)[:, None])
    x = make_data((8, 40), g, signed=signed_a)
    alpha, S, B = _channel_w_params(lin.weight.detach(), bits)
    _, sa, ba = tensor_params(x, bits, alpha)
    q = ExpLinear.from_float(lin, bits, (alpha, S, B), (alpha, sa, ba), signed_a)
    if smooth:
        q.set_smooth(torch.rand(40, generator=g) + 0.5)
    return lin, q, x


def _conv(g, bits=4, groups=2, smooth=False):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
    x = make_data((2, 4, 7, 7), g)
    alpha, S, B = _channel_w_params(conv.weight.detach(), bits)
    _, sa, ba = tensor_params(x, bits, alpha)
    q = ExpConv2d.from_float(conv, bits, (alpha, S, B), (alpha, sa, ba), True)
    if smooth:
        q.set_smooth(torch.rand(4, generator=g) + 0.5)
    return conv, q, x


def _outputs(q, x):
    out = {}
    for mode in ("lut", "count", "fake"):
        q.mode = mode
        out[mode] = q(x)
    q.mode = "lut"
    return out


@pytest.mark.parametrize("signed_a", [True, False])
@pytest.mark.parametrize("smooth", [False, True])
def test_linear_modes_agree(signed_a, smooth):
    g = gen(7000 + signed_a + 2 * smooth)
    lin, q, x = _linear(g, signed_a=signed_a, smooth=smooth)
    assert q.per_channel and q.w_scale.shape == (12,) and q.w_scale.dtype == torch.float32
    out = _outputs(q, x)
    w_hat = q.dequantized_weight()
    xs = x / q.smooth if smooth else x
    a_hat = ref.exp_dequantize(ref.exp_quantize(xs, q.alpha, q.sa, q.ba, q.bits), q.alpha,
                               q.sa, q.ba, q.bits)
    mag = a_hat.abs() @ w_hat.abs().t() + q.bias.abs()
    for m in ("count", "fake"):
        assert_close_rel(out["lut"], out[m], mag, 1e-4, 1e-5, m)
    assert_close_rel(out["lut"], a_hat @ w_hat.t() + q.bias, mag, 1e-4, 1e-5, "w_hat")
    # the smallest row keeps its own scale (a per-tensor fit would zero most of it)
    small = int(torch.argmin(lin.weight.abs().sum(1)))
    err = (w_hat[small] - lin.weight[small]).abs().sum() / lin.weight[small].abs().sum()
    assert err < 0.5


@pytest.mark.parametrize("smooth", [False, True])
def test_conv_modes_agree(smooth):
    g = gen(7100 + smooth)
    conv, q, x = _conv(g, smooth=smooth)
    out = _outputs(q, x)
    xs = x / q.smooth.reshape(1, -1, 1, 1) if smooth else x
    a_hat = ref.exp_dequantize(ref.exp_quantize(xs, q.alpha, q.sa, q.ba, q.bits), q.alpha,
                               q.sa, q.ba, q.bits)
    w_hat = q.dequantized_weight()
    geo = (q.stride, q.padding, q.dilation, q.groups)
    mag = nn.functional.conv2d(a_hat.abs(), w_hat.abs(), q.bias.abs(), *geo)
    want = nn.functional.conv2d(a_hat, w_hat, q.bias, *geo)
    for m in ("lut", "count", "fake"):
        assert_close_rel(out[m], want, mag, 1e-4, 1e-5, m)


def test_smooth_divides_the_input():
    g = gen(7200)
    _, q, x = _linear(g)
    y0 = q(x / 2.0)
    q.set_smooth(torch.full((40,), 2.0))
    assert torch.equal(q(x), y0)
    q.set_smooth(None)
    assert q.smooth is None
    with pytest.raises(ValueError, match="smooth must have 40 values"):
        q.set_smooth(torch.ones(39))
    with pytest.raises(ValueError, match="smooth must be > 0"):
        q.set_smooth(torch.zeros(40))


def test_per_tensor_layer_unchanged():
    g = gen(7300)
    lin = nn.Linear(16, 5)
    x = make_data((3, 16), g)
    alpha, sw, bw = tensor_params(lin.weight.detach(), 4)
    q = ExpLinear.from_float(lin, 4, (alpha, sw, bw), tensor_params(x, 4, alpha))
    assert q.w_scale is None and q.w_offset is None and q.smooth is None
    assert not q.per_channel
    assert "per_channel" not in repr(q)


def test_bad_w_params():
    lin = nn.Linear(8, 3)
    a = (1.2, 0.1, 0.0)
    with pytest.raises(ValueError, match="3 values"):
        ExpLinear.from_float(lin, 4, (1.2, torch.ones(4), torch.zeros(4)), a)
    with pytest.raises(ValueError, match="scale must be > 0"):
        ExpLinear.from_float(lin, 4, (1.2, torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3)), a)
    with pytest.raises(ValueError, match="finite"):
        ExpLinear.from_float(lin, 4, (1.2, torch.ones(3), torch.tensor([0, float("nan"), 0])), a)


def test_double_keeps_buffers_float32():
    g = gen(7400)
    _, q, x = _linear(g, smooth=True)
    y = q(x)
    q.double()
    for name in ("bias", "w_scale", "w_offset", "smooth"):
        assert getattr(q, name).dtype == torch.float32, name
    y64 = q(x.double())
    assert y64.dtype == torch.float64
    assert torch.equal(y64.float(), y)
    # a per-tensor model too (issue 14: the bias became float64 and was rejected)
    model = nn.Sequential(nn.Linear(6, 4))
    xs = make_data((5, 6), g)
    qm = dnateq.quantize(model, [xs], bits=(4,), progress=False, calib_batches=1,
                         eval_batches=1).double()
    assert qm(xs.double()).dtype == torch.float64


def test_report_and_repr_say_per_channel():
    g = gen(7500)
    _, q, _ = _linear(g, smooth=True)
    model = nn.Sequential(q)
    r = dnateq.report(model)
    row = r.layers[0]
    assert row["w_params"] == "per-channel"
    assert row["S_w_min"] == pytest.approx(float(q.w_scale.min()))
    assert row["S_w_max"] == pytest.approx(float(q.w_scale.max()))
    assert row["smooth"] is True
    md = r.to_markdown()
    assert "per-channel" in md
    assert "per_channel=True" in repr(q) and "smooth=True" in repr(q)
    p = q.params()
    assert p["per_channel"] is True and p["smooth"] is True


def test_report_counts_the_parameter_bits():
    # 12 x 40 per-channel layer with a smoothing vector: 3 scalars (alpha, S_a,
    # beta_a) + 2 x 12 channel params + 40 smoothing factors, float32 each
    g = gen(7501)
    _, q, _ = _linear(g, smooth=True)
    t = dnateq.report(nn.Sequential(q)).totals
    extra = 32 * (3 + 2 * 12 + 40) / (12 * 40)
    assert t["storage_bits_with_params"] == pytest.approx(t["storage_bits"] + extra)
    # a per-tensor layer without smoothing: 5 scalars
    _, p, _ = _linear(g)
    p2 = ExpLinear(p.dequantized_weight(), None, 4, (p.alpha, p.sw, p.bw), (p.alpha, p.sa, p.ba))
    t2 = dnateq.report(nn.Sequential(p2)).totals
    assert t2["storage_bits_with_params"] == pytest.approx(t2["storage_bits"] + 32 * 5 / 480)
    assert "with the layers' float32 parameters" in dnateq.report(nn.Sequential(q)).to_markdown()
