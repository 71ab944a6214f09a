"""Saving and loading quantized models: ``dnateq.save`` / ``dnateq.load`` (SPEC section 6).

The file holds what the quantized model needs and nothing derived: the packed
weight codes of every quantized layer (``w_packed``, so the file size follows
the bits), its static parameters, the float tensors of the layers left in
float (batch norms, embeddings, skipped layers), the names of the attention
modules that were split into Q/K/V/out, the calibration record as JSON, and a
SHA-256 per tensor. ``w_terms`` (C2/C4) are recomputed from the codes on load.
Uniform-baseline layers (:mod:`dnateq.baselines`) are saved too, their
integers as int8/int16 (not bit-packed: the baseline is for comparisons).
The architecture is not pickled: :func:`load` rebuilds it from the float model
the caller passes, so a file can only be loaded onto the model it came from,
and loading never executes code from the file (``torch.load(weights_only=True)``).

Container: ``torch.save`` of a dict (a zip archive). Errors are
:class:`DnateqFileError` (a ``ValueError``) naming the file and what is wrong:
not a dnateq file, truncated/corrupt archive, checksum mismatch, newer format,
or a float model that does not match (missing layer, wrong type or shape).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any, Dict, Union

import torch
import torch.nn as nn

from .calibrate import _disable_fast_paths, _set_module
from .nn.modules import ExpConv2d, ExpLinear, ExpMultiheadAttention
from .nn.uniform import UniformConv2d, UniformLinear
from . import ops

__all__ = ["save", "load", "DnateqFileError", "FORMAT_VERSION"]

MAGIC = "dnateq-quantized-model"
FORMAT_VERSION = 1

_EXP = {"ExpLinear": ExpLinear, "ExpConv2d": ExpConv2d}
_UNIFORM = {"UniformLinear": UniformLinear, "UniformConv2d": UniformConv2d}
_FLOAT_OF = {"ExpLinear": nn.Linear, "ExpConv2d": nn.Conv2d, "UniformLinear": nn.Linear,
             "UniformConv2d": nn.Conv2d}
# Buffers a quantized layer rebuilds on load instead of storing.
_DERIVED = ("w_terms",)

PathLike = Union[str, "os.PathLike[str]"]


class DnateqFileError(ValueError):
    """A dnateq file that cannot be loaded (corrupt, truncated, mismatched)."""


def _digest(t: torch.Tensor) -> str:
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(b).hexdigest()


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
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DnateqFileError(f"dnateq.load: {path!r} has format version {version!r}; this "
                              f"dnateq reads up to {FORMAT_VERSION} (upgrade dnateq)")
    for key in ("layers", "mha", "state", "sha256"):
        if key not in blob:
            raise DnateqFileError(f"dnateq.load: {path!r} lacks its {key!r} section (corrupt)")
    state, sums = blob["state"], blob["sha256"]
    if set(state) != set(sums):
        raise DnateqFileError(f"dnateq.load: {path!r} is corrupt: the tensor list and the "
                              "checksum list differ")
    for k, t in state.items():
        if not isinstance(t, torch.Tensor) or _digest(t) != sums[k]:
            raise DnateqFileError(f"dnateq.load: {path!r} is corrupt: tensor {k!r} fails its "
                                  "SHA-256 check")
    try:
        blob["layers"] = json.loads(blob["layers"])
    except (TypeError, ValueError) as e:
        raise DnateqFileError(f"dnateq.load: {path!r} is corrupt: bad layer table ({e})") from None
    return blob


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
    state = blob["state"]
    for n, entry in blob["layers"].items():
        cls_name = entry.get("class")
        if cls_name not in _FLOAT_OF:
            raise DnateqFileError(f"dnateq.load: {path!r} is corrupt: unknown layer class "
                                  f"{cls_name!r} for '{n}'")
        m = names.get(n)
        if type(m) is not _FLOAT_OF[cls_name] and not isinstance(m, _FLOAT_OF[cls_name]):
            raise _mismatch(path, f"layer '{n}' should be {_FLOAT_OF[cls_name].__name__}, "
                                  f"found {type(m).__name__ if m is not None else 'nothing'}")
        try:
            q = _rebuild(m, cls_name, entry, state, n)
        except DnateqFileError:
            raise
        except Exception as e:
            raise _mismatch(path, f"layer '{n}': {type(e).__name__}: {e}") from None
        _set_module(work, n, q)
    # Everything else (float layers, norms, embeddings) loads strictly.
    qprefixes = tuple(n + "." for n in blob["layers"])
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
        work.dnateq_info = json.loads(blob["info"])
    if blob.get("baseline") is not None:
        work.dnateq_baseline = json.loads(blob["baseline"])
    return work


def _rebuild(float_layer: nn.Module, cls_name: str, entry: Dict[str, Any],
             state: Dict[str, torch.Tensor], name: str) -> nn.Module:
    extra = entry["extra"]
    p = extra["params"]
    bias = state.get(f"{name}.bias")
    has_bias = float_layer.bias is not None
    if (bias is not None) != has_bias:
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


def _geometry(m: nn.Module) -> Dict[str, Any]:
    return {"stride": list(_tuple(m.stride)), "dilation": list(_tuple(m.dilation)),
            "groups": int(m.groups), "padding": m.padding if isinstance(m.padding, str)
            else list(_tuple(m.padding))}
