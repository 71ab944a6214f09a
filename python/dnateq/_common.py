"""Foundation helpers shared by calibration, baselines, analysis, persistence,
evaluation and the hardware model: module access by dotted name, layer-name
patterns, devices, loader batches, model outputs, argument checks and progress
bars. One copy each; everything else imports them from here."""
from __future__ import annotations

import fnmatch
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["get_parent", "get_module", "set_module", "matches", "model_device", "to_device",
           "first_tensor", "batch_input", "INPUT_KEYS", "describe", "progress", "check_bits"]

#: Keys tried, in order, to find the model input in a dict batch; when none is
#: present the first tensor value of the dict is used.
INPUT_KEYS = ("input", "inputs", "x", "pixel_values", "input_ids", "image", "images")


# ---------------------------------------------------------------------------
# modules by dotted name
# ---------------------------------------------------------------------------

def get_parent(root: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """The module holding ``name`` (a dotted ``named_modules`` name) and the
    attribute under which it holds it."""
    parts = name.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = get_parent(root, name)
    setattr(parent, attr, module)


def get_module(root: nn.Module, name: str) -> nn.Module:
    parent, attr = get_parent(root, name)
    return getattr(parent, attr)


def matches(name: str, patterns) -> bool:
    """Whether a layer name is selected by ``patterns`` (None: no; a name, a
    prefix naming a submodule, or an ``fnmatch`` pattern; one or a sequence)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p)
               for p in patterns)


# ---------------------------------------------------------------------------
# devices, batches, outputs
# ---------------------------------------------------------------------------

def model_device(model: nn.Module, default: Optional[torch.device] = torch.device("cpu")
                 ) -> Optional[torch.device]:
    """The device of the model's first parameter (else first buffer), else ``default``."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return default


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` with every tensor inside (tuples, lists, dicts, nested) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device) for t in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def first_tensor(out: Any) -> Optional[torch.Tensor]:
    """The first tensor of a module output (a tensor, a dict's values, a
    tuple/list's items, or an object's ``logits``), or None."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    t = getattr(out, "logits", None)
    return t if isinstance(t, torch.Tensor) else None


def batch_input(batch: Any, who: str = "dnateq.quantize") -> Any:
    """The model input of one loader batch: a tensor as is; the first item of a
    tuple/list; for a dict the value of the first key of :data:`INPUT_KEYS`
    present, else its first tensor value."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError(f"{who}: a loader batch is an empty tuple/list")
        return batch[0]
    if isinstance(batch, dict):
        for k in INPUT_KEYS:
            if k in batch:
                return batch[k]
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v
        raise ValueError(f"{who}: a dict batch has no tensor value (keys "
                         f"{list(batch)}); expected one of {INPUT_KEYS}")
    raise TypeError(f"{who}: loader batches must be tensors, tuples/lists or "
                    f"dicts, got {type(batch).__name__}")


def describe(x: Any) -> str:
    """A short description of a value for error messages (shapes of tensors,
    nested tuples/lists/dicts)."""
    if isinstance(x, torch.Tensor):
        return f"tensor {list(x.shape)} {x.dtype}"
    if isinstance(x, (tuple, list)):
        return type(x).__name__ + "(" + ", ".join(describe(v) for v in x) + ")"
    if isinstance(x, dict):
        return "dict(" + ", ".join(f"{k}={describe(v)}" for k, v in x.items()) + ")"
    return type(x).__name__


# ---------------------------------------------------------------------------
# arguments, progress
# ---------------------------------------------------------------------------

def check_bits(bits: Any, who: str = "dnateq", name: str = "bits", lo: int = 2, hi: int = 7
               ) -> int:
    """``bits`` as an int in ``[lo, hi]`` (not a bool or a float with a
    fraction), else a ``ValueError`` naming it (``TypeError`` from ``int()``
    for values that are no number at all)."""
    if isinstance(bits, bool) or int(bits) != bits or not lo <= int(bits) <= hi:
        raise ValueError(f"{who}: {name} must be in [{lo}, {hi}], got {bits}")
    return int(bits)


def progress(it, enabled: bool, **kw):
    """``it`` wrapped in a tqdm bar when ``enabled`` (and tqdm is installed)."""
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, **kw)
