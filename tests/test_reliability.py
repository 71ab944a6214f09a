"""Small defects of issue 14 item 6, one test each: empty layers, weight_terms on
0-d codes, conv geometry that overflows, ``layer.mode`` set after construction."""
import warnings

import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq import reference as ref
from dnateq.nn import ExpConv2d, ExpLinear

from conftest import gen, make_data, random_codes

BITS = 4
P = (1.3, 0.1, 0.01, 0.2, -0.01)


def _linear(k, n, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # nn.Linear's init warns on empty weights
        return nn.Linear(k, n, **kw)


@pytest.mark.parametrize("k,n", [(0, 5), (5, 0), (0, 0)])
@pytest.mark.parametrize("mode", ["lut", "count", "fake"])
def test_empty_linear_layers_give_the_empty_result(k, n, mode):
    """K = 0: the output is the bias; N = 0: an empty [*, 0] output."""
    torch.manual_seed(0)
    lin = _linear(k, n)
    q = ExpLinear.from_float(lin, BITS, a_params=(0.1, 0.0), mode=mode)
    x = torch.randn(2, 3, k)
    y = q(x)
    assert y.shape == (2, 3, n)
    torch.testing.assert_close(y, lin.bias.detach().expand(2, 3, n))


@pytest.mark.parametrize("k,n", [(0, 5), (5, 0)])
def test_empty_linear_ops_match_the_reference(k, n):
    g = gen(1)
    w = torch.zeros(n, k, dtype=torch.int8)
    wp = dnateq.exp_pack(w, BITS, True)
    bias = torch.randn(n, generator=g)
    for dtype in (torch.float32, torch.float16):
        x = make_data((3, k), g).to(dtype)
        y = dnateq.exp_linear_lut(x, wp, [n, k], *P, BITS, True, True, "nearest", bias)
        r = ref.exp_linear_lut(x, wp, [n, k], *P, BITS, True, True, "nearest", bias)
        assert y.dtype == dtype and y.shape == (3, n)
        torch.testing.assert_close(y, r)
    a = torch.zeros(3, k, dtype=torch.int8)
    y = dnateq.exp_linear_count(a, w, *P, BITS, bias, None, dnateq.weight_terms(w, BITS))
    torch.testing.assert_close(y, ref.exp_linear_count(a, w, *P, BITS, bias))


@pytest.mark.parametrize("o,c", [(0, 2), (2, 0)])
@pytest.mark.parametrize("mode", ["lut", "count", "fake"])
def test_empty_conv_layers(o, c, mode):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = nn.Conv2d(c, o, 3)
    q = ExpConv2d.from_float(conv, BITS, a_params=(0.1, 0.0), mode=mode)
    y = q(torch.randn(1, c, 5, 5))
    assert y.shape == (1, o, 3, 3)
    torch.testing.assert_close(y, conv.bias.detach().view(1, o, 1, 1).expand(1, o, 3, 3))


def test_weight_terms_of_0d_and_empty_codes():
    c = torch.tensor(-3, dtype=torch.int8)         # sign bit set? -3 = 0xFD: bits above n
    with pytest.raises(ValueError, match="bits above bit"):
        dnateq.weight_terms(c, BITS)
    c = torch.tensor(5, dtype=torch.int8)           # one positive weight, biased exponent 5
    t = dnateq.weight_terms(c, BITS)
    assert t.shape == (1, 16) and t[0, 5] == 1 and int(t.abs().sum()) == 1
    assert torch.equal(t, dnateq.weight_terms(c.reshape(1, 1), BITS))
    assert dnateq.weight_terms(torch.zeros(0, 7, dtype=torch.int8), BITS).shape == (0, 16)
    assert dnateq.weight_terms(torch.zeros(3, 0, dtype=torch.int8), BITS).abs().sum() == 0


BIG = 2 ** 63 - 1


@pytest.mark.parametrize("stride,padding,dilation", [
    (1, 0, BIG), (1, 0, 2 ** 62), (1, BIG, 1), (1, 2 ** 62, 1), (1, [0, BIG], [1, 1]),
    (1, 0, [1, BIG])])
def test_conv_geometry_that_overflows_is_rejected(stride, padding, dilation):
    g = gen(2)
    w4 = random_codes((2, 2, 3, 3), BITS, g)
    a = random_codes((1, 2, 5, 5), BITS, g)
    x = make_data((1, 2, 5, 5), g)
    msg = r"overflows int64|too small for kernel"
    with pytest.raises(RuntimeError, match=msg):
        dnateq.exp_conv2d_count(a, w4, *P, BITS, None, stride, padding, dilation)
    with pytest.raises(RuntimeError, match=msg):
        dnateq.exp_conv2d_lut(x, dnateq.exp_pack(w4, BITS, True), [2, 2, 3, 3], *P, BITS,
                              True, True, "nearest", None, stride, padding, dilation)


def test_conv_output_size_follows_floor_division():
    """(H + 2p - d(k-1) - 1) / s + 1 with floor: H=2, k=3, s=2 has no output
    (C++ truncation toward zero used to give one)."""
    g = gen(3)
    w4 = random_codes((2, 2, 3, 3), BITS, g)
    a = random_codes((1, 2, 2, 2), BITS, g)
    with pytest.raises(RuntimeError, match="too small for kernel"):
        dnateq.exp_conv2d_count(a, w4, *P, BITS, None, 2, 0, 1)
    with pytest.raises((RuntimeError, ValueError)):
        torch.nn.functional.conv2d(torch.zeros(1, 2, 2, 2), torch.zeros(2, 2, 3, 3), stride=2)


def test_mode_set_after_construction_is_checked():
    q = ExpLinear.from_float(_linear(3, 2), BITS, a_params=(0.1, 0.0))
    with pytest.raises(ValueError, match="mode must be one of"):
        q.mode = "bogus"
    assert q.mode == "lut"
    q.mode = "count"
    assert q.mode == "count" and "mode='count'" in repr(q)
    assert q.get_extra_state()["mode"] == "count"
    c = ExpConv2d.from_float(nn.Conv2d(2, 2, 3), BITS, a_params=(0.1, 0.0))
    with pytest.raises(ValueError, match="mode must be one of"):
        c.mode = "LUT"
