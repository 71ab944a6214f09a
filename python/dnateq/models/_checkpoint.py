"""Reading local checkpoints with clear errors (shared by the model builders).

``torch.load(..., weights_only=True)`` is tried first: it reads state dicts
(also nested in ``{"state_dict": ...}``, ``{"model": ...}`` wrappers) without
running code from the file. A whole pickled ``nn.Module`` needs the unsafe
loader, which executes arbitrary code; it is used only when the caller says
the file is trusted (``trust_checkpoint=True``).
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

__all__ = ["read_state_dict", "load_into", "looks_like_path"]

#: Wrapper keys of common training scripts, tried in order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
#: Prefixes added by DataParallel/DDP and torch.compile.
PREFIXES = ("module.", "_orig_mod.")


def looks_like_path(s: Any) -> bool:
    """A string meant as a file (not an enum name): has a path separator or a
    checkpoint suffix, or exists."""
    if isinstance(s, os.PathLike):
        return True
    if not isinstance(s, str):
        return False
    return (os.sep in s or "/" in s or s.endswith((".pth", ".pt", ".th", ".bin", ".ckpt", ".tar"))
            or os.path.exists(s))


def read_state_dict(path: Union[str, os.PathLike], *, what: str,
                    trust_checkpoint: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (a state dict, a wrapper dict holding
    one, or — with ``trust_checkpoint`` — a whole pickled module), with
    ``module.``/``_orig_mod.`` prefixes removed. ``what`` names the caller in
    error messages."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: checkpoint weights={path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_checkpoint and not _is_unsafe_refusal(e):
            raise RuntimeError(f"{what}: cannot read checkpoint {path!r}: the file is corrupt, "
                               "truncated or not a PyTorch checkpoint (weights_only=True: "
                               f"{_last_line(e)})") from None
        if not trust_checkpoint:
            raise RuntimeError(
                f"{what}: checkpoint {path!r} holds pickled Python objects (e.g. a whole "
                "nn.Module), and loading those runs code from the file. Save "
                "model.state_dict() instead, or pass trust_checkpoint=True if you trust "
                f"the file.{_refusal_detail(e)}") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise RuntimeError(f"{what}: cannot read checkpoint {path!r}: "
                               f"{type(e2).__name__}: {e2}") from None
    except Exception as e:
        raise RuntimeError(f"{what}: cannot read checkpoint {path!r}: the file is corrupt, "
                           f"truncated or not a PyTorch checkpoint ({type(e).__name__}: "
                           f"{e})") from None
    return _extract(obj, path, what)


def _is_unsafe_refusal(e: Exception) -> bool:
    # weights_only=True names the globals it refuses ("Unsupported global:
    # GLOBAL torch.nn...Linear"); its other complaints ("Unsupported operand")
    # mean the bytes are not a pickle it can parse: a damaged file.
    s = str(e)
    return "Unsupported global" in s or "not an allowed global" in s


def _last_line(e: Exception) -> str:
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
    return m.group(1).strip() if m else str(e).strip().splitlines()[-1][:200]


def _refusal_detail(e: Exception) -> str:
    m = re.search(r"Unsupported global: ([^\n]*)", str(e))
    return f" (weights_only=True refused {m.group(1).strip()})" if m else ""


def _extract(obj: Any, path: str, what: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for _ in range(2):   # e.g. {"model": {"state_dict": ...}} at most two deep
        if isinstance(obj, Mapping) and not _is_state_dict(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj), None)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        kind = type(obj).__name__
        keys = list(obj)[:8] if isinstance(obj, Mapping) else None
        raise RuntimeError(f"{what}: checkpoint {path!r} holds no state dict (a {kind}"
                           + (f" with keys {keys}" if keys is not None else "") + ")")
    out = {}
    for k, v in obj.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _is_state_dict(d: Mapping) -> bool:
    return len(d) > 0 and all(isinstance(k, str) for k in d) and all(
        isinstance(v, torch.Tensor) for v in d.values())


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str,
              source: Optional[str] = None) -> nn.Module:
    """``model.load_state_dict(state)`` (strict) with an error naming the
    missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing: list = []
    unexpected: list = []
    if not shapes:
        # strict=False, then our own check: modules' load hooks may legitimately
        # fill keys (BatchNorm's num_batches_tracked of old checkpoints).
        res = model.load_state_dict(state, strict=False)
        missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
    if missing or unexpected or shapes:
        src = f" {source!r}" if source else ""
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:4]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
        raise RuntimeError(f"{what}: checkpoint{src} does not fit the model: "
                           + "; ".join(parts))
    return model
