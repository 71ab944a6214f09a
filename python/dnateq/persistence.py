"""Saving and loading quantized models: ``dnateq.save`` / ``dnateq.load`` (SPEC section 6).

The file holds what the quantized model needs and nothing derived: the packed
weight codes of every quantized layer (``w_packed``, so the file size follows
the bits), its static parameters, the float tensors of the layers left in
float (batch norms, embeddings, skipped layers), the names of the attention
modules that were split into Q/K/V/out, the calibration record as JSON, a
SHA-256 per tensor (over its dtype, shape and bytes) and, since format version 2,
a SHA-256 per section (the layer table with every layer's parameters, the
attention list, the calibration record, the baseline record and the tensor
checksum table), so that no changed digit of any saved value goes unnoticed. ``w_terms`` (C2/C4) are recomputed from the codes on load.
Format version 3 adds a layer's optional per-output-channel weight parameters
``w_scale``/``w_offset`` and smoothing vector ``smooth`` (tensors of the state,
checksummed like the others); older files (without them) load unchanged.
docs/FORMAT.md records the versions.
Uniform-baseline layers (:mod:`dnateq.baselines`) are saved too, their
integers as int8/int16 (not bit-packed: the baseline is for comparisons).
The architecture is not pickled: :func:`load` rebuilds it from the float model
the caller passes, so a file can only be loaded onto the model it came from,
and loading never executes code from the file (``torch.load(weights_only=True)``).

Container: ``torch.save`` of a dict (a zip archive). Errors are
:class:`DnateqFileError` (a ``ValueError``) naming the file and what is wrong:
not a dnateq file, truncated/corrupt archive, a section or tensor failing its
checksum, a section of the wrong type or structure (named), newer format, or a
float model that does not match (missing layer, wrong type or shape). Files of
format version 1 (no section checksums) still load, with the same structural
checks.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from typing import Any, Dict, Union

import torch
import torch.nn as nn

from ._common import set_module as _set_module
from .calibration.select import conv1d_as_linear, is_conv1d, module_aliases
from .calibration.select import disable_fast_paths as _disable_fast_paths
from .nn.modules import MODES, ROUNDINGS, ExpConv2d, ExpLinear, ExpMultiheadAttention
from .nn.uniform import UniformConv2d, UniformLinear
from . import ops

__all__ = ["save", "load", "DnateqFileError", "FORMAT_VERSION"]

MAGIC = "dnateq-quantized-model"
FORMAT_VERSION = 3
# Version 1: per-tensor SHA-256 over the bytes only. Version 2: per-tensor
# SHA-256 over dtype, shape and bytes, and a SHA-256 per section. Version 3:
# optional <layer>.w_scale / .w_offset / .smooth tensors (docs/FORMAT.md).
_SECTIONS = ("layers", "mha", "info", "baseline", "sha256")

_EXP = {"ExpLinear": ExpLinear, "ExpConv2d": ExpConv2d}
_UNIFORM = {"UniformLinear": UniformLinear, "UniformConv2d": UniformConv2d}
_FLOAT_OF = {"ExpLinear": nn.Linear, "ExpConv2d": nn.Conv2d, "UniformLinear": nn.Linear,
             "UniformConv2d": nn.Conv2d}
# Buffers a quantized layer rebuilds on load instead of storing: the weight
# terms, and the fast path's weight layout (derived from w_packed; keeping it
# out of the file keeps the file size following the bits, and a layout is
# always rebuilt in the current layout version).
_DERIVED = ("w_terms", "w_layout")

PathLike = Union[str, "os.PathLike[str]"]


class DnateqFileError(ValueError):
    """A dnateq file that cannot be loaded (corrupt, truncated, mismatched)."""


def _digest(t: torch.Tensor, version: int = FORMAT_VERSION) -> str:
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    h = hashlib.sha256()
    if version >= 2:
        h.update(f"{t.dtype}|{list(t.shape)}|".encode())
    h.update(b)
    return h.hexdigest()


def _section_digest(value: Any) -> str:
    """SHA-256 of a section's canonical JSON (strings, lists, dicts, None)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _quantized_layers(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, tuple(_EXP.values()) + tuple(_UNIFORM.values()))}


def save(qmodel: nn.Module, path: PathLike) -> int:
    """Write ``qmodel`` (from :func:`dnateq.quantize` or
    :func:`dnateq.baselines.uniform_quantize`) to ``path``. Returns the file
    size in bytes. The file is written to a temporary name and renamed, so an
    interrupted save never leaves a half-written file under ``path``."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"dnateq.save: qmodel must be an nn.Module, got {type(qmodel).__name__}")
    layers = _quantized_layers(qmodel)
    if not layers:
        raise ValueError("dnateq.save: qmodel has no quantized layer (use dnateq.quantize "
                         "or dnateq.baselines.uniform_quantize first)")
    state = {}
    for k, v in qmodel.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue   # the layers' extra state travels in "layers"
        owner, _, leaf = k.rpartition(".")
        if owner in layers and leaf in _DERIVED:
            continue
        state[k] = v.detach().cpu().clone()
    meta = {}
    for n, m in layers.items():
        entry = {"class": type(m).__name__, "extra": m.get_extra_state()}
        if isinstance(m, (ExpConv2d, UniformConv2d)):
            entry["geometry"] = _geometry(m)
        meta[n] = entry
    mha = [n for n, m in qmodel.named_modules() if isinstance(m, ExpMultiheadAttention)]
    record = getattr(qmodel, "dnateq_info", None)
    baseline = getattr(qmodel, "dnateq_baseline", None)
    blob = {
        "magic": MAGIC, "version": FORMAT_VERSION, "torch": str(torch.__version__),
        "layers": json.dumps(meta), "mha": list(mha), "state": state,
        "sha256": {k: _digest(v) for k, v in state.items()},
        "info": json.dumps(record, default=str) if record is not None else None,
        "baseline": json.dumps(baseline, default=str) if baseline is not None else None,
    }
    blob["sections_sha256"] = {k: _section_digest(blob[k]) for k in _SECTIONS}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def _tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _corrupt(path: str, section: str, msg: str) -> DnateqFileError:
    return DnateqFileError(f"dnateq.load: {path!r} is corrupt: section {section!r}: {msg}")


def _read(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dnateq.load: no such file: {path!r}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # zip, pickle and storage errors all mean the same here
        raise DnateqFileError(f"dnateq.load: {path!r} is not a readable dnateq file "
                              f"(truncated or corrupt?): {type(e).__name__}: {e}") from None
    if not isinstance(blob, dict) or blob.get("magic") != MAGIC:
        raise DnateqFileError(f"dnateq.load: {path!r} is not a dnateq quantized-model file "
                              "(written by dnateq.save)")
    version = blob.get("version")
    if type(version) is not int or version > FORMAT_VERSION:
        raise DnateqFileError(f"dnateq.load: {path!r} has format version {version!r}; this "
                              f"dnateq reads up to {FORMAT_VERSION} (upgrade dnateq)")
    if version < 1:
        raise _corrupt(path, "version", f"format version {version} does not exist")
    required = ("layers", "mha", "state", "sha256") + (("sections_sha256",) if version >= 2
                                                       else ())
    for key in required:
        if key not in blob:
            raise DnateqFileError(f"dnateq.load: {path!r} lacks its {key!r} section (corrupt)")
    _check_types(path, blob, version)
    if version >= 2:
        sums = blob["sections_sha256"]
        for key in _SECTIONS:
            try:
                ok = sums.get(key) == _section_digest(blob.get(key))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise _corrupt(path, key, "fails its SHA-256 check")
    state, sums = blob["state"], blob["sha256"]
    if set(state) != set(sums):
        raise DnateqFileError(f"dnateq.load: {path!r} is corrupt: the tensor list and the "
                              "checksum list differ")
    for k, t in state.items():
        if _digest(t, version) != sums[k]:
            raise DnateqFileError(f"dnateq.load: {path!r} is corrupt: tensor {k!r} fails its "
                                  "SHA-256 check")
    for key in ("layers", "info", "baseline"):
        if blob.get(key) is None:
            continue
        try:
            blob[key] = json.loads(blob[key])
        except (TypeError, ValueError) as e:
            raise _corrupt(path, key, f"not valid JSON ({e})") from None
    _check_layers(path, blob["layers"])
    return blob


def _check_types(path: str, blob: Dict[str, Any], version: int) -> None:
    """The sections' container types, before anything reads them."""
    def need(key, ok, what):
        if not ok:
            raise _corrupt(path, key, f"expected {what}, got {type(blob.get(key)).__name__}")
    need("layers", isinstance(blob["layers"], str), "a JSON string")
    need("mha", isinstance(blob["mha"], list) and all(isinstance(n, str) for n in blob["mha"]),
         "a list of module names")
    need("state", isinstance(blob["state"], dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob["state"].items()),
        "a dict of named tensors")
    need("sha256", isinstance(blob["sha256"], dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in blob["sha256"].items()),
        "a dict of hex digests")
    for key in ("info", "baseline"):
        need(key, blob.get(key) is None or isinstance(blob[key], str), "a JSON string or None")
    if version >= 2:
        need("sections_sha256", isinstance(blob["sections_sha256"], dict),
             "a dict of hex digests")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v, n=None) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(_is_int(i) and i >= 0 for i in v))


def _check_layers(path: str, layers: Any) -> None:
    """The layer table's structure and every saved parameter's type and range,
    so that a malformed (but checksum-consistent) file fails here, by name,
    instead of deep inside a module constructor."""
    if not isinstance(layers, dict):
        raise _corrupt(path, "layers", f"expected a JSON object, got {type(layers).__name__}")
    for name, entry in layers.items():
        def bad(msg):
            return _corrupt(path, "layers", f"layer '{name}': {msg}")
        if not isinstance(entry, dict):
            raise bad(f"expected an object, got {type(entry).__name__}")
        cls_name = entry.get("class")
        if cls_name not in _FLOAT_OF:
            raise bad(f"unknown layer class {cls_name!r}")
        extra = entry.get("extra")
        if not isinstance(extra, dict) or not isinstance(extra.get("params"), dict):
            raise bad("'extra' must be an object with a 'params' object")
        p = extra["params"]
        checks = []
        if cls_name in _EXP:
            dims = 2 if cls_name == "ExpLinear" else 4
            checks = [
                ("bits", _is_int(p.get("bits")) and 2 <= p["bits"] <= 7, "an int in [2, 7]"),
                ("alpha", _is_num(p.get("alpha")) and p["alpha"] > 1, "a finite number > 1"),
                ("sw", _is_num(p.get("sw")) and p["sw"] > 0, "a finite number > 0"),
                ("sa", _is_num(p.get("sa")) and p["sa"] > 0, "a finite number > 0"),
                ("bw", _is_num(p.get("bw")), "a finite number"),
                ("ba", _is_num(p.get("ba")), "a finite number"),
                ("a_signed", isinstance(p.get("a_signed"), bool), "a bool"),
                ("w_signed", isinstance(p.get("w_signed"), bool), "a bool"),
                ("rounding", p.get("rounding") in ROUNDINGS, f"one of {ROUNDINGS}"),
                ("w_shape", _int_list(p.get("w_shape"), dims), f"{dims} non-negative ints"),
            ]
            mode = extra.get("mode", "lut")
            if mode not in MODES:
                raise bad(f"mode must be one of {MODES}, got {mode!r}")
            cb = extra.get("counter_bits")
            if cb is not None and not (_is_int(cb) and 2 <= cb <= 32):
                raise bad(f"counter_bits must be None or an int in [2, 32], got {cb!r}")
            if not isinstance(extra.get("info", {}), dict):
                raise bad("'info' must be an object")
        else:
            a_bits = p.get("a_bits")
            checks = [
                ("w_bits", _is_int(p.get("w_bits")) and 2 <= p["w_bits"] <= 16, "an int"),
                ("a_bits", a_bits is None or (_is_int(a_bits) and 2 <= a_bits <= 16),
                 "None or an int"),
                ("w_scale", _is_num(p.get("w_scale")) and p["w_scale"] > 0,
                 "a finite number > 0"),
                ("a_scale", _is_num(p.get("a_scale")) and p["a_scale"] > 0,
                 "a finite number > 0"),
                ("a_zero", _is_num(p.get("a_zero")), "a finite number"),
                ("a_signed", isinstance(p.get("a_signed"), bool), "a bool"),
                ("w_signed", isinstance(p.get("w_signed"), bool), "a bool"),
            ]
        for key, ok, what in checks:
            if not ok:
                raise bad(f"parameter {key!r} must be {what}, got {p.get(key)!r}")
        if cls_name in ("ExpConv2d", "UniformConv2d"):
            g = entry.get("geometry")
            pad = g.get("padding") if isinstance(g, dict) else None
            if not (isinstance(g, dict) and _int_list(g.get("stride"), 2)
                    and _int_list(g.get("dilation"), 2) and _is_int(g.get("groups"))
                    and (pad in ("same", "valid") or _int_list(pad, 2))):
                raise bad(f"malformed conv geometry {g!r}")


def _mismatch(path: str, msg: str) -> DnateqFileError:
    return DnateqFileError(f"dnateq.load: {path!r} does not match float_model: {msg}")


def load(path: PathLike, float_model: nn.Module) -> nn.Module:
    """Rebuild a quantized model saved with :func:`save` on a copy of
    ``float_model`` (the unquantized architecture the file came from; its
    float weights are replaced by the file's). ``float_model`` is unchanged.
    Raises :class:`DnateqFileError` for corrupt, truncated or mismatched
    files, ``FileNotFoundError`` when ``path`` does not exist."""
    if not isinstance(float_model, nn.Module):
        raise TypeError(f"dnateq.load: float_model must be an nn.Module, got "
                        f"{type(float_model).__name__}")
    path = os.fspath(path)
    blob = _read(path)
    work = copy.deepcopy(float_model)
    was_training = float_model.training
    names = dict(work.named_modules())
    for n in blob["mha"]:
        m = names.get(n)
        if isinstance(m, ExpMultiheadAttention):
            continue   # the float model was built with split attention already
        if not isinstance(m, nn.MultiheadAttention):
            raise _mismatch(path, f"'{n}' should be nn.MultiheadAttention, found "
                                  f"{type(m).__name__ if m is not None else 'nothing'}")
        _set_module(work, n, ExpMultiheadAttention.from_float(m))
    names = dict(work.named_modules())
    aliases = module_aliases(work)   # a layer shared under several names stays shared
    state = blob["state"]
    for n, entry in blob["layers"].items():
        cls_name = entry["class"]   # validated by _read
        m = names.get(n)
        if m is not None and is_conv1d(m) and _FLOAT_OF[cls_name] is nn.Linear:
            m = conv1d_as_linear(m)   # quantized as the equivalent Linear
        if type(m) is not _FLOAT_OF[cls_name] and not isinstance(m, _FLOAT_OF[cls_name]):
            raise _mismatch(path, f"layer '{n}' should be {_FLOAT_OF[cls_name].__name__}, "
                                  f"found {type(m).__name__ if m is not None else 'nothing'}")
        try:
            q = _rebuild(m, cls_name, entry, state, n)
        except DnateqFileError:
            raise
        except Exception as e:
            raise _mismatch(path, f"layer '{n}': {type(e).__name__}: {e}") from None
        for a in [n] + aliases.get(n, []):
            _set_module(work, a, q)
    # Everything else (float layers, norms, embeddings) loads strictly.
    qprefixes = tuple(a + "." for n in blob["layers"] for a in [n] + aliases.get(n, []))
    rest = {k: v for k, v in state.items() if not k.startswith(qprefixes)}
    expected = {k for k, v in work.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.startswith(qprefixes)}
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unexpected:
        raise _mismatch(path, f"missing tensors {missing[:5]}, unexpected tensors "
                              f"{unexpected[:5]}")
    try:
        work.load_state_dict(rest, strict=False)
    except RuntimeError as e:
        raise _mismatch(path, str(e)) from None
    _disable_fast_paths(work)
    work.train(was_training)
    if blob.get("info") is not None:
        work.dnateq_info = blob["info"]
    if blob.get("baseline") is not None:
        work.dnateq_baseline = blob["baseline"]
    return work


def _rebuild(float_layer: nn.Module, cls_name: str, entry: Dict[str, Any],
             state: Dict[str, torch.Tensor], name: str) -> nn.Module:
    extra = entry["extra"]
    p = extra["params"]
    bias = state.get(f"{name}.bias")
    has_bias = float_layer.bias is not None
    # A DNA-TEQ layer may carry a bias its float layer lacks: bias correction
    # (dnateq.quantize's "bias_correction" pass) adds one.
    if (bias is not None) != has_bias and not (bias is not None and cls_name in _EXP):
        raise ValueError(f"bias {'present' if bias is not None else 'absent'} in the file but "
                         f"{'present' if has_bias else 'absent'} in float_model")
    if cls_name in _EXP:
        want = list(p["w_shape"])
        if list(float_layer.weight.shape) != want:
            raise ValueError(f"weight shape {list(float_layer.weight.shape)} in float_model, "
                             f"{want} in the file")
        packed = state.get(f"{name}.w_packed")
        if packed is None:
            raise ValueError("the file lacks its packed codes")
        bits, signed = int(p["bits"]), bool(p["w_signed"])
        # Validates the packed size against the shape and bits before use.
        codes = ops.exp_unpack(packed, bits, signed, want)
        cls = _EXP[cls_name]
        q = cls.from_float(float_layer, bits, (p["alpha"], p["sw"], p["bw"]),
                           (p["alpha"], p["sa"], p["ba"]), p["a_signed"], p["rounding"],
                           extra.get("mode", "lut"))
        q.set_extra_state(extra)
        q.w_packed = packed.clone()
        q.w_terms = ops.weight_terms(codes, bits)
        _load_channel_buffers(q, state, name, want)
        q._refresh_layout()
    else:
        w_int = state.get(f"{name}.w_int")
        if w_int is None:
            raise ValueError("the file lacks its integer weights")
        if list(float_layer.weight.shape) != list(w_int.shape):
            raise ValueError(f"weight shape {list(float_layer.weight.shape)} in float_model, "
                             f"{list(w_int.shape)} in the file")
        cls = _UNIFORM[cls_name]
        a_bits = p["a_bits"]
        q = cls.from_float(float_layer, int(p["w_bits"]), a_bits,
                           (0.0, 1.0) if a_bits is not None else None)
        q.set_extra_state(extra)
        q.w_int = w_int.clone()
    geo = entry.get("geometry")
    if geo is not None:
        have = _geometry(q)
        if have != geo:
            raise ValueError(f"conv geometry {have} in float_model, {geo} in the file")
    if bias is not None:
        q.bias = bias.clone().float()
    return q.to(float_layer.weight.device)


def _load_channel_buffers(q: nn.Module, state: Dict[str, torch.Tensor], name: str,
                          w_shape) -> None:
    """w_scale/w_offset/smooth (format version 3; absent: None), validated."""
    for buf, n in (("w_scale", w_shape[0]), ("w_offset", w_shape[0]),
                   ("smooth", q._smooth_len())):
        t = state.get(f"{name}.{buf}")
        if t is not None and (t.dtype != torch.float32 or list(t.shape) != [n]
                              or not bool(torch.isfinite(t).all())):
            raise ValueError(f"{buf} must be finite float32 [{n}], got {t.dtype} "
                             f"{list(t.shape)}")
        setattr(q, buf, None if t is None else t.clone())
    if (q.w_scale is None) != (q.w_offset is None):
        raise ValueError("w_scale and w_offset must be saved together")


def _geometry(m: nn.Module) -> Dict[str, Any]:
    return {"stride": list(_tuple(m.stride)), "dilation": list(_tuple(m.dilation)),
            "groups": int(m.groups), "padding": m.padding if isinstance(m.padding, str)
            else list(_tuple(m.padding))}
