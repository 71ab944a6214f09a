"""Model passes around the per-layer fit (issue 12, item 2): input capture,
smoothing, bias correction.

**Layer inputs.** :func:`capture_inputs` runs the model on a few calibration
inputs and keeps, per layer, a small sample of real inputs for
:class:`dnateq.calibration.clip.LayerProbe` (rows of a Linear's input; whole
images, or a crop, for a Conv2d) and the exact per-input-channel maximum
magnitude over everything it saw (for smoothing).

**Smoothing** (SmoothQuant-style, :func:`smooth_layers`). A per-input-channel
factor ``s`` moves range from the activations into the weights: the layer
computes ``(x / s) @ (W * s)^T``, the same function in float, and quantizes
``x / s`` and ``W * s``. ``s_j = max|x_j|^a / max|W_{:,j}|^(1-a)``; the
migration strength ``a`` is chosen per layer (or per group of layers sharing
one input) from ``strengths`` by the layers' output error at a reference
bit width, and ``a = 0`` (no smoothing) is always a candidate.

Where the factor goes:

- *folded* into the preceding module that produces the layer's input tensor
  (found by matching the producer's output tensor to the layer's input with
  forward hooks): ``nn.LayerNorm``, ``nn.Linear``, ``nn.Conv2d`` or
  ``nn.BatchNorm2d`` divide their affine output channels by ``s``. Folding is
  exact only when *every* consumer of that tensor is a layer that receives the
  same factor. A post-LN BERT's LayerNorm output also feeds the residual
  path, so it must not be folded there. This is checked, not assumed: a
  random factor is folded into a copy of the model, and its outputs must
  equal the original's. If they do not, the layers fall back to a buffer.
- else the quantized layer's ``smooth`` buffer (a cheap elementwise scale,
  SPEC section 9): the module divides its input by ``s`` before quantizing it.
  In the float model under calibration, a forward pre-hook does the same.

Both keep Eq. 8 exact: the count path sees ``x / s`` quantized with the
layer's parameters and ``W * s``'s codes. ``mode="fold"`` raises a clear
error for a layer with no foldable predecessor; ``mode="auto"`` falls back
to the buffer.

**Bias correction** (:func:`apply_bias_correction`): the quantized layer's
bias gets ``+ delta`` (per output channel, from
:meth:`LayerProbe.bias_delta`); the bias is added after the counts.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["capture_inputs", "LayerInputs", "smoothing_factor", "smooth_layers",
           "find_producers", "apply_bias_correction", "fold_check", "SMOOTH_MODES",
           "STRENGTHS", "FOLDABLE"]

SMOOTH_MODES = ("auto", "fold", "buffer")
#: Candidate migration strengths (0 = no smoothing).
STRENGTHS = (0.0, 0.25, 0.5, 0.75)
#: Module types a factor may be folded into (their affine output channels).
FOLDABLE = (nn.LayerNorm, nn.Linear, nn.Conv2d, nn.BatchNorm2d)


def _get_module(root: nn.Module, name: str) -> nn.Module:
    m = root
    for p in name.split("."):
        m = getattr(m, p)
    return m


def _call(model: nn.Module, x: Any, forward: Optional[Callable] = None) -> Any:
    if forward is not None:
        return forward(model, x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


# ---------------------------------------------------------------------------
# layer inputs
# ---------------------------------------------------------------------------

class LayerInputs:
    """What :func:`capture_inputs` kept for one layer: ``x`` (the input
    sample), ``absmax`` (per input channel, float32 ``[K]``), ``channel_dim``."""

    def __init__(self, x: torch.Tensor, absmax: torch.Tensor, channel_dim: int):
        self.x, self.absmax, self.channel_dim = x, absmax, channel_dim


def capture_inputs(work: nn.Module, names: Sequence[str], inputs: Iterable[Any], *,
                   max_elems: int = 1 << 16, seed: int = 0,
                   forward: Optional[Callable] = None,
                   row_mask: Optional[Callable[[Any], Optional[torch.Tensor]]] = None
                   ) -> Dict[str, LayerInputs]:
    """Run ``work`` on ``inputs`` and keep per layer a bounded input sample and
    the per-input-channel max magnitude. A Linear keeps at most
    ``max_elems // K`` (>= 16) random rows of its input; a Conv2d whole images
    up to ``max_elems`` elements (at least one; a single larger image is
    center-cropped). ``row_mask(batch)`` may give a boolean mask of the valid
    positions of the batch (e.g. the attention mask ``[B, T]``): a Linear
    whose input has those leading dims keeps only the valid rows."""
    gen = torch.Generator().manual_seed(int(seed))
    rows: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    amax: Dict[str, torch.Tensor] = {}
    kinds = {n: isinstance(_get_module(work, n), nn.Conv2d) for n in names}
    state = {"mask": None}

    def hook_for(name):
        is_conv = kinds[name]

        def hook(mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach().float().cpu()
            if is_conv:
                if x.dim() != 4:
                    return
                a = x.abs().amax(dim=(0, 2, 3))
                per = x[0].numel()
                have = sum(t.shape[0] for t in rows[name]) * per
                if have + per <= max_elems or not rows[name]:
                    take = max(1, (max_elems - have) // per) if have < max_elems else 0
                    if take:
                        xs = x[:take]
                        if xs[0].numel() > max_elems:   # one big image: center crop
                            C, H, W = xs.shape[1:]
                            side = max(1, int(math.sqrt(max_elems / C)))
                            h0, w0 = max(0, (H - side) // 2), max(0, (W - side) // 2)
                            xs = xs[:1, :, h0:h0 + side, w0:w0 + side]
                        rows[name].append(xs.clone())
            else:
                K = x.shape[-1]
                m = state["mask"]
                if m is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(m.shape):
                    r = x[m.bool()]
                else:
                    r = x.reshape(-1, K)
                if r.shape[0] == 0:
                    return
                a = r.abs().amax(dim=0)
                cap = max(16, max_elems // max(1, K))
                if r.shape[0] > cap:
                    r = r[torch.randperm(r.shape[0], generator=gen)[:cap]]
                rows[name].append(r.clone())
                have = sum(t.shape[0] for t in rows[name])
                if have > 2 * cap:
                    allr = torch.cat(rows[name])
                    rows[name] = [allr[torch.randperm(allr.shape[0], generator=gen)[:cap]]]
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return hook

    handles = [_get_module(work, n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for x in inputs:
                state["mask"] = row_mask(x) if row_mask is not None else None
                if state["mask"] is not None:
                    state["mask"] = state["mask"].detach().cpu()
                _call(work, x, forward)
    finally:
        for h in handles:
            h.remove()
    out: Dict[str, LayerInputs] = {}
    for n in names:
        if not rows[n]:
            continue
        if kinds[n]:
            x = torch.cat(rows[n])
            out[n] = LayerInputs(x, amax[n], 1)
        else:
            x = torch.cat(rows[n])
            cap = max(16, max_elems // max(1, x.shape[1]))
            if x.shape[0] > cap:
                x = x[torch.randperm(x.shape[0], generator=gen)[:cap]]
            out[n] = LayerInputs(x, amax[n], -1)
    return out


# ---------------------------------------------------------------------------
# smoothing
# ---------------------------------------------------------------------------

def weight_in_absmax(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Max magnitude per *input* channel of a Linear ``[N, K]`` or Conv2d
    ``[O, C/g, kh, kw]`` weight (``[K]`` / ``[C]``)."""
    w = weight.detach().float().abs()
    if w.dim() == 2:
        return w.amax(dim=0)
    O, Cg = w.shape[0], w.shape[1]
    g = int(groups)
    return w.reshape(g, O // g, Cg, -1).amax(dim=(1, 3)).reshape(g * Cg)


def scale_weight_inputs(weight: torch.Tensor, s: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``weight`` with its input channel ``j`` multiplied by ``s[j]``."""
    w = weight.detach()
    s = s.to(w)
    if w.dim() == 2:
        return w * s.reshape(1, -1)
    O, Cg = w.shape[0], w.shape[1]
    g = int(groups)
    return (w.reshape(g, O // g, Cg, *w.shape[2:]) * s.reshape(g, 1, Cg, 1, 1)).reshape(w.shape)


def smoothing_factor(x_absmax: torch.Tensor, w_absmax: torch.Tensor, strength: float
                     ) -> torch.Tensor:
    """``s_j = max|x_j|^a / max|W_j|^(1-a)`` (float32), 1 where either is 0;
    normalized to geometric mean 1 over the channels it changes (a common
    scale moves nothing between the two tensors) and clamped to
    ``[1e-4, 1e4]``."""
    xa = x_absmax.detach().double()
    wa = w_absmax.detach().double()
    ok = (xa > 0) & (wa > 0)
    s = torch.ones_like(xa)
    if float(strength) == 0.0 or not bool(ok.any()):
        return s.float()
    a = float(strength)
    s[ok] = xa[ok].pow(a) / wa[ok].pow(1.0 - a)
    s[ok] = s[ok] / torch.exp(torch.log(s[ok]).mean())
    return s.clamp(1e-4, 1e4).float()


def find_producers(work: nn.Module, names: Sequence[str], x: Any,
                   forward: Optional[Callable] = None) -> Dict[str, Optional[str]]:
    """For each layer in ``names``: the name of the innermost module whose
    forward output *is* the layer's input tensor (forward hooks, one run on
    ``x``), or None (computed by a function, not a module)."""
    produced: Dict[int, str] = {}
    keep: List[torch.Tensor] = []
    got: Dict[str, Optional[str]] = {}
    names_set = set(names)

    def fwd_hook(name):
        def hook(mod, args, out):
            if isinstance(out, torch.Tensor) and id(out) not in produced:
                produced[id(out)] = name
                keep.append(out)
        return hook

    def pre_hook(name):
        def hook(mod, args):
            if name in got or not args or not isinstance(args[0], torch.Tensor):
                return
            got[name] = produced.get(id(args[0]))
        return hook

    handles = []
    for n, m in work.named_modules():
        if n:
            handles.append(m.register_forward_hook(fwd_hook(n)))
        if n in names_set:
            handles.append(m.register_forward_pre_hook(pre_hook(n)))
    try:
        with torch.no_grad():
            _call(work, x, forward)
    finally:
        for h in handles:
            h.remove()
    return {n: got.get(n) for n in names}


def _foldable(pred: nn.Module, consumers: Sequence[nn.Module]) -> bool:
    if not isinstance(pred, FOLDABLE):
        return False
    lin = all(isinstance(c, nn.Linear) for c in consumers)
    conv = all(isinstance(c, nn.Conv2d) for c in consumers)
    K = {c.in_features if isinstance(c, nn.Linear) else c.in_channels for c in consumers}
    if len(K) != 1:
        return False
    K = K.pop()
    if isinstance(pred, nn.LayerNorm):
        return (lin and pred.weight is not None and len(pred.normalized_shape) == 1
                and pred.normalized_shape[0] == K)
    if isinstance(pred, nn.Linear):
        return lin and pred.out_features == K
    if isinstance(pred, nn.Conv2d):
        return conv and pred.out_channels == K
    if isinstance(pred, nn.BatchNorm2d):
        return conv and pred.affine and pred.num_features == K
    return False


def _fold_into(pred: nn.Module, s: torch.Tensor) -> None:
    """Divide ``pred``'s output channel ``j`` by ``s[j]`` (in place)."""
    with torch.no_grad():
        sv = s.to(pred.weight)
        if isinstance(pred, (nn.LayerNorm, nn.BatchNorm2d)):
            pred.weight.div_(sv)
        else:
            pred.weight.div_(sv.reshape(-1, *([1] * (pred.weight.dim() - 1))))
        if getattr(pred, "bias", None) is not None:
            pred.bias.div_(sv)


def _flat_tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "items"):
        try:
            return [t for v in out.values() for t in _flat_tensors(v)]
        except Exception:
            return []
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat_tensors(v)]
    return []


def fold_check(work: nn.Module, pred_name: str, consumer_names: Sequence[str], x: Any,
               forward: Optional[Callable] = None, seed: int = 0) -> bool:
    """Whether folding a per-channel factor into ``pred_name`` and its inverse into
    ``consumer_names``' weights leaves the model's outputs unchanged: tried on
    a copy of ``work`` with a random factor (``exp(N(0, 1))``), on input ``x``."""
    import copy
    trial = copy.deepcopy(work)
    cons = [_get_module(trial, n) for n in consumer_names]
    pred = _get_module(trial, pred_name)
    K = cons[0].in_features if isinstance(cons[0], nn.Linear) else cons[0].in_channels
    g = torch.Generator().manual_seed(int(seed) + 12345)
    s = torch.exp(torch.randn(K, generator=g))
    _fold_into(pred, s)
    with torch.no_grad():
        for c in cons:
            c.weight.copy_(scale_weight_inputs(c.weight, s, getattr(c, "groups", 1)))
        ref = _flat_tensors(_call(work, x, forward))
        out = _flat_tensors(_call(trial, x, forward))
    if len(ref) != len(out) or not ref:
        return False
    for r, o in zip(ref, out):
        if r.shape != o.shape or not r.is_floating_point():
            if not torch.equal(r, o):
                return False
            continue
        scale = float(r.detach().abs().max()) if r.numel() else 0.0
        if not torch.allclose(o.float(), r.float(), rtol=1e-3, atol=1e-4 * max(scale, 1e-12)):
            return False
    return True


def _strength_error(members, absmax: torch.Tensor, strength: float, bits: int,
                    rounding: str) -> Tuple[float, torch.Tensor]:
    """Sum over ``members`` (``(module, x_sample)``) of the output error at
    ``bits`` with the factor of ``strength`` (one joint factor for all)."""
    from .channel_fit import choose_shared_alpha, fit_weight_rows, fake_quant
    from .clip import LayerProbe, fit_activation
    wmax = torch.stack([weight_in_absmax(m.weight, getattr(m, "groups", 1))
                        for m, _ in members]).amax(dim=0)
    s = smoothing_factor(absmax, wmax, strength)
    total = 0.0
    for m, x in members:
        g = getattr(m, "groups", 1)
        w = scale_weight_inputs(m.weight, s, g).float()
        shape = [1] * x.dim()
        shape[-1 if isinstance(m, nn.Linear) else 1] = -1
        xs = x / s.reshape(shape)
        alpha = choose_shared_alpha(w, xs, bits, rounding, per_channel=True, grid=16)
        S, B = fit_weight_rows(w, alpha, bits)
        wh = fake_quant(w, alpha, S, B, bits, rounding)
        probe = LayerProbe(m, xs, w)
        r = fit_activation(probe, xs, alpha, bits, wh, rounding, clip=False)
        total += r["out_err"]
    return total, s


def smooth_layers(work: nn.Module, names: Sequence[str], inputs: Dict[str, "LayerInputs"],
                  probe_x: Any, *, mode: str = "auto",
                  strengths: Sequence[float] = STRENGTHS, ref_bits: int = 4,
                  rounding: str = "nearest", forward: Optional[Callable] = None,
                  seed: int = 0) -> Dict[str, Dict[str, Any]]:
    """Smooth the layers ``names`` of ``work`` (the float model under
    calibration, modified in place) and return ``{name: record}``.

    ``inputs`` are :func:`capture_inputs`' samples (updated in place to the
    smoothed inputs ``x / s``); ``probe_x`` is one model input for the
    producer search and the fold check. Each record holds ``strength``,
    ``where`` (``"folded"``, ``"buffer"`` or ``"none"``), ``into`` (the
    predecessor folded into) and ``factor`` (float32 ``[K]``, or None when not
    smoothed). Layers needing a buffer get a forward pre-hook that divides
    their input by the factor and the attribute ``_dnateq_smooth`` (the
    builder copies it into the quantized module's ``smooth`` buffer).

    ``mode``: ``"auto"`` folds where exact and else uses the buffer;
    ``"fold"`` raises ``ValueError`` naming a layer with no foldable
    predecessor; ``"buffer"`` never folds."""
    if mode not in SMOOTH_MODES:
        raise ValueError(f"dnateq: smoothing mode must be one of {SMOOTH_MODES}, got {mode!r}")
    names = [n for n in names if n in inputs]
    producers = find_producers(work, names, probe_x, forward) if mode != "buffer" else {}
    groups: Dict[str, List[str]] = {}
    for n in names:
        p = producers.get(n)
        if p is not None:
            groups.setdefault(p, []).append(n)
    records: Dict[str, Dict[str, Any]] = {}
    folded_layers: Dict[str, str] = {}
    for p, cons in groups.items():
        pred = _get_module(work, p)
        mods = [_get_module(work, c) for c in cons]
        if _foldable(pred, mods) and fold_check(work, p, cons, probe_x, forward, seed):
            for c in cons:
                folded_layers[c] = p
    if mode == "fold":
        bad = [n for n in names if n not in folded_layers]
        if bad:
            why = producers.get(bad[0])
            raise ValueError(
                f"dnateq: smoothing='fold' needs a foldable predecessor, but layer '{bad[0]}' "
                + (f"takes the output of '{why}' ({type(_get_module(work, why)).__name__}), "
                   "which cannot take the factor exactly (other consumers of that output, or "
                   "not a LayerNorm/Linear/Conv2d/BatchNorm2d)" if why else
                   "takes a tensor computed outside any module")
                + "; use smoothing='auto' to fall back to the layer's smooth buffer")

    def choose(members_names):
        members = [(_get_module(work, c), inputs[c].x) for c in members_names]
        absmax = torch.stack([inputs[c].absmax for c in members_names]).amax(dim=0)
        best = None
        for a in strengths:
            e, s = _strength_error(members, absmax, a, ref_bits, rounding)
            if best is None or e < best[0] * (1 - 1e-6):
                best = (e, float(a), s)
        return best

    done = set()
    for p, cons in groups.items():
        cons = [c for c in cons if folded_layers.get(c) == p]
        if not cons:
            continue
        e, a, s = choose(cons)
        if a > 0:
            _fold_into(_get_module(work, p), s)
        for c in cons:
            m = _get_module(work, c)
            if a > 0:
                with torch.no_grad():
                    m.weight.copy_(scale_weight_inputs(m.weight, s, getattr(m, "groups", 1)))
                _divide_sample(inputs[c], s)
            records[c] = dict(strength=a, where="folded" if a > 0 else "none",
                              into=p if a > 0 else None, factor=s if a > 0 else None)
            done.add(c)
    for n in names:
        if n in done:
            continue
        e, a, s = choose([n])
        m = _get_module(work, n)
        if a > 0:
            with torch.no_grad():
                m.weight.copy_(scale_weight_inputs(m.weight, s, getattr(m, "groups", 1)))
            _divide_sample(inputs[n], s)
            _attach_buffer_hook(m, s)
        records[n] = dict(strength=a, where="buffer" if a > 0 else "none", into=None,
                          factor=s if a > 0 else None)
    return records


def _divide_sample(li: "LayerInputs", s: torch.Tensor) -> None:
    shape = [1] * li.x.dim()
    shape[li.channel_dim] = -1
    li.x = li.x / s.reshape(shape)
    li.absmax = li.absmax / s


def _attach_buffer_hook(m: nn.Module, s: torch.Tensor) -> None:
    is_conv = isinstance(m, nn.Conv2d)

    def hook(mod, args):
        x = args[0]
        f = s.to(device=x.device, dtype=x.dtype)
        f = f.reshape(1, -1, 1, 1) if is_conv else f
        return (x / f,) + tuple(args[1:])

    m._dnateq_smooth = s.float().clone()
    m._dnateq_smooth_hook = m.register_forward_pre_hook(hook)


# ---------------------------------------------------------------------------
# bias correction
# ---------------------------------------------------------------------------

def apply_bias_correction(qmod: nn.Module, delta: Optional[torch.Tensor]) -> None:
    """Add ``delta`` (per output channel) to the quantized layer's bias (creating
    one when the layer had none)."""
    if delta is None:
        return
    d = delta.detach().float().to(qmod.w_packed.device)
    b = getattr(qmod, "bias", None)
    qmod.bias = d.clone() if b is None else (b.float() + d)


# ---------------------------------------------------------------------------
# the passes of dnateq.quantize (registered with the calibration pipeline)
# ---------------------------------------------------------------------------

#: Elements of real input kept per layer for the output-error probes.
PROBE_ELEMS = 1 << 16


def _row_mask(batch: Any) -> Optional[torch.Tensor]:
    """The valid positions of a dict batch (its ``attention_mask``), else None."""
    if isinstance(batch, dict):
        m = batch.get("attention_mask")
        if isinstance(m, torch.Tensor):
            return m
    return None


def _forward_of(state) -> Optional[Callable]:
    """How the calibration calls the model (its ModelCall when there is one)."""
    call = getattr(state, "call", None)
    if call is not None:
        return lambda model, x: call(model, x)
    return getattr(state.config, "forward", None)


def _mask_of(state) -> Callable[[Any], Optional[torch.Tensor]]:
    call = getattr(state, "call", None)
    if call is not None:
        return call.mask_of
    return _row_mask


def layer_inputs(state) -> Dict[str, "LayerInputs"]:
    """The probes' input samples of ``state`` (captured once, on the first
    calibration inputs)."""
    li = getattr(state, "layer_inputs", None)
    if li is None:
        inputs = list(getattr(state, "calib_inputs", None) or [])
        if not inputs:
            raise RuntimeError("dnateq.quantize: the mechanisms need calibration inputs kept "
                               "(state.calib_inputs is empty)")
        li = capture_inputs(state.model, state.names, inputs[:2], max_elems=PROBE_ELEMS,
                            seed=state.config.seed, forward=_forward_of(state),
                            row_mask=_mask_of(state))
        state.layer_inputs = li
    return li


def _note(state, name: str, what: str) -> None:
    state.layer_passes.setdefault(name, []).append(what)


def smoothing_pass(state) -> None:
    """Stage ``before_fit``: smooth every layer (:func:`smooth_layers`, mode
    ``config.smoothing``), record buffers in ``state.smooth``, re-trace."""
    c = state.config
    mode = getattr(c, "smoothing", "auto") or "auto"
    li = layer_inputs(state)
    inputs = list(state.calib_inputs)
    rec = smooth_layers(state.model, state.names, li, inputs[0], mode=mode,
                        rounding=c.rounding, forward=_forward_of(state), seed=c.seed)
    state.records["smoothing"] = {n: {k: v for k, v in r.items() if k != "factor"}
                                  for n, r in rec.items()}
    changed = False
    for n, r in rec.items():
        if r["where"] == "buffer":
            state.smooth[n] = r["factor"]
        if r["where"] != "none":
            changed = True
            _note(state, n, f"smoothing ({r['where']}" + (f" into {r['into']}" if r["into"]
                                                          else "") + f", a={r['strength']:g})")
    for p in sorted({r["into"] for r in rec.values() if r["into"]}):
        if p not in state.changed_modules:
            state.changed_modules.append(p)
    if changed:
        state.retrace(inputs)


def _mechanisms_of(state):
    from .mechanisms import Mechanisms
    sel = set(state.config.passes)
    return Mechanisms(per_channel="per_channel" in sel, clip="clip" in sel,
                      bias_correction="bias_correction" in sel)


def refit_pass(state) -> None:
    """Stage ``after_fit`` (passes ``per_channel``, ``clip``,
    ``bias_correction``; runs once for all three): refit every layer's rows with
    the selected mechanisms (:func:`dnateq.calibration.mechanisms.fit_layer`)."""
    if getattr(state, "_refit_done", False):
        return
    state._refit_done = True
    from .clip import LayerProbe
    from .mechanisms import fit_layer
    c = state.config
    mech = _mechanisms_of(state)
    li = layer_inputs(state) if mech.needs_probe() else {}
    for n in state.names:
        mod = _get_module(state.model, n)
        w = mod.weight.detach().float().cpu()
        a = state.traces.traces[n].sample()
        probe = LayerProbe(mod, li[n].x, w) if n in li else None
        t = state.tables[n]
        rows = fit_layer(mod, w, a, c.bits, mech=mech, probe=probe, search=c.search,
                         rounding=c.rounding, rss=dict(start=t["start"]), seed=c.seed)
        for b, r in rows.items():
            if isinstance(r.get("sw"), torch.Tensor):
                r["w_scale"], r["w_offset"] = r["sw"], r["bw"]
                r["sw"], r["bw"] = float(r["sw"].double().mean()), float(r["bw"].double().mean())
        t["rows"] = rows
        for k in mech.names():
            _note(state, n, k)


def _register() -> None:
    try:
        from . import pipeline as _pl
    except ImportError:    # pipeline not present (standalone use of these helpers)
        return
    after_fit = getattr(_pl, "AFTER_FIT", None)
    _pl.register_pass("smoothing", _pl.BEFORE_FIT, smoothing_pass)
    if after_fit is not None:
        for n in ("per_channel", "clip"):
            _pl.register_pass(n, after_fit, refit_pass)
        _pl.register_pass("bias_correction", after_fit, refit_pass)


_register()
