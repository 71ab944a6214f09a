"""dnateq.baselines: uniform INT-b quantization of the same layers as dnateq.quantize."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq import baselines
from dnateq.nn import UniformConv2d, UniformLinear
from dnateq.nn.uniform import activation_params, weight_levels


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 10)).eval()


def images(n=3, seed=1):
    g = gen(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def uniform_layers(m):
    return {n: l for n, l in m.named_modules() if isinstance(l, (UniformLinear, UniformConv2d))}


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_weights_are_symmetric_per_tensor_integers():
    model = cnn()
    u = baselines.uniform_quantize(model, images(), bits=4, progress=False)
    for name, layer in uniform_layers(u).items():
        w = dict(model.named_modules())[name].weight.detach()
        q = weight_levels(4)   # 7
        assert layer.w_int.dtype == torch.int8
        assert int(layer.w_int.abs().max()) == q          # max |w| maps to the top level
        s = float(w.abs().max()) / q
        torch.testing.assert_close(layer.dequantized_weight(),
                                   torch.clamp(torch.round(w / s), -q, q) * s)


@pytest.mark.parametrize("bits", [2, 3, 5, 8, 12])
def test_activation_quantizer_levels_and_zero(bits):
    # post-ReLU range: unsigned, zero point 0, 2^b levels from 0 to max
    s, z, signed = activation_params(0.0, 3.0, bits)
    assert (z, signed) == (0, False) and s == pytest.approx(3.0 / (2 ** bits - 1))
    # signed range: asymmetric, zero exact
    s, z, signed = activation_params(-1.0, 3.0, bits)
    assert signed and 0 < z < 2 ** bits - 1
    layer = UniformLinear(torch.randn(4, 6), None, 8, bits, (-1.0, 3.0))
    x = torch.tensor([-1.0, 0.0, 3.0, 1.234, -5.0, 9.0])
    xq = layer.quantize_input(x)
    assert float(xq[1]) == 0.0                             # zero stays exact
    assert len(torch.unique(layer.quantize_input(torch.linspace(-2, 4, 5000)))) <= 2 ** bits
    assert float(xq[4]) == pytest.approx(-z * s)          # clamped below
    assert float(xq[5]) == pytest.approx((2 ** bits - 1 - z) * s)   # clamped above


def test_error_falls_with_bits_and_int8_is_close_to_float():
    model = cnn()
    data = images()
    x = data[0]
    with torch.no_grad():
        ref = model(x)
        errs = []
        for b in (3, 4, 6, 8):
            u = baselines.uniform_quantize(model, data, bits=b, progress=False)
            errs.append(float((u(x) - ref).abs().max()))
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1] * 4
    assert errs[-1] < 0.02 * float(ref.abs().max())


def test_same_layers_as_dnateq_and_bits_conventions():
    model = cnn()
    data = images()
    q = dnateq.quantize(model, data, progress=False, bits=(3, 4), max_loss=30.0)
    paper = baselines.bits_of(q, "paper")
    storage = baselines.bits_of(q, "storage")
    qlayers = {n: l for n, l in q.named_modules() if isinstance(l, (dnateq.nn.ExpLinear,
                                                                     dnateq.nn.ExpConv2d))}
    assert set(paper) == set(qlayers) == set(storage)
    for n, l in qlayers.items():
        assert paper[n] == l.bits
        assert storage[n] == (l.bits + int(l.w_signed), l.bits + int(l.a_signed))
    u = baselines.uniform_quantize(model, data, bits=storage, progress=False)
    ul = uniform_layers(u)
    assert set(ul) == set(qlayers)
    for n, l in ul.items():
        assert (l.w_bits, l.a_bits) == storage[n]
        assert l.a_signed == qlayers[n].a_signed        # the same trace decides signedness
    assert u.dnateq_baseline["bits"] == {n: tuple(v) for n, v in storage.items()}
    s = baselines.summary(u)
    nw = sum(l.weight_count for l in ul.values())
    assert s["avg_bits"] == pytest.approx(sum(storage[n][0] * l.weight_count
                                              for n, l in ul.items()) / nw)


def test_per_layer_dict_leaves_others_float_and_weight_only():
    model = cnn()
    u = baselines.uniform_quantize(model, images(), bits={"5": 6}, progress=False,
                                   activations=False)
    ul = uniform_layers(u)
    assert list(ul) == ["5"] and ul["5"].a_bits is None
    assert u.dnateq_baseline["skipped"] == {"0": "no bits given", "2": "no bits given"}
    assert isinstance(u[0], nn.Conv2d)
    x = torch.randn(2, 3, 8, 8)
    w = ul["5"].dequantized_weight()
    with torch.no_grad():
        ref = nn.functional.linear(model[:5](x), w, model[5].bias)
        torch.testing.assert_close(u(x), ref)


def test_transformer_attention_is_split_like_dnateq():
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True).eval()
    g = gen(3)
    data = [(torch.randn(2, 5, 16, generator=g), torch.randn(2, 4, 16, generator=g))
            for _ in range(2)]

    class Wrap(nn.Module):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, src):
            return self.t(src, src[:, :4])

    w = Wrap(model)
    u = baselines.uniform_quantize(w, data, bits=8, progress=False)
    # 3 attention modules x 4 projections + 2 x 2 feed-forward
    assert len(uniform_layers(u)) == 3 * 4 + 2 * 2
    with torch.no_grad():
        torch.testing.assert_close(u(data[0][0]), w(data[0][0]), atol=0.05, rtol=0.05)


def test_inplace_and_caller_model_untouched():
    model = cnn()
    snap = snapshot(model)
    baselines.uniform_quantize(model, images(), bits=4, progress=False)
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in snap.items())
    assert not uniform_layers(model)
    out = baselines.uniform_quantize(model, images(), bits=4, progress=False, inplace=True)
    assert out is model and len(uniform_layers(model)) == 3


@pytest.mark.parametrize("bits,exc,text", [
    (1, ValueError, "bits must be in [2, 16]"), (17, ValueError, "bits must be in [2, 16]"),
    (4.5, TypeError, "bits must be an int"), ("8", TypeError, "bits must be an int"),
    ((4, 1), ValueError, "a_bits"), ({}, ValueError, "empty dict"),
    ({"nope": 4}, ValueError, "not quantizable layers"),
])
def test_bad_bits(bits, exc, text):
    model = cnn()
    snap = snapshot(model)
    with pytest.raises(exc) as ei:
        baselines.uniform_quantize(model, images(), bits=bits, progress=False)
    assert text in str(ei.value)
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in snap.items())


def test_bad_inputs_name_the_problem():
    model = cnn()
    with pytest.raises(ValueError, match="loader yielded no batch"):
        baselines.uniform_quantize(model, [], bits=8, progress=False)
    with pytest.raises(RuntimeError, match="cannot take loader batch 0"):
        baselines.uniform_quantize(model, [torch.randn(2, 5)], bits=8, progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        baselines.uniform_quantize(model, [torch.full((2, 3, 8, 8), float("nan"))], bits=8,
                                   progress=False)
    with pytest.raises(ValueError, match="no quantizable layer"):
        baselines.uniform_quantize(nn.Sequential(nn.ReLU()), images(), bits=8, progress=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        baselines.uniform_quantize("resnet", images(), bits=8)
    with pytest.raises(ValueError, match="no dnateq quantized layer"):
        baselines.bits_of(cnn())
    with pytest.raises(ValueError, match="convention"):
        baselines.bits_of(cnn(), "fair")
    with pytest.raises(ValueError, match="no uniform quantized layer"):
        baselines.summary(cnn())


def test_deterministic():
    a = baselines.uniform_quantize(cnn(), images(), bits=5, progress=False)
    b = baselines.uniform_quantize(cnn(), images(), bits=5, progress=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
