"""The quality measure of calibration (SPEC section 3, item 6): the user's
``eval_fn``, or a proxy comparing the model's outputs with the float model's
on held-out loader inputs."""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from .._common import first_tensor
from ..eval import distributed as _dist

__all__ = ["proxy_quality", "Quality"]


def proxy_quality(ref_outputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """The proxy quality in percent: top-1 agreement with the float model for
    ``[B, C]`` logits, else 100 x mean cosine similarity (per sample)."""
    agree, total, cos = 0.0, 0, []
    for r, o in zip(ref_outputs, outputs):
        r, o = r.float(), o.float()
        if r.dim() == 2 and r.shape[1] > 1:
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
    float model's). ``metric`` is ``"eval_fn"`` or ``"proxy"``."""

    def __init__(self, model: nn.Module, eval_fn: Optional[Callable[[nn.Module], float]] = None,
                 inputs: Sequence[Any] = (), who: str = "dnateq.quantize"):
        self.model, self.eval_fn, self.who = model, eval_fn, who
        self.inputs: List[Any] = list(inputs)
        self.metric = "eval_fn" if eval_fn is not None else "proxy"
        self.ref: List[torch.Tensor] = []
        if eval_fn is None:
            with torch.no_grad():
                self.ref = [self._output(x).detach() for x in self.inputs]

    def _output(self, x: Any) -> torch.Tensor:
        out = self.model(x)
        t = first_tensor(out)
        if t is None:
            raise TypeError(f"dnateq.quantize: cannot find a tensor in the model output "
                            f"({type(out).__name__}) for the proxy metric; pass eval_fn")
        return t

    def __call__(self) -> float:
        self.model.eval()
        if self.eval_fn is not None:
            q = float(self.eval_fn(self.model))
        else:
            with torch.no_grad():
                q = proxy_quality(self.ref, [self._output(x) for x in self.inputs])
        if not math.isfinite(q):
            raise ValueError(f"{self.who}: the quality metric returned {q}")
        return q
