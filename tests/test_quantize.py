"""dnateq.quantize: calibration of whole models (SPEC section 3)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq.calibrate import _Trace, batch_input, exponential_rss
from dnateq.nn import ExpConv2d, ExpLinear, ExpMultiheadAttention
from conftest import gen

KW = dict(progress=False, calib_batches=2, sample_size=4096, method="paper")   # the paper's rule (SPEC 3)
# The proxy on 2 held-out batches of 16 vectors has a 3-point resolution.
KWM = dict(KW, max_loss=10.0)


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 5)).eval()


def images(n_batches=4, b=8, seed=1):
    g = gen(seed)
    return [torch.randn(b, 3, 10, 10, generator=g) for _ in range(n_batches)]


def vectors(n_batches=4, b=16, seed=2):
    g = gen(seed)
    return [torch.randn(b, 20, generator=g) for _ in range(n_batches)]


def snapshot(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    return sd, types


def assert_unchanged(model, snap):
    sd, types = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    for k in sd:
        assert torch.equal(now[k], sd[k]), k
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert not hasattr(model, "dnateq_info")


def qlayers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (ExpLinear, ExpConv2d))}


# ---------------------------------------------------------------------------


def test_small_cnn_proxy():
    model = small_cnn()
    snap = snapshot(model)
    data = images()
    q = dnateq.quantize(model, data, **KW)
    assert q is not model
    assert_unchanged(model, snap)
    ql = qlayers(q)
    assert set(ql) == {"0", "2", "5", "9"}
    assert all(m.mode == "lut" for m in ql.values())
    assert all(m.bits in (3, 4, 5, 6, 7) for m in ql.values())
    # unsigned detection: the first layer sees signed images, the rest post-ReLU
    assert ql["0"].a_signed and not ql["2"].a_signed and not ql["5"].a_signed
    assert not ql["9"].a_signed
    info = q.dnateq_info
    assert info["metric"] == "proxy" and info["order"] == ["0", "2", "5", "9"]
    assert info["first_layer"] == "0"
    assert info["loss"] <= 1.0 and not info["fallback"]
    # each table row was computed once and bit choices are table look-ups
    for n, t in info["tables"].items():
        assert set(t["rows"]) == {3, 4, 5, 6, 7}
        assert t["start"] in ("W", "A")
    # the first-layer rule and the threshold rule, checked against the table
    thr = info["threshold"]
    for n, m in ql.items():
        rows = info["tables"][n]["rows"]
        tw = thr / 10 if n == "0" else thr
        ok = [b for b in (3, 4, 5, 6, 7) if rows[b]["rmae_w"] <= tw and rows[b]["rmae_a"] <= tw]
        assert m.bits == (ok[0] if ok else 7), n
    # the output stays close to float's
    x = data[0]
    with torch.no_grad():
        y, yq = model(x), q(x)
    assert torch.nn.functional.cosine_similarity(y.flatten(), yq.flatten(), dim=0) > 0.9


def test_linear_only_mlp_with_eval_fn():
    model = mlp()
    data = vectors()
    x_eval = torch.randn(64, 20, generator=gen(3))
    with torch.no_grad():
        ref = model(x_eval).argmax(1)

    def agreement(m):
        with torch.no_grad():
            return 100.0 * float((m(x_eval).argmax(1) == ref).float().mean())

    q = dnateq.quantize(model, data, eval_fn=agreement, max_loss=5.0, **KW)
    assert len(qlayers(q)) == 3
    assert q.dnateq_info["metric"] == "eval_fn"
    assert agreement(q) >= 95.0 - 1e-9
    # the history is monotone in thresholds and keeps the last passing config
    hist = q.dnateq_info["history"]
    assert [h["threshold"] for h in hist] == sorted(h["threshold"] for h in hist)
    passing = [h for h in hist if h["passed"]]
    assert passing[-1]["bits"] == {n: m.bits for n, m in qlayers(q).items()}


@pytest.mark.parametrize("fmt", ["tensor", "tuple", "list", "dict_input", "dict_forward",
                                 "dict_pixel_values"])
def test_loader_formats(fmt):
    data = vectors()
    labels = [torch.zeros(d.shape[0], dtype=torch.long) for d in data]
    kw = {}
    if fmt == "tensor":
        loader = data
    elif fmt == "tuple":
        loader = [(d, y) for d, y in zip(data, labels)]
    elif fmt == "list":
        loader = [[d, y] for d, y in zip(data, labels)]
    elif fmt == "dict_input":
        # a dict batch is passed as keyword arguments: nn.Sequential's is `input`
        loader = [{"input": d} for d in data]
    elif fmt == "dict_pixel_values":
        loader = [{"labels": y, "pixel_values": d} for d, y in zip(data, labels)]
        kw = dict(forward=lambda model, batch: model(batch["pixel_values"]))
    else:
        loader = [{"features": d, "labels": y} for d, y in zip(data, labels)]
        kw = dict(forward=lambda model, batch: model(batch["features"]))
    base = dnateq.quantize(mlp(), data, **KWM)
    q = dnateq.quantize(mlp(), loader, **KWM, **kw)
    x = data[0]
    assert torch.equal(q(x), base(x))
    # a torch DataLoader works too
    if fmt == "tuple":
        ds = torch.utils.data.TensorDataset(torch.cat(data), torch.cat(labels))
        dl = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
        q2 = dnateq.quantize(mlp(), dl, **KWM)
        assert torch.equal(q2(x), base(x))


def test_batch_input_rules():
    t = torch.ones(2)
    assert batch_input(t) is t
    assert batch_input((t, 1)) is t
    assert batch_input({"y": 3, "x": t}) is t
    assert batch_input({"y": 3, "z": t}) is t
    with pytest.raises(ValueError, match="no tensor"):
        batch_input({"y": 3})
    with pytest.raises(TypeError, match="loader batches"):
        batch_input(3)


def test_deterministic_for_fixed_seed():
    data = images()
    q1 = dnateq.quantize(small_cnn(), data, seed=5, **KW)
    q2 = dnateq.quantize(small_cnn(), data, seed=5, **KW)
    s1, s2 = q1.state_dict(), q2.state_dict()
    assert set(s1) == set(s2)
    for k in s1:
        if isinstance(s1[k], torch.Tensor):
            assert torch.equal(s1[k], s2[k]), k
        else:
            assert s1[k] == s2[k], k
    assert q1.dnateq_info["history"] == q2.dnateq_info["history"]


def test_inplace():
    model = mlp()
    data = vectors()
    q = dnateq.quantize(model, data, inplace=True, **KWM)
    assert q is model
    assert len(qlayers(model)) == 3
    assert hasattr(model, "dnateq_info")


def test_options_and_skip():
    model = small_cnn()
    data = images()
    q = dnateq.quantize(model, data, skip=["9"], search="paper", rounding="log",
                        act_threshold_scale="auto", rss_normalize=True, threshold_step=0.05,
                        max_threshold=0.2, bits=(3, 5, 7), mode="count", **KW)
    ql = qlayers(q)
    assert set(ql) == {"0", "2", "5"}
    assert isinstance(q[9], nn.Linear)
    assert q.dnateq_info["skipped"] == {"9": "skipped by option"}
    assert all(m.mode == "count" and m.rounding == "log" for m in ql.values())
    assert all(m.bits in (3, 5, 7) for m in ql.values())
    assert all(h["threshold"] <= 0.2 + 1e-12 for h in q.dnateq_info["history"])
    q2 = dnateq.quantize(model, data, layers=["5", "9"], **KW)
    assert set(qlayers(q2)) == {"5", "9"}
    assert q2.dnateq_info["first_layer"] == "5"
    # count mode output agrees with lut mode output
    for m in ql.values():
        m.mode = "lut"
    y_lut = q(data[0])
    for m in ql.values():
        m.mode = "count"
    torch.testing.assert_close(q(data[0]), y_lut, rtol=1e-4, atol=1e-4)


def test_padding_mode_conv_left_in_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(400, 3)).eval()
    q = dnateq.quantize(model, images(), **KW)
    assert type(q[0]) is nn.Conv2d
    assert "padding_mode" in q.dnateq_info["skipped"]["0"]
    assert set(qlayers(q)) == {"2", "4"}
    rep = dnateq.report(q)
    assert "0" in rep.skipped and "padding_mode" in rep.to_markdown()


def test_fallback_all_max_bits_with_warning():
    model = mlp()

    def strict(m):   # every quantized model loses 100 points
        return 0.0 if any(isinstance(x, ExpLinear) for x in m.modules()) else 100.0

    with pytest.warns(RuntimeWarning, match="all-7-bit"):
        q = dnateq.quantize(model, vectors(), eval_fn=strict, **KW)
    assert all(m.bits == 7 for m in qlayers(q).values())
    assert q.dnateq_info["fallback"]
    assert any("fallback" in n for n in dnateq.report(q).notes)


def test_transformer_qkv_split():
    torch.manual_seed(0)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1,
                                    num_decoder_layers=1, dim_feedforward=32, dropout=0.0,
                                    batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.t(x, x))

    model = Wrap().eval()
    snap = snapshot(model)
    g = gen(4)
    data = [torch.randn(2, 5, 16, generator=g) for _ in range(3)]
    with torch.no_grad():
        ref = model(data[0])
    q = dnateq.quantize(model, data, **KW)
    assert_unchanged(model, snap)
    # encoder: 4 (q,k,v,out) + 2 FFN; decoder: 4 + 4 + 2 FFN; head 1
    assert len(qlayers(q)) == 17
    mhas = [m for m in q.modules() if isinstance(m, ExpMultiheadAttention)]
    assert len(mhas) == 3
    assert not any(isinstance(m, nn.MultiheadAttention) for m in q.modules())
    assert all(isinstance(m.q_proj, ExpLinear) for m in mhas)
    with torch.no_grad():
        out = q(data[0])
    assert out.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.8
    # skipping one attention keeps it whole and in float; prefixes skip subtrees
    q2 = dnateq.quantize(model, data, skip=["t.decoder.layers.0.multihead_attn", "t.encoder"],
                         **KW)
    assert isinstance(q2.t.decoder.layers[0].multihead_attn, nn.MultiheadAttention)
    assert len(qlayers(q2)) == 17 - 6 - 4
    assert not any(n.startswith("t.encoder") for n in qlayers(q2))
    with torch.no_grad():
        assert q2(data[0]).shape == ref.shape


# -- bad inputs leave the model unchanged ------------------------------------

def test_no_quantizable_layer():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no quantizable layer"):
        dnateq.quantize(model, [torch.randn(2, 3)], **KW)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("inplace", [False, True])
def test_empty_loader(inplace):
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no batch"):
        dnateq.quantize(model, [], inplace=inplace, **KW)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("inplace", [False, True])
def test_nan_activations(inplace):
    model = mlp()
    snap = snapshot(model)
    data = vectors()
    data[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        dnateq.quantize(model, data, inplace=inplace, **KW)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("inplace", [False, True])
def test_batch_the_model_cannot_take(inplace):
    model = small_cnn()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="cannot take loader batch 0"):
        dnateq.quantize(model, [torch.randn(4, 5, 10, 10)], inplace=inplace, **KW)
    assert_unchanged(model, snap)
    with pytest.raises(TypeError, match="loader batches"):
        dnateq.quantize(model, ["not a tensor"], inplace=inplace, **KW)
    assert_unchanged(model, snap)


def test_bad_options():
    model = mlp()
    data = vectors()
    for kw, match in [(dict(bits=(3, 9)), "bits"), (dict(search="grid"), "search"),
                      (dict(rounding="up"), "rounding"), (dict(mode="fast"), "mode"),
                      (dict(act_threshold_scale="x"), "act_threshold_scale"),
                      (dict(threshold_step=0.0), "threshold_step"),
                      (dict(eval_fn=3), "eval_fn")]:
        with pytest.raises((ValueError, TypeError), match=match):
            dnateq.quantize(model, data, **kw, **KW)
    with pytest.raises(TypeError, match="nn.Module"):
        dnateq.quantize(lambda x: x, data)


# -- pieces ----------------------------------------------------------------

def test_trace_memory_is_bounded_and_uniform():
    g = torch.Generator()
    g.manual_seed(0)
    t = _Trace(500, g)
    for i in range(40):
        x = torch.arange(i * 1000, (i + 1) * 1000, dtype=torch.float32) + 1
        t.add(x, "layer")
        assert t.vals.numel() <= 500 and t.keys.numel() <= 500
    assert t.vals.numel() == 500
    assert t.hi_val == 40000.0 and t.lo_val == 1.0
    # roughly uniform over all batches
    assert abs(float(t.vals.mean()) - 20000.5) < 3 * 11547 / 500 ** 0.5
    s = t.sample()
    assert s.numel() == 502 and float(s.max()) == 40000.0 and float(s.min()) == 1.0
    assert not t.negative
    t.add(torch.tensor([-1.0]), "layer")
    assert t.negative


def test_exponential_rss():
    g = gen(11)
    e = -torch.log(torch.rand(20000, generator=g))
    u = torch.rand(20000, generator=g)
    assert exponential_rss(e) < exponential_rss(u)
    # raw RSS scales with the magnitude, the normalized one does not
    assert exponential_rss(e * 0.01) > 10 * exponential_rss(e)
    assert exponential_rss(e * 0.01, normalize=True) == pytest.approx(
        exponential_rss(e, normalize=True), rel=1e-6)
    assert exponential_rss(torch.zeros(10)) == float("inf")
    assert exponential_rss(torch.full((10,), 2.0)) == float("inf")


def test_progress_false_is_silent(capsys):
    dnateq.quantize(mlp(), vectors(), **KWM)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# -- the real network --------------------------------------------------------

def _shared_data() -> Path:
    env = os.environ.get("DNATEQ_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.real
@pytest.mark.slow
def test_resnet20_cifar10_real():
    d = _shared_data()
    need = ["resnet20_cifar10.th", "cifar10_test_761.npz", "cifar10_train_761.npz"]
    if not all((d / f).exists() for f in need):
        pytest.skip(f"real data not found in {d} (set DNATEQ_SHARED_DATA)")
    import numpy as np
    from dnateq.models.cifar_resnet import load_cifar_resnet, normalize_images

    model = load_cifar_resnet(str(d / "resnet20_cifar10.th"))
    te = np.load(d / "cifar10_test_761.npz")
    tr = np.load(d / "cifar10_train_761.npz")
    xt = normalize_images(torch.from_numpy(te["images"]))
    yt = torch.from_numpy(te["labels"])
    xc = normalize_images(torch.from_numpy(tr["images"]))

    def accuracy(m):
        with torch.no_grad():
            return 100.0 * float((m(xt).argmax(1) == yt).float().mean())

    float_acc = accuracy(model)
    assert float_acc == pytest.approx(91.72, abs=0.05)
    snap = snapshot(model)
    loader = [(xc[i:i + 192], None) for i in range(0, xc.shape[0], 192)]
    q = dnateq.quantize(model, loader, eval_fn=accuracy, progress=False, calib_batches=2,
                        sample_size=1 << 16)
    assert_unchanged(model, snap)
    rep = dnateq.report(q).to_dict()
    q_acc = accuracy(q)
    bits = {r["name"]: r["n"] for r in rep["layers"]}
    print(f"\nResNet-20: float {float_acc:.2f} %, DNA-TEQ {q_acc:.2f} %, avg bits "
          f"{rep['totals']['avg_bits']:.3f}, storage bits {rep['totals']['storage_bits']:.3f}, "
          f"threshold {q.dnateq_info['threshold']}, bits {bits}")
    assert len(rep["layers"]) == 20
    assert q_acc >= float_acc - 1.0
    assert rep["totals"]["avg_bits"] <= 5.0
    assert bits["conv1"] >= min(bits.values())    # first-layer rule: Thr_w / 10
    # Uniform INT-b with the same per-layer bits loses more (paper Table III), in the
    # paper's convention (n bits) and the storage-fair one (n + 1 for signed tensors).
    from dnateq import baselines
    for conv in ("paper", "storage"):
        u = baselines.uniform_quantize(model, loader, bits=baselines.bits_of(q, conv),
                                       calib_batches=2, progress=False)
        u_acc = accuracy(u)
        print(f"uniform ({conv} bits): {u_acc:.2f} %")
        assert u_acc < q_acc
    # The three execution modes agree on every layer of the real network, each
    # layer fed the input it sees in the quantized model. (Not end to end: fp32
    # summation order differs between the kernels by ~1e-7, which moves an
    # activation across a quantization threshold now and then, and the next
    # layers amplify each such flip; at 7 bits, alpha ~1.009, the logits of
    # the modes then differ by a few percent. A network of quantizers is a
    # discontinuous function, so only the per-layer agreement is exact.)
    x = xt[:4]
    layers = qlayers(q)
    inputs = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach().clone()))
        for n, m in layers.items()]
    with torch.no_grad():
        q(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for n, m in layers.items():
            outs = {}
            for mode in ("count", "lut", "fake"):
                m.mode = mode
                outs[mode] = m(inputs[n])
            m.mode = "lut"
            scale = float(outs["count"].abs().max())
            for mode in ("lut", "fake"):
                torch.testing.assert_close(outs[mode], outs["count"], rtol=1e-4,
                                           atol=1e-5 * scale, msg=lambda s, n=n, mode=mode:
                                           f"{n} {mode} vs count: {s}")


def test_early_stop_when_all_layers_at_lowest_bits():
    q = dnateq.quantize(mlp(), vectors(), eval_fn=lambda m: 1.0, max_threshold=1.0,
                        first_layer_divisor=1.0, **KW)
    hist = q.dnateq_info["history"]
    assert all(m.bits == 3 for m in qlayers(q).values())
    assert hist[-1]["bits"] == {n: 3 for n in hist[-1]["bits"]}
    assert len(hist) < 100   # stopped before max_threshold
    # configurations that repeat are not evaluated again
    for a, b in zip(hist, hist[1:]):
        if a["bits"] == b["bits"]:
            assert not b["evaluated"]


def test_thresholds_scale_bits():
    data = vectors()
    loose = dnateq.quantize(mlp(), data, eval_fn=lambda m: 1.0, max_threshold=0.05,
                            act_threshold_scale=100.0, **KW)
    tight = dnateq.quantize(mlp(), data, eval_fn=lambda m: 1.0, max_threshold=0.05,
                            act_threshold_scale=0.01, **KW)
    lb = {n: m.bits for n, m in qlayers(loose).items()}
    tb = {n: m.bits for n, m in qlayers(tight).items()}
    assert all(lb[n] <= tb[n] for n in lb)
    assert sum(tb.values()) > sum(lb.values())


def test_progress_bars(capsys):
    dnateq.quantize(mlp(), vectors(), **dict(KWM, progress=True))
    err = capsys.readouterr().err
    assert "dnateq: tracing" in err and "dnateq: fitting" in err and "thresholds" in err


def test_encoder_fast_path_never_bypasses_quantized_layers():
    """Eval-mode TransformerEncoder with a float (skipped) attention but quantized
    feed-forward layers: PyTorch's fused fast path must not be taken."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    g = gen(6)
    data = [torch.randn(2, 5, 16, generator=g) for _ in range(3)]
    q = dnateq.quantize(model, data, skip=["*self_attn*"], **KW)
    assert len(qlayers(q)) == 4
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, -1] = True
    with torch.no_grad():
        out = q(data[0], src_key_padding_mask=mask)
        # the same through the "fake" oracle: equal up to float rounding
        for m in qlayers(q).values():
            m.mode = "fake"
        ref = q(data[0], src_key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_one_shot_generator_loader():
    data = vectors(n_batches=2)
    q = dnateq.quantize(mlp(), (d for d in data), **dict(KWM, calib_batches=5))
    assert len(qlayers(q)) == 3
    # the proxy reused the calibration batches (none were left over)
    assert q.dnateq_info["metric"] == "proxy"


def test_model_error_of_any_type_is_reported():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            assert x.shape[0] == 3, "batch of 3 only"
            return self.fc(x)

    model = Picky()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="cannot take loader batch 0.*batch of 3 only"):
        dnateq.quantize(model, [torch.randn(2, 4)], **KW)
    assert_unchanged(model, snap)
