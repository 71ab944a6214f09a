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
