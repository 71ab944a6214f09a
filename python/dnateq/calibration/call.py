"""How calibration runs the model on a loader batch, which token positions it
traces, and which output the proxy compares (SPEC section 9, "Calling models").

- A tensor batch is the input: ``model(x)``. A tuple/list batch: its first item
  (``model(batch[0])``, e.g. ``(images, labels)``).
- A dict batch is passed as keyword arguments, the Hugging Face convention:
  ``model(**batch)`` (every tensor moved to the model's device).
- ``forward=fn`` calls ``fn(model, batch)`` instead (the whole batch moved to
  the device), for any other convention, e.g. sentence-transformers'
  ``lambda model, batch: model(batch)``.
- The mask: by default a dict batch's ``"attention_mask"`` (``[B, T]``, nonzero
  = a valid token); ``mask=fn`` takes ``fn(batch)`` (a ``[B, T]`` tensor or
  None); ``mask=False`` never masks. Where a layer's input is ``[B, T, ...]``
  with the mask's ``[B, T]``, only the valid positions are traced, and the
  proxy compares only valid positions of ``[B, T, ...]`` outputs.
- The output the proxy compares (:func:`comparable_output`): for dict-like
  outputs (``ModelOutput``, sentence-transformers' dict) ``sentence_embedding``,
  else ``logits``, else ``last_hidden_state``, else the first tensor value; for
  tuples the first tensor; ``.logits`` of other objects.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn as nn

from .._common import batch_input, describe, to_device

__all__ = ["ModelCall", "comparable_output", "select_valid", "OUTPUT_KEYS"]

#: Keys of dict-like model outputs the proxy compares, in order of preference,
#: with the kind of comparison each gets.
OUTPUT_KEYS = (("sentence_embedding", "embedding"), ("logits", "logits"),
               ("last_hidden_state", "hidden"))


def _is_mapping(x: Any) -> bool:
    return isinstance(x, dict) or (hasattr(x, "keys") and hasattr(x, "__getitem__")
                                   and not isinstance(x, torch.Tensor))


def comparable_output(out: Any) -> Tuple[Optional[torch.Tensor], str]:
    """``(tensor, kind)`` of a model output for the proxy: ``kind`` is
    ``"embedding"``, ``"logits"``, ``"hidden"`` or ``"tensor"`` (a plain tensor
    or the first tensor found); ``(None, "")`` when there is none."""
    if isinstance(out, torch.Tensor):
        return out, "tensor"
    if _is_mapping(out):
        for key, kind in OUTPUT_KEYS:
            v = out.get(key) if hasattr(out, "get") else None
            if isinstance(v, torch.Tensor):
                return v, kind
        for k in out.keys():
            if isinstance(out[k], torch.Tensor):
                return out[k], "tensor"
        return None, ""
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v, "tensor"
        return None, ""
    t = getattr(out, "logits", None)
    if isinstance(t, torch.Tensor):
        return t, "logits"
    return None, ""


def select_valid(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The valid positions ``x[mask]`` (``[n_valid, ...]``) where ``x`` is
    ``[B, T, ...]`` (at least 3-D) and ``mask`` is ``[B, T]``; else ``x``."""
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(device=x.device) != 0]


class ModelCall:
    """The calling convention of one calibration (see the module docstring)."""

    def __init__(self, forward: Optional[Callable[[nn.Module, Any], Any]] = None,
                 mask: Any = None, who: str = "dnateq.quantize"):
        if forward is not None and not callable(forward):
            raise TypeError(f"{who}: forward must be callable (model, batch) -> output, got "
                            f"{type(forward).__name__}")
        if not (mask is None or mask is False or callable(mask)):
            raise TypeError(f"{who}: mask must be None (the batch's attention_mask), False "
                            f"(no mask) or callable (batch -> [B, T] tensor or None), got "
                            f"{type(mask).__name__}")
        self.forward, self.mask, self.who = forward, mask, who

    def prepare(self, batch: Any, device: torch.device, what: str = "loader batch 0") -> Any:
        """The input of one loader batch, on ``device``."""
        if self.forward is not None:
            return to_device(batch, device)
        if isinstance(batch, dict):
            if not any(isinstance(v, torch.Tensor) for v in batch.values()):
                raise ValueError(f"{self.who}: {what} is a dict without a tensor value (keys "
                                 f"{list(batch)}); dict batches are passed as model(**batch), "
                                 "or pass forward=lambda model, batch: ...")
            return to_device(batch, device)
        return to_device(batch_input(batch, self.who), device)

    def __call__(self, model: nn.Module, x: Any) -> Any:
        if self.forward is not None:
            return self.forward(model, x)
        if isinstance(x, dict):
            return model(**x)
        return model(x)

    def how(self, x: Any) -> str:
        """How ``x`` is passed, for error messages."""
        if self.forward is not None:
            return f"forward(model, batch) with batch {describe(x)}"
        if isinstance(x, dict):
            return f"model(**batch) with batch {describe(x)}"
        return f"model(input) with input {describe(x)}"

    def run(self, model: nn.Module, x: Any, what: str) -> Any:
        """``self(model, x)``; errors re-raised as a RuntimeError naming ``what``."""
        try:
            return self(model, x)
        except Exception as e:
            if str(e).startswith(self.who):
                raise
            hint = ""
            if isinstance(e, TypeError) and self.forward is None and isinstance(x, dict):
                hint = ("; dict batches are passed as model(**batch): pass "
                        "forward=lambda model, batch: ... for another convention")
            raise RuntimeError(f"{self.who}: the model cannot take {what} "
                               f"({self.how(x)}): {type(e).__name__}: {e}{hint}") from e

    def mask_of(self, x: Any) -> Optional[torch.Tensor]:
        """The ``[B, T]`` validity mask of a prepared batch, or None."""
        if self.mask is False:
            return None
        if callable(self.mask):
            m = self.mask(x)
            if m is not None and not isinstance(m, torch.Tensor):
                raise TypeError(f"{self.who}: mask(batch) must return a tensor or None, got "
                                f"{type(m).__name__}")
            return m
        if isinstance(x, dict) and isinstance(x.get("attention_mask"), torch.Tensor):
            return x["attention_mask"]
        return None
