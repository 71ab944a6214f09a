"""The quality measure of calibration (SPEC section 3, item 6): the user's
``eval_fn``, or a proxy comparing the model's outputs with the float model's
on held-out loader inputs."""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..eval import distributed as _dist
from .call import ModelCall, comparable_output, select_valid

__all__ = ["proxy_quality", "Quality", "mean_cosine", "Fidelity"]


def proxy_quality(ref_outputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                  kinds: Optional[Sequence[str]] = None,
                  masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> float:
    """The proxy quality in percent: top-1 agreement with the float model for
    ``[B, C]`` logits, else 100 x mean cosine similarity (per sample, or per
    valid token of ``[B, T, ...]`` outputs where ``masks`` give ``[B, T]``).
    ``kinds`` (from :func:`~dnateq.calibration.call.comparable_output`):
    ``"logits"`` always compares the top-1 (per valid token for ``[B, T, C]``);
    ``"hidden"`` and ``"embedding"`` always the cosine; ``"tensor"`` (a plain
    output) the top-1 for 2-D ``[B, C > 1]`` and the cosine otherwise."""
    agree, total, cos = 0.0, 0, []
    n = len(ref_outputs)
    kinds = list(kinds) if kinds is not None else ["tensor"] * n
    masks = list(masks) if masks is not None else [None] * n
    for r, o, kind, m in zip(ref_outputs, outputs, kinds, masks):
        r, o = r.float(), o.float()
        masked = m is not None and r.dim() >= 3 and tuple(r.shape[:2]) == tuple(m.shape)
        if masked:
            r, o = select_valid(r, m), select_valid(o, m)
        top1 = (kind == "logits" and r.dim() == 2) or (
            kind == "tensor" and r.dim() == 2 and r.shape[1] > 1 and not masked)
        if top1:
            agree += float((r.argmax(1) == o.argmax(1)).sum())
            total += r.shape[0]
        else:
            rr = r.reshape(r.shape[0], -1) if r.dim() > 1 else r.reshape(1, -1)
            oo = o.reshape(rr.shape)
            cos.append(torch.nn.functional.cosine_similarity(rr, oo, dim=1, eps=1e-12))
    if _dist.is_distributed():
        # every rank holds its own held-out batches: the quality of the union
        c = torch.cat(cos) if cos else torch.zeros(0)
        agree, total, csum, cn = _dist.all_reduce_sum(
            [agree, total, float(c.double().sum()), c.numel()]).tolist()
        return 100.0 * agree / total if total else 100.0 * csum / cn
    if total:
        return 100.0 * agree / total
    return 100.0 * float(torch.cat(cos).mean())


class Quality:
    """``quality()`` of ``model`` in its current state, higher is better:
    ``eval_fn(model)`` when given, else :func:`proxy_quality` against the
    outputs the model gave on ``inputs`` when this object was made (i.e. the
    float model's), the inputs run through ``call`` (a
    :class:`~dnateq.calibration.call.ModelCall`; its mask selects the valid
    tokens compared). ``metric`` is ``"eval_fn"`` or ``"proxy"``; ``label``
    names the inputs in error messages (``"held-out batch"``)."""

    def __init__(self, model: nn.Module, eval_fn: Optional[Callable[[nn.Module], float]] = None,
                 inputs: Sequence[Any] = (), who: str = "dnateq.quantize",
                 call: Optional[ModelCall] = None, label: str = "held-out batch"):
        self.model, self.eval_fn, self.who, self.label = model, eval_fn, who, label
        self.call = call if call is not None else ModelCall(who=who)
        self.inputs: List[Any] = list(inputs)
        self.metric = "eval_fn" if eval_fn is not None else "proxy"
        self.ref: List[torch.Tensor] = []
        self.kinds: List[str] = []
        self.masks: List[Optional[torch.Tensor]] = []
        if eval_fn is None:
            with torch.no_grad():
                for i, x in enumerate(self.inputs):
                    t, kind = self._output(i, x)
                    self.ref.append(t.detach())
                    self.kinds.append(kind)
                    self.masks.append(self.call.mask_of(x))

    def _output(self, i: int, x: Any):
        what = f"{self.label} {i}"
        out = self.call.run(self.model, x, what)
        t, kind = comparable_output(out)
        if t is None:
            raise TypeError(f"{self.who}: cannot find a tensor in the model output "
                            f"({type(out).__name__}) on {what} for the proxy metric (it "
                            "compares sentence_embedding, logits, last_hidden_state or the "
                            "first tensor); pass eval_fn")
        return t, kind

    def __call__(self) -> float:
        self.model.eval()
        if self.eval_fn is not None:
            q = float(self.eval_fn(self.model))
        else:
            with torch.no_grad():
                q = proxy_quality(self.ref, [self._output(i, x)[0]
                                             for i, x in enumerate(self.inputs)],
                                  self.kinds, self.masks)
        if not math.isfinite(q):
            raise ValueError(f"{self.who}: the quality metric returned {q}")
        return q


def mean_cosine(ref_outputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> float:
    """Mean cosine similarity of ``outputs`` to ``ref_outputs``: per sample of
    ``[B, ...]`` outputs, or per valid token of ``[B, T, ...]`` outputs where
    ``masks`` give ``[B, T]`` (logits included: it measures how far the outputs
    moved, whatever the task reads from them)."""
    masks = list(masks) if masks is not None else [None] * len(ref_outputs)
    cos = []
    for r, o, m in zip(ref_outputs, outputs, masks):
        r, o = r.float(), o.float()
        if m is not None and r.dim() >= 3 and tuple(r.shape[:2]) == tuple(m.shape):
            r, o = select_valid(r, m), select_valid(o, m)
        rr = r.reshape(r.shape[0], -1) if r.dim() > 1 else r.reshape(1, -1)
        cos.append(torch.nn.functional.cosine_similarity(rr, o.reshape(rr.shape), dim=1,
                                                         eps=1e-12))
    c = torch.cat(cos) if cos else torch.zeros(0)
    if _dist.is_distributed():
        csum, cn = _dist.all_reduce_sum([float(c.double().sum()), c.numel()]).tolist()
        return csum / cn if cn else 1.0
    return float(c.double().mean()) if c.numel() else 1.0


class Fidelity:
    """``fidelity()``: the mean cosine (:func:`mean_cosine`) of ``model``'s
    comparable outputs (``comparable_output``: sentence_embedding, logits,
    last_hidden_state or the first tensor) to the ones it gave on ``inputs``
    when this object was made (the float model's), valid tokens only. The
    output-fidelity floor of calibration (``QuantizeConfig.min_cosine``) holds
    each candidate configuration to it, beside the quality loss: a task
    metric measured on few samples is noisy, and the floor keeps a
    configuration that drifted far from the float model out even when the
    noisy metric happens to pass it."""

    def __init__(self, model: nn.Module, inputs: Sequence[Any], call: ModelCall,
                 who: str = "dnateq.quantize", label: str = "held-out batch"):
        self.model, self.call, self.who, self.label = model, call, who, label
        self.inputs: List[Any] = list(inputs)
        self.ref: List[torch.Tensor] = []
        self.masks: List[Optional[torch.Tensor]] = []
        with torch.no_grad():
            for i, x in enumerate(self.inputs):
                self.ref.append(self._output(i, x).detach())
                self.masks.append(self.call.mask_of(x))

    def _output(self, i: int, x: Any) -> torch.Tensor:
        what = f"{self.label} {i}"
        t, _ = comparable_output(self.call.run(self.model, x, what))
        if t is None:
            raise TypeError(f"{self.who}: cannot find a tensor in the model output on {what} "
                            "for the output-fidelity floor (min_cosine); pass min_cosine=None")
        return t

    def __call__(self) -> float:
        self.model.eval()
        with torch.no_grad():
            c = mean_cosine(self.ref, [self._output(i, x) for i, x in enumerate(self.inputs)],
                            self.masks)
        if not math.isfinite(c):
            raise ValueError(f"{self.who}: the output-fidelity measure returned {c}")
        return c
