"""Sentence-pair retrieval on real English text, for sentence-embedding models
(e.g. sentence-transformers, or a Hugging Face encoder mean-pooled).

The text ships with Python itself: the documentation topics of
``pydoc_data.topics`` (no download). :func:`sentence_pairs` cuts its prose
paragraphs into sentences and pairs neighbours (``(s0, s1), (s2, s3), ...``,
no sentence in two pairs). The task: embed every first sentence (the query)
and every second one (the document); a query is a hit when its own document is
the nearest of all documents by cosine similarity.

Typical use with :func:`dnateq.quantize`::

    from dnateq.eval import text as T
    pairs = T.sentence_pairs()
    task = T.TextRetrieval(tokenizer, pairs[:200])              # evaluation pairs
    calib = T.calibration_batches(tokenizer, T.sentences(pairs[200:]), batch_size=16)
    q = dnateq.quantize(model, calib, eval_fn=task.eval_fn, forward=task.forward)
    task.top1(q), task.cosine_to(q, model)

``forward`` is how the model is called on a tokenizer dict (``None``:
``model(**batch)``, the Hugging Face convention; sentence-transformers models
take ``model(batch)``, :data:`SENTENCE_TRANSFORMERS`). The embedding is the
output's ``sentence_embedding`` when present, else ``last_hidden_state`` (or
the first tensor) mean-pooled over the tokens ``attention_mask`` marks valid.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._common import model_device, to_device

__all__ = ["sentence_pairs", "sentences", "calibration_batches", "TextRetrieval", "embed",
           "SENTENCE_TRANSFORMERS"]


def SENTENCE_TRANSFORMERS(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Any:
    """The ``forward`` of sentence-transformers models: ``model(features)``."""
    return model(batch)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentence_pairs(min_words: int = 6, max_words: int = 40) -> List[Tuple[str, str]]:
    """Neighbouring sentence pairs from the prose of ``pydoc_data.topics``
    (sorted topics, code blocks left out; sentences of ``min_words`` to
    ``max_words`` words; deterministic). About 500 pairs."""
    import pydoc_data.topics as topics
    pairs: List[Tuple[str, str]] = []
    for key in sorted(topics.topics):
        for para in re.split(r"\n\s*\n", topics.topics[key]):
            if para.startswith("   ") or para.lstrip().startswith((">>>", "*", "+", "|")):
                continue   # indented code, prompts, lists, tables
            ss = [s for s in _SENTENCE_END.split(" ".join(para.split()))
                  if min_words <= len(s.split()) <= max_words]
            pairs.extend(zip(ss[0::2], ss[1::2]))
    return pairs


def sentences(pairs: Iterable[Tuple[str, str]]) -> List[str]:
    """Both sentences of every pair, in order."""
    return [s for p in pairs for s in p]


def calibration_batches(tokenizer: Callable, texts: Sequence[str], batch_size: int = 16,
                        max_length: int = 64) -> List[Dict[str, torch.Tensor]]:
    """Tokenizer dicts (padded per batch, truncated to ``max_length``) of
    ``texts``: a loader for :func:`dnateq.quantize`."""
    return [dict(tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def _embedding(out: Any, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if isinstance(out, dict) or hasattr(out, "keys"):
        if out.get("sentence_embedding") is not None:
            return out["sentence_embedding"]
        tok = out.get("last_hidden_state")
        if tok is None:
            tok = out.get("token_embeddings")
    elif isinstance(out, (tuple, list)):
        tok = out[0]
    else:
        tok = out
    if not isinstance(tok, torch.Tensor):
        raise TypeError(f"dnateq.eval.text: cannot find an embedding in the model output "
                        f"({type(out).__name__})")
    if tok.dim() == 3:
        if mask is None:
            return tok.mean(1)
        m = mask.to(tok.dtype).unsqueeze(-1)
        return (tok * m).sum(1) / m.sum(1).clamp_min(1.0)
    return tok


@torch.no_grad()
def embed(model: nn.Module, batches: Sequence[Dict[str, torch.Tensor]],
          forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> torch.Tensor:
    """L2-normalised float32 embeddings ``[N, D]`` of ``model`` over tokenizer
    dicts (see the module docstring for ``forward`` and the pooling)."""
    was = model.training
    model.eval()
    dev = model_device(model)
    outs = []
    try:
        for b in batches:
            b = to_device(b, dev)
            out = forward(model, b) if forward is not None else model(**b)
            outs.append(_embedding(out, b.get("attention_mask")).float().cpu())
    finally:
        model.train(was)
    return F.normalize(torch.cat(outs), dim=-1)


class TextRetrieval:
    """Sentence-pair retrieval on ``pairs`` ([(query, document)]).

    ``top1(model)``: percent of queries whose own document is the nearest
    (cosine) of all documents; ``eval_fn`` is ``top1`` (for ``dnateq.quantize``);
    ``cosine_to(model, reference)``: mean cosine similarity of the two models'
    embeddings of all sentences (1.0 = identical)."""

    def __init__(self, tokenizer: Callable, pairs: Sequence[Tuple[str, str]], *,
                 batch_size: int = 32, max_length: int = 64,
                 forward: Optional[Callable[[nn.Module, Any], Any]] = None):
        if len(pairs) < 2:
            raise ValueError(f"dnateq.eval.text: need at least 2 pairs, got {len(pairs)}")
        self.pairs, self.forward = list(pairs), forward
        self.queries = calibration_batches(tokenizer, [q for q, _ in self.pairs], batch_size,
                                           max_length)
        self.documents = calibration_batches(tokenizer, [d for _, d in self.pairs], batch_size,
                                             max_length)

    def embeddings(self, model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        return embed(model, self.queries, self.forward), embed(model, self.documents, self.forward)

    def top1(self, model: nn.Module) -> float:
        q, d = self.embeddings(model)
        hits = (q @ d.T).argmax(1) == torch.arange(q.shape[0])
        return 100.0 * float(hits.float().mean())

    def eval_fn(self, model: nn.Module) -> float:
        return self.top1(model)

    def cosine_to(self, model: nn.Module, reference: nn.Module) -> float:
        a = torch.cat(self.embeddings(model))
        b = torch.cat(self.embeddings(reference))
        return float((a * b).sum(1).mean())
