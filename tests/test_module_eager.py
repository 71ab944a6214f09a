"""The eager "lut" forward of ExpLinear / ExpConv2d (issue 13, end to end).

In inference (no gradient to record, not under torch.compile) the modules call
the operator's ``.default`` overload positionally below the Autograd key, with
the arguments read from ``__dict__`` / ``_buffers``. These tests check that
this path computes exactly what the public wrapper computes with the same
arguments, for every module option (bias, per-channel weights, smoothing,
padding="same", strides, groups, input dtypes), that it stays out of the way
when a gradient is needed, and that it follows weight changes."""
import pytest
import torch
import torch.nn as nn

from dnateq import ops
from dnateq.nn.modules import ExpConv2d, ExpLinear, _eager_lut_ok


def _linear(bias=True, per_channel=False, smooth=False, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(48, 20, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 48, generator=g) * 0.2)
    w_params = None
    if per_channel:
        alpha, _, _, _ = ops.exp_fit(lin.weight.detach(), bits, "golden", "nearest")
        amax = lin.weight.detach().abs().amax(1)
        w_params = (alpha, amax / alpha ** (2 ** (bits - 1)), torch.zeros(20))
    m = ExpLinear.from_float(lin, bits, w_params=w_params, a_params=(0.02, 0.0))
    if smooth:
        m.set_smooth(torch.rand(48, generator=g) + 0.5)
    return m


def _conv(bias=True, per_channel=False, smooth=False, stride=1, padding=1, groups=1,
          kernel=3, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(8, 12, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    w_params = None
    if per_channel:
        w = conv.weight.detach()
        alpha, _, _, _ = ops.exp_fit(w, bits, "golden", "nearest")
        amax = w.abs().flatten(1).amax(1)
        w_params = (alpha, amax / alpha ** (2 ** (bits - 1)), torch.zeros(12))
    m = ExpConv2d.from_float(conv, bits, w_params=w_params, a_params=(0.02, 0.0))
    if smooth:
        m.set_smooth(torch.rand(8, generator=g) + 0.5)
    return m


def _public(m, x):
    """The module's "lut" forward through the public wrapper (what forward did
    before the eager path), smoothing and padding applied as the module does."""
    if m.smooth is not None:
        shape = [1] * x.dim()
        shape[-1 if isinstance(m, ExpLinear) else 1] = -1
        x = x.float() / m.smooth.reshape(shape)
    kw = dict(w_scale=m.w_scale, w_offset=m.w_offset, w_layout=m.w_layout)
    args = (m.w_packed, m.w_shape, m.alpha, m.sa, m.ba, m.sw, m.bw, m.bits, m.a_signed,
            m.w_signed, m.rounding, m.bias)
    if isinstance(m, ExpLinear):
        return ops.exp_linear_lut(x, *args, **kw)
    x, pad = m._geometry(x)
    return ops.exp_conv2d_lut(x, *args, m.stride, pad, m.dilation, m.groups, **kw)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 5)])
def test_linear_eager_equals_public_path(bias, per_channel, smooth, rows):
    m = _linear(bias, per_channel, smooth)
    x = torch.randn(*rows, 48, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        assert _eager_lut_ok(x, m._buffers)
        got = m(x)
        want = _public(m, x)
    assert got.dtype == torch.float32 and got.shape == (*rows, 20)
    assert torch.equal(got, want)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("geom", [dict(stride=1, padding=1), dict(stride=2, padding=1),
                                  dict(stride=1, padding=0, kernel=1),
                                  dict(stride=1, padding="same", kernel=4),
                                  dict(stride=1, padding="valid"),
                                  dict(stride=1, padding=1, groups=2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_eager_equals_public_path(per_channel, smooth, geom, batch):
    m = _conv(True, per_channel, smooth, **geom)
    x = torch.randn(batch, 8, 11, 9, generator=torch.Generator().manual_seed(2)) * 0.1
    with torch.no_grad():
        got = m(x)
        want = _public(m, x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_eager_keeps_input_dtype(dtype):
    m = _conv()
    x = (torch.randn(1, 8, 6, 6) * 0.1).to(dtype)
    with torch.no_grad():
        got = m(x)
    assert got.dtype == dtype
    want = _public(m, x if dtype != torch.float64 else x.float()).to(dtype)
    assert torch.equal(got, want)
    # float64 is not a dtype the op takes: the general path converts it
    assert _eager_lut_ok(x, m._buffers) == (dtype != torch.float64)


def test_eager_path_off_when_a_gradient_is_needed():
    m = _linear()
    x = (torch.randn(2, 48) * 0.1).requires_grad_()
    assert not _eager_lut_ok(x, m._buffers)
    y = m(x)
    assert y.requires_grad and y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert torch.equal(m(x.detach()), y.detach())
    # a bias that requires a gradient keeps the general path as well
    m.bias.requires_grad_()
    assert not _eager_lut_ok(x.detach(), m._buffers)
    with torch.no_grad():   # ... unless no gradient is recorded at all
        assert _eager_lut_ok(x.detach(), m._buffers)


def test_eager_path_only_in_lut_mode():
    m = _linear()
    x = torch.randn(2, 48) * 0.1
    with torch.no_grad():
        lut = m(x)
        m.mode = "count"
        count = m(x)
        m.mode = "fake"
        ref = m(x)
    # the modes are different kernels of one result (SPEC: exact dot product)
    torch.testing.assert_close(lut, count, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lut, ref, rtol=1e-4, atol=1e-5)


def test_eager_path_follows_new_weights():
    """load_state_dict copies into w_packed in place: the layout is rebuilt and
    the eager path computes with the new weights."""
    m, other = _conv(seed=0), _conv(seed=5)
    x = torch.randn(1, 8, 7, 7) * 0.1
    with torch.no_grad():
        before = m(x)
        m.load_state_dict(other.state_dict())
        after = m(x)
        assert torch.equal(after, other(x))
    assert not torch.equal(before, after)


def test_eager_path_bad_input():
    m, c = _linear(), _conv()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"ExpLinear expects input \[\*, 48\]"):
            m(torch.randn(2, 47))
        with pytest.raises(ValueError, match=r"ExpLinear expects input"):
            m(torch.tensor(1.0))
        with pytest.raises(ValueError, match=r"ExpConv2d expects input \[N, 8, H, W\]"):
            c(torch.randn(8, 6, 6))
        with pytest.raises(TypeError, match="floating-point"):
            m(torch.ones(2, 48, dtype=torch.int32))
        with pytest.raises(RuntimeError, match="non-finite"):
            m(torch.full((1, 48), float("nan")))
