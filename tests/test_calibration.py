"""dnateq.calibration: the package of calibration steps (select, trace, fit,
allocate, config, pipeline) and its extension points."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq import calibration as C
from dnateq.calibration.fit import exponential_rss
from conftest import gen


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 5)).eval()


def vectors(n_batches=4, b=16, seed=2):
    g = gen(seed)
    return [torch.randn(b, 20, generator=g) for _ in range(n_batches)]


KW = dict(progress=False, calib_batches=2, sample_size=4096, max_loss=10.0)


def _fit_layer_with_exp_fit(w, a, bits, search, rounding):
    """The per-layer table as calibration computed it before exp_fits: one
    exp_fit per tensor and n (each sorting again)."""
    start = "A" if exponential_rss(a) < exponential_rss(w) else "W"
    rows = {}
    for b in bits:
        if start == "W":
            alpha, sw, bw, rw = dnateq.exp_fit(w, b, search, rounding)
            _, sa, ba, ra = dnateq.exp_fit(a, b, search, rounding, alpha)
        else:
            alpha, sa, ba, ra = dnateq.exp_fit(a, b, search, rounding)
            _, sw, bw, rw = dnateq.exp_fit(w, b, search, rounding, alpha)
        rows[b] = dict(alpha=alpha, sw=sw, bw=bw, sa=sa, ba=ba, rmae_w=rw, rmae_a=ra)
    return start, rows


@pytest.mark.parametrize("search,rounding", [("golden", "nearest"), ("paper", "log")])
def test_fit_layer_identical_to_one_exp_fit_per_n(search, rounding):
    g = gen(5)
    bits = (3, 4, 5, 6, 7)
    for w, a in [(torch.randn(16, 24, generator=g), torch.relu(torch.randn(3000, generator=g))),
                 (torch.randn(8, 8, generator=g) * 3, torch.randn(500, generator=g) * 0.1),
                 (torch.zeros(4, 4), torch.randn(100, generator=g))]:
        t = C.fit_layer(w, a, bits, search=search, rounding=rounding)
        start, rows = _fit_layer_with_exp_fit(w, a, bits, search, rounding)
        assert t["start"] == start
        assert t["rows"] == rows


def test_config_validates_like_quantize():
    assert C.QuantizeConfig(bits=[5, 3, 3]).validated().bits == (3, 5)
    assert C.QuantizeConfig(act_threshold_scale="2").validated().act_threshold_scale == 2.0
    for bad in [dict(bits=[8]), dict(search="x"), dict(mode="x"), dict(threshold_step=0),
                dict(calib_batches=0), dict(sample_size=4), dict(method="nope"),
                dict(passes=["nope"]), dict(act_threshold_scale=-1)]:
        with pytest.raises(ValueError, match="dnateq.quantize"):
            C.QuantizeConfig(**bad).validated()
    with pytest.raises(TypeError, match="eval_fn"):
        C.QuantizeConfig(eval_fn=3).validated()
    # quantize's keyword API is the config's fields
    import inspect
    params = set(inspect.signature(dnateq.quantize).parameters) - {"model", "loader"}
    assert params == set(C.QuantizeConfig.option_names())


def test_compat_module_reexports():
    import dnateq.calibrate as old
    for name in ["quantize", "exponential_rss", "batch_input", "INPUT_KEYS", "select_layers",
                 "trace_layers", "Traces", "deliver", "choose_bits", "proxy_quality", "_Trace"]:
        assert hasattr(old, name), name
    assert old.quantize is dnateq.quantize is C.quantize
    from dnateq.eval import distributed as D
    assert D.merge_traces({}) is None   # single process: a no-op, now in calibration.trace


def test_strategy_plugs_in_and_reuses_the_search():
    """A strategy registered by name runs on the one LayerSearch; each distinct
    configuration is evaluated once."""
    seen = []

    def all_at(search, config):
        cfgs = [{n: b for n in search.names} for b in reversed(search.bits)]
        best = None
        for cfg in cfgs + cfgs:     # the repeats are not evaluated again
            q, evaluated = search.measure(cfg)
            seen.append(evaluated)
            if search.base - q <= config.max_loss:
                best = (cfg, q)
        search.apply(best[0])
        return C.Allocation(best[0], best[1], record=dict(strategy="uniform-n"))

    C.register_strategy("test-all-at", all_at)
    try:
        q = dnateq.quantize(mlp(), vectors(), method="test-all-at", bits=(4, 6), **KW)
    finally:
        del C.STRATEGIES["test-all-at"]
    assert seen == [True, True, False, False]
    assert q.dnateq_info["strategy"] == "uniform-n"
    assert len({m.bits for m in q.modules() if isinstance(m, dnateq.nn.ExpLinear)}) == 1


def test_passes_run_at_their_stages():
    calls = []

    def before(state):
        assert isinstance(state, C.Calibration) and not state.tables and state.names
        calls.append(("before_fit", tuple(state.names)))

    def after(state, name, layer, float_layer):
        assert isinstance(layer, dnateq.nn.ExpLinear) and isinstance(float_layer, nn.Linear)
        calls.append(("after_build", name))

    C.register_pass("test-before", C.BEFORE_FIT, before)
    C.register_pass("test-after", C.AFTER_BUILD, after)
    try:
        dnateq.quantize(mlp(), vectors(), passes=["test-before", "test-after"], bits=(5,), **KW)
    finally:
        del C.PASSES["test-before"], C.PASSES["test-after"]
    assert calls[0] == ("before_fit", ("0", "2", "4"))
    assert sorted(c[1] for c in calls[1:]) == ["0", "2", "4"]
    with pytest.raises(ValueError, match="stage"):
        C.register_pass("x", "sometime", before)


# ---------------------------------------------------------------------------
# calling convention (issue 12 item 1, SPEC 9)
# ---------------------------------------------------------------------------

class KwModel(nn.Module):
    """A model with the Hugging Face calling convention: keyword tensors in, a
    dict-like output (last_hidden_state) out, padding positions masked."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(50, 16)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.emb(input_ids)
        h = h + self.ff(h)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"last_hidden_state": h, "input_ids": input_ids}


def token_batches(n=4, b=6, t=10, seed=3, pad_value=0):
    g = gen(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (b, t), generator=g)
        lens = torch.randint(2, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lens[:, None]).long()
        out.append({"input_ids": ids * mask + pad_value * (1 - mask), "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(ids)})
    return out


def test_dict_batch_is_passed_as_keywords():
    m = KwModel()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    q = dnateq.quantize(m, token_batches(), bits=(6,), **KW)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert {n for n, x in q.named_modules() if isinstance(x, dnateq.nn.ExpLinear)} == {"ff.0", "ff.2"}
    # the proxy compared last_hidden_state (not input_ids, the other tensor): < 100 %
    assert q.dnateq_info["metric"] == "proxy" and q.dnateq_info["quality"] < 100.0
    assert q.dnateq_info["options"]["mask"] == "attention_mask"


def test_forward_option_calls_anything():
    m = KwModel()
    batches = [(b["input_ids"], b["attention_mask"]) for b in token_batches()]
    seen = []

    def fwd(model, batch):
        seen.append(type(batch).__name__)
        return model(input_ids=batch[0], attention_mask=batch[1])

    q = dnateq.quantize(m, batches, bits=(6,), forward=fwd, mask=lambda b: b[1], **KW)
    assert seen and set(seen) == {"tuple"}
    ref = dnateq.quantize(m, token_batches(), bits=(6,), **KW)
    x = token_batches()[0]
    assert torch.equal(q(**x)["last_hidden_state"], ref(**x)["last_hidden_state"])


def test_trace_takes_only_valid_tokens():
    """With the mask, padded positions never reach the traces: the fit is the
    same whatever the padded positions hold; without it, it is not."""
    m = KwModel()
    a = dnateq.quantize(m, token_batches(pad_value=0), bits=(5,), **KW)
    b = dnateq.quantize(m, token_batches(pad_value=7), bits=(5,), **KW)
    ta, tb = a.dnateq_info["tables"]["ff.0"]["rows"][5], b.dnateq_info["tables"]["ff.0"]["rows"][5]
    assert ta == tb
    c = dnateq.quantize(m, token_batches(pad_value=7), bits=(5,), mask=False, **KW)
    assert c.dnateq_info["tables"]["ff.0"]["rows"][5] != tb


def test_proxy_masks_outputs():
    from dnateq.calibration.quality import proxy_quality
    r = torch.randn(2, 3, 4)
    o = r.clone()
    o[:, 2] = -r[:, 2]                       # only the padded position differs
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert proxy_quality([r], [o], ["hidden"], [mask]) == pytest.approx(100.0)
    assert proxy_quality([r], [o], ["hidden"], [None]) < 100.0
    logits = torch.randn(4, 5)
    assert proxy_quality([logits], [logits.flip(1)], ["logits"]) < 100.0


def test_bad_calls_name_the_batch_and_leave_the_model():
    m = KwModel()
    before = {k: v.clone() for k, v in m.state_dict().items()}

    def boom(model, batch):
        raise KeyError("nope")

    with pytest.raises(RuntimeError, match=r"loader batch 0.*forward.*KeyError"):
        dnateq.quantize(m, token_batches(), forward=boom, **KW)
    with pytest.raises(ValueError, match=r"loader batch 0 is a dict without a tensor"):
        dnateq.quantize(m, [{"text": "hello"}], **KW)
    with pytest.raises(RuntimeError, match=r"loader batch 0.*model\(\*\*batch\).*forward="):
        dnateq.quantize(mlp(), [{"x": torch.randn(2, 20), "label": 1}], **KW)

    class NoTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(20, 4)

        def forward(self, x):
            self.lin(x)
            return {"text": "no tensor here"}

    with pytest.raises(TypeError, match=r"held-out batch 0.*pass eval_fn"):
        dnateq.quantize(NoTensor(), vectors(), **KW)
    with pytest.raises(TypeError, match="forward must be callable"):
        dnateq.quantize(m, token_batches(), forward=3, **KW)
    with pytest.raises(TypeError, match="mask"):
        dnateq.quantize(m, token_batches(), mask="yes", **KW)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


# ---------------------------------------------------------------------------
# honest proxy (issue 12 item 4), issue 14 items
# ---------------------------------------------------------------------------

def test_proxy_is_judged_on_batches_calibration_never_saw():
    data = vectors(6)
    q = dnateq.quantize(mlp(), data, bits=(6,), eval_batches=2, **KW)
    est = q.dnateq_info["estimate"]
    assert est["metric"] == "proxy" and est["held_out_batches"] == 2
    assert not est["on_calibration_batches"]
    assert est["loss"] == pytest.approx(q.dnateq_info["loss"])
    # the traced batches are the first two: changing the held-out ones leaves the tables
    other = data[:2] + [torch.randn(16, 20) for _ in range(4)]
    q2 = dnateq.quantize(mlp(), other, bits=(6,), eval_batches=2, **KW)
    assert q2.dnateq_info["tables"] == q.dnateq_info["tables"]


def test_short_loader_holds_out_and_warns():
    with pytest.warns(UserWarning, match=r"calibrating on 2 and holding out 1"):
        q = dnateq.quantize(mlp(), vectors(3), bits=(6,), **dict(KW, calib_batches=8))
    assert q.dnateq_info["estimate"]["held_out_batches"] == 1
    with pytest.warns(UserWarning, match="judged on calibration batches"):
        q = dnateq.quantize(mlp(), vectors(1), bits=(6,), **KW)
    assert q.dnateq_info["estimate"]["on_calibration_batches"]
    with pytest.warns(UserWarning, match="judged on calibration batches"):   # no len()
        dnateq.quantize(mlp(), (v for v in vectors(2)), bits=(6,), **KW)
    rep = dnateq.report(q).to_markdown()
    assert "estimate" in rep.lower()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, "1"])
def test_max_loss_must_be_finite_and_non_negative(bad):
    m = mlp()
    with pytest.raises((ValueError, TypeError), match="max_loss"):
        dnateq.quantize(m, vectors(), max_loss=bad, progress=False, calib_batches=2)


def test_heldout_batch_the_model_cannot_take_names_it():
    data = vectors(2) + [torch.randn(16, 7)]
    m = mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"dnateq.quantize: the model cannot take held-out "
                                           r"batch 0 \(model\(input\) with input tensor \[16, 7\]"):
        dnateq.quantize(m, data, **KW)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


# ---------------------------------------------------------------------------
# shared modules (issue 14 item 1), transformers Conv1D
# ---------------------------------------------------------------------------

class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(20, 16)
        self.a = nn.Linear(16, 16)
        self.b = self.a                   # one module under two names
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(self.inp(x))))))


@pytest.mark.parametrize("inplace", [False, True])
def test_shared_module_quantized_once_and_kept_shared(inplace, tmp_path):
    m = Shared()
    q = dnateq.quantize(m, vectors(), bits=(6,), inplace=inplace, **KW)
    assert isinstance(q.a, dnateq.nn.ExpLinear) and q.a is q.b
    assert q.dnateq_info["shared"] == {"a": ["b"]}
    x = vectors()[0]
    y = q(x)
    # saved and loaded, the sharing stays
    dnateq.save(q, tmp_path / "s.dnateq")
    r = dnateq.load(tmp_path / "s.dnateq", Shared())
    assert r.a is r.b and torch.equal(r(x), y)
    # the uniform baseline keeps it too
    from dnateq import baselines
    u = baselines.uniform_quantize(Shared(), vectors(), bits=8, progress=False, calib_batches=2)
    assert u.a is u.b and type(u.b) is not nn.Linear


class TiedHead(nn.Module):
    """Input and output embeddings sharing one Parameter (tied language models)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_tied_parameters_are_not_silently_untied():
    m = TiedHead()
    batches = [torch.randint(0, 12, (8, 5), generator=gen(i)) for i in range(4)]
    q = dnateq.quantize(m, batches, bits=(6,), **KW)
    assert isinstance(q.mid, dnateq.nn.ExpLinear)
    assert type(q.head) is nn.Linear and q.head.weight is q.emb.weight
    assert q.dnateq_info["skipped"]["head"].startswith("its parameters are tied to emb.weight")
    assert "head" in dnateq.report(q).to_dict()["skipped"]


def test_transformers_conv1d_is_quantized_as_linear(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = gen(9)
    batches = [{"input_ids": torch.randint(0, 64, (3, 12), generator=g),
                "attention_mask": torch.ones(3, 12, dtype=torch.long)} for _ in range(4)]
    from dnateq.calibration.select import conv1d_as_linear
    c = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32)
    assert torch.allclose(conv1d_as_linear(c)(x), c(x), atol=1e-6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = dnateq.quantize(model, batches, bits=(7,), **KW)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    names = {n for n, m in q.named_modules() if isinstance(m, dnateq.nn.ExpLinear)}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj"} <= names
    # GPT-2 ties lm_head.weight to the token embedding: left in float, said so
    assert "lm_head" not in names and q.lm_head.weight is q.transformer.wte.weight
    assert "tied to transformer.wte.weight" in q.dnateq_info["skipped"]["lm_head"]
    assert len(q.dnateq_info["conv1d_replaced"]) == 8
    b = batches[0]
    with torch.no_grad():
        ref, out = model(**b).logits, q(**b).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1)).min() > 0.98
    dnateq.save(q, tmp_path / "g.dnateq")
    r = dnateq.load(tmp_path / "g.dnateq", transformers.GPT2LMHeadModel(cfg).eval())
    with torch.no_grad():
        assert torch.equal(r(**b).logits, out)
