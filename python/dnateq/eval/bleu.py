"""BLEU of a translation system with sacrebleu, and greedy / beam-search decoding.

Data: WMT newstest sets as plain text, one sentence per line, source and
reference in separate files with the same number of lines (what
``sacrebleu -t wmt14 -l en-de --echo src`` / ``--echo ref`` print), or the
older ``.sgm`` files, whose ``<seg id="...">text</seg>`` lines are read in
order (text cleaned as sacrebleu's own conversion does: whitespace collapsed,
no entity unescaping).

The score is sacrebleu's corpus BLEU (default: 13a tokenization, mixed case,
exponential smoothing), reported with its signature so the number can be
compared with published ones. The paper's Transformer scores 27.93 BLEU on
newstest2014 en-de (3003 sentences) before quantization.

Decoding works on any model with the encode/decode protocol:

- ``model.encode(src [B, S]) -> (memory, src_pad_mask)``;
- ``model.decode(tgt [B, T], memory, src_pad_mask) -> logits [B, T, V]``;
- attributes ``pad_id``, ``bos_id``, ``eos_id``;

e.g. :class:`dnateq.models.TransformerTranslator`. Both searches limit every
sentence to ``max_len_a * len(source) + max_len_b`` tokens (the Transformer
paper's "input length + 50"), per sentence, never per batch, and never emit
``pad``/``bos``, so a sentence's translation does not depend on which other
sentences share its batch; under torchrun the sharded run then reproduces the
single-process hypotheses.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import distributed as D

__all__ = ["read_text", "read_parallel", "greedy_decode", "beam_search", "make_translator",
           "corpus_bleu", "evaluate_bleu", "evaluate_bleu_texts"]

PathLike = Union[str, os.PathLike]
_SEG = re.compile(r"<seg[^>]*>(.*)</seg>")


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------

def read_text(path: PathLike, arg: str = "path") -> List[str]:
    """Sentences of a plain-text (one per line) or ``.sgm`` file.

    A file is read as SGML when its name ends in ``.sgm``/``.sgml`` or its
    first non-blank line starts with ``<srcset``/``<refset``/``<tstset``/``<doc``;
    then only ``<seg>`` contents count. Plain lines lose their line ending and
    surrounding whitespace (as sacrebleu reads references). ``arg`` names the
    argument in errors.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"dnateq.eval: {arg}={p!r} does not exist")
    with open(p, encoding="utf-8-sig") as f:   # -sig: drop a byte-order mark if present
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()   # the final newline ends the last line; it is not an empty line
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    sgml = p.endswith((".sgm", ".sgml")) or first.startswith(
        ("<srcset", "<refset", "<tstset", "<doc"))
    if sgml:
        out = []
        for ln in lines:
            s = ln.strip()
            if s.startswith("<seg"):
                m = _SEG.search(s)
                if m is None:
                    raise ValueError(f"dnateq.eval: {arg}={p!r}: malformed <seg> line {s[:80]!r}")
                out.append(re.sub(r"\s+", " ", m.group(1).strip()))
        if not out:
            raise ValueError(f"dnateq.eval: {arg}={p!r} is SGML with no <seg> lines")
        return out
    out = [ln.strip() for ln in lines]
    if not out:
        raise ValueError(f"dnateq.eval: {arg}={p!r} is empty")
    return out


def read_parallel(src_path: PathLike, ref_path: Union[PathLike, Sequence[PathLike]],
                  limit: Optional[int] = None) -> Tuple[List[str], List[List[str]]]:
    """Source sentences and references, aligned line by line.

    ``ref_path`` may be a list of files (multiple references). Returns
    ``(sources, refs)`` where ``refs`` is a list of reference streams, one per
    file (sacrebleu's layout). ``limit`` keeps the first ``limit`` sentences.
    Raises if the files differ in sentence count.
    """
    src = read_text(src_path, "src_path")
    ref_paths = [ref_path] if isinstance(ref_path, (str, os.PathLike)) else list(ref_path)
    if not ref_paths:
        raise ValueError("dnateq.eval: ref_path is an empty list")
    refs = [read_text(r, "ref_path") for r in ref_paths]
    for r, rp in zip(refs, ref_paths):
        if len(r) != len(src):
            raise ValueError(f"dnateq.eval: src_path={os.fspath(src_path)!r} has {len(src)} "
                             f"sentences but ref_path={os.fspath(rp)!r} has {len(r)}")
    if limit is not None:
        _positive("read_parallel", "limit", limit)
        src = src[:limit]
        refs = [r[:limit] for r in refs]
    return src, refs


def _positive(fn: str, name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"dnateq.eval.{fn}: {name} must be a positive int, got {v!r}")


# ---------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------

def _limits(model, src: torch.Tensor, max_len_a: float, max_len_b: int) -> List[int]:
    lens = (src != model.pad_id).sum(1).tolist()
    return [max(1, int(math.floor(max_len_a * n + max_len_b))) for n in lens]


def _mask_specials(logits: torch.Tensor, model) -> torch.Tensor:
    # pad and bos are never generated
    logits[:, model.pad_id] = float("-inf")
    logits[:, model.bos_id] = float("-inf")
    return logits


def _check_src(src: torch.Tensor, fn: str, pad_id: int) -> None:
    if not isinstance(src, torch.Tensor) or src.dim() != 2 or src.dtype != torch.long:
        raise ValueError(f"dnateq.eval.{fn}: src must be a LongTensor [batch, len], got "
                         f"{getattr(src, 'shape', type(src).__name__)}")
    empty = (src == pad_id).all(1).nonzero().flatten().tolist()
    if empty:
        # attention over only padding is undefined (NaN)
        raise ValueError(f"dnateq.eval.{fn}: source row(s) {empty[:5]} hold only padding; "
                         "encode empty sentences as [eos_id]")


@torch.no_grad()
def greedy_decode(model, src: torch.Tensor, max_len_a: float = 1.0, max_len_b: int = 50
                  ) -> List[List[int]]:
    """Greedy search. ``src`` [B, S] token ids padded with ``model.pad_id``.

    Returns one token id list per sentence, without BOS/EOS. A sentence stops
    at EOS or after ``max_len_a * len + max_len_b`` tokens.
    """
    _check_src(src, "greedy_decode", model.pad_id)
    memory, mask = model.encode(src)
    B = src.shape[0]
    limit = _limits(model, src, max_len_a, max_len_b)
    ys = torch.full((B, 1), model.bos_id, dtype=torch.long, device=src.device)
    out: List[List[int]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(max(limit)):
        logits = _mask_specials(model.decode(ys, memory, mask)[:, -1].float(), model)
        nxt = logits.argmax(-1)
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if tok == model.eos_id:
                done[b] = True
            else:
                out[b].append(tok)
                if len(out[b]) >= limit[b]:
                    done[b] = True
        if all(done):
            break
        # finished rows are padded; the causal mask keeps padding out of the others
        nxt = torch.where(torch.tensor(done, device=nxt.device),
                          torch.full_like(nxt, model.pad_id), nxt)
        ys = torch.cat([ys, nxt[:, None]], 1)
    return out


def _lp(length: int, alpha: float) -> float:
    # GNMT length penalty ((5 + |Y|) / 6)^alpha, |Y| counting the EOS token.
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model, src: torch.Tensor, beam_size: int = 4, length_penalty: float = 0.6,
                max_len_a: float = 1.0, max_len_b: int = 50) -> List[List[int]]:
    """Beam search with the GNMT length penalty (the Transformer paper's
    setting: ``beam_size=4``, ``length_penalty=0.6``).

    Hypotheses are scored by ``sum log p / ((5 + |Y|) / 6)^length_penalty``
    (``|Y|`` including EOS). Each step extends the ``beam_size`` live
    hypotheses of a sentence by their best ``2 * beam_size`` continuations;
    those ending in EOS among the best ``beam_size`` of them are set aside as
    finished (so ``beam_size=1, length_penalty=0`` is greedy search), and the
    best ``beam_size`` others stay live. A sentence is finished when its best finished hypothesis scores
    at least what the best live one could still reach (its log-probability can
    only fall, divided by the largest penalty allowed by the length limit), or
    at the length limit, where EOS is forced. The result is then the best
    finished hypothesis the beam can produce, not merely the first found.

    Returns one token id list per sentence, without BOS/EOS.
    """
    _check_src(src, "beam_search", model.pad_id)
    _positive("beam_search", "beam_size", beam_size)
    if not length_penalty >= 0:
        raise ValueError(f"dnateq.eval.beam_search: length_penalty must be >= 0, got "
                         f"{length_penalty}")
    K = int(beam_size)
    memory, mask = model.encode(src)
    B = src.shape[0]
    dev = src.device
    limit = _limits(model, src, max_len_a, max_len_b)
    mem = memory.repeat_interleave(K, 0)
    mmask = mask.repeat_interleave(K, 0) if mask is not None else None
    ys = torch.full((B * K, 1), model.bos_id, dtype=torch.long, device=dev)
    scores = torch.full((B, K), float("-inf"), dtype=torch.float64)
    scores[:, 0] = 0.0   # one live hypothesis (BOS) to start from
    best: List[Optional[Tuple[float, List[int]]]] = [None] * B
    done = [False] * B
    for t in range(max(limit) + 1):   # t tokens generated so far
        logp = F.log_softmax(_mask_specials(model.decode(ys, mem, mmask)[:, -1].float(),
                                            model), -1).double().cpu()
        V = logp.shape[1]
        at_limit = torch.tensor([t >= limit[b] for b in range(B)]).repeat_interleave(K)
        if bool(at_limit.any()):
            forced = torch.full_like(logp, float("-inf"))
            forced[:, model.eos_id] = logp[:, model.eos_id]
            logp = torch.where(at_limit[:, None], forced, logp)
        cand = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)   # sorted, ties by index
        new_scores = torch.full((B, K), float("-inf"), dtype=torch.float64)
        new_from = torch.zeros((B, K), dtype=torch.long)
        new_tok = torch.full((B, K), model.pad_id, dtype=torch.long)
        for b in range(B):
            if done[b]:
                continue
            live = 0
            for pos, (s, i) in enumerate(zip(top_s[b].tolist(), top_i[b].tolist())):
                if s == float("-inf"):
                    break
                k, tok = divmod(i, V)
                if tok == model.eos_id:
                    # EOS ends a hypothesis only from the top beam_size candidates
                    # (fairseq's rule), so beam_size=1 without penalty is greedy.
                    if pos < K:
                        norm = s / _lp(t + 1, length_penalty)
                        if best[b] is None or norm > best[b][0]:
                            best[b] = (norm, ys[b * K + k, 1:].tolist())
                elif live < K:
                    new_scores[b, live] = s
                    new_from[b, live] = b * K + k
                    new_tok[b, live] = tok
                    live += 1
            # Live scores can only fall; the largest reachable penalty divides them.
            bound = (float(new_scores[b, 0]) / _lp(limit[b] + 1, length_penalty)
                     if live else float("-inf"))
            if live == 0 or (best[b] is not None and best[b][0] >= bound):
                done[b] = True
        if all(done):
            break
        scores = new_scores
        ys = torch.cat([ys[new_from.reshape(-1).to(dev)], new_tok.reshape(-1, 1).to(dev)], 1)
    return [h[1] if h is not None else [] for h in best]


def make_translator(model, encode: Callable[[str], Sequence[int]],
                    decode: Callable[[Sequence[int]], str], *, search: str = "beam",
                    beam_size: int = 4, length_penalty: float = 0.6, max_len_a: float = 1.0,
                    max_len_b: int = 50, device: Union[None, str, torch.device] = None
                    ) -> Callable[[List[str]], List[str]]:
    """A ``translate(sentences) -> translations`` function for :func:`evaluate_bleu`.

    ``encode`` turns a source sentence into token ids (including the EOS the
    model was trained with, if any); ``decode`` turns generated ids (no
    BOS/EOS) into a detokenized sentence. ``search`` is ``"greedy"`` or
    ``"beam"``. ``device`` moves the model (in place); default: where it is.
    The model is put in eval mode.
    """
    if search not in ("greedy", "beam"):
        raise ValueError(f"dnateq.eval.make_translator: search must be 'greedy' or 'beam', "
                         f"got {search!r}")
    if device is not None:
        model.to(device)
    model.eval()

    def translate(sentences: List[str]) -> List[str]:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        # an empty encoding would be an all-padding row: give it a lone EOS
        ids = [list(encode(s)) or [model.eos_id] for s in sentences]
        L = max(1, max(len(x) for x in ids))
        src = torch.full((len(ids), L), model.pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            if x:
                src[i, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        src = src.to(dev)
        if search == "greedy":
            out = greedy_decode(model, src, max_len_a, max_len_b)
        else:
            out = beam_search(model, src, beam_size, length_penalty, max_len_a, max_len_b)
        return [decode(o) for o in out]

    return translate


# ---------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------

def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                tokenize: str = "13a", lowercase: bool = False) -> Dict[str, Any]:
    """sacrebleu corpus BLEU. ``references``: reference streams (one list per
    reference set, each aligned with ``hypotheses``)."""
    from sacrebleu.metrics import BLEU
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    s = metric.corpus_score(list(hypotheses), [list(r) for r in references])
    return dict(bleu=float(s.score), signature=metric.get_signature().format(),
                precisions=[float(p) for p in s.precisions], bp=float(s.bp),
                sys_len=int(s.sys_len), ref_len=int(s.ref_len), text=str(s))


def evaluate_bleu_texts(translate_fn: Callable[[List[str]], List[str]],
                        sources: Sequence[str], references: Sequence[Sequence[str]], *,
                        batch_size: int = 32, progress: bool = True, tokenize: str = "13a",
                        lowercase: bool = False, distributed: Optional[bool] = None,
                        output_path: Optional[PathLike] = None) -> Dict[str, Any]:
    """:func:`evaluate_bleu` on in-memory sentences (``references``: a list of
    reference streams, or a flat list of strings for a single reference)."""
    _positive("evaluate_bleu", "batch_size", batch_size)
    if not callable(translate_fn):
        raise TypeError("dnateq.eval.evaluate_bleu: translate_fn must be callable "
                        "(list of sentences -> list of translations)")
    sources = list(sources)
    if references and isinstance(references[0], str):
        references = [list(references)]   # a single reference stream
    references = [list(r) for r in references]
    n = len(sources)
    if n == 0:
        raise ValueError("dnateq.eval.evaluate_bleu: no source sentence")
    if not references or any(len(r) != n for r in references):
        raise ValueError(f"dnateq.eval.evaluate_bleu: {n} sources but reference streams of "
                         f"lengths {[len(r) for r in references]}")
    if distributed is None:
        distributed = D.is_distributed()
    mine = list(D.shard_indices(n)) if distributed else list(range(n))
    hyps: List[str] = []
    err: Optional[BaseException] = None
    bar = None
    if progress and D.is_main_process():
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), desc="dnateq: translating", unit="sent", dynamic_ncols=True)
    try:
        for i in range(0, len(mine), batch_size):
            batch = [sources[j] for j in mine[i:i + batch_size]]
            out = translate_fn(batch)
            if isinstance(out, str) or len(out) != len(batch):
                raise ValueError(f"dnateq.eval.evaluate_bleu: translate_fn returned "
                                 f"{'a string' if isinstance(out, str) else len(out)} for a "
                                 f"batch of {len(batch)} sentences")
            if not all(isinstance(h, str) for h in out):
                raise TypeError("dnateq.eval.evaluate_bleu: translate_fn must return strings")
            hyps.extend(out)
            if bar is not None:
                bar.update(len(batch))
    except Exception as e:  # re-raised below, once the other ranks know
        err = e
    finally:
        if bar is not None:
            bar.close()
    if distributed:
        D.raise_if_any_failed(err, "evaluate_bleu")
        all_hyps = D.gather_in_order(mine, hyps, n)
    else:
        if err is not None:
            raise err
        all_hyps = hyps
    res = None
    if D.is_main_process() or not distributed:
        # Computed once, on the gathered hypotheses in dataset order.
        res = corpus_bleu(all_hyps, references, tokenize, lowercase)
        res["n"] = n
        if output_path is not None:
            with open(os.fspath(output_path), "w", encoding="utf-8") as f:
                f.write("".join(h + "\n" for h in all_hyps))
    if distributed:
        res = D.broadcast_object(res, 0)
    res["hypotheses"] = all_hyps
    return res


def evaluate_bleu(translate_fn: Callable[[List[str]], List[str]], src_path: PathLike,
                  ref_path: Union[PathLike, Sequence[PathLike]], batch_size: int = 32,
                  progress: bool = True, *, limit: Optional[int] = None, tokenize: str = "13a",
                  lowercase: bool = False, distributed: Optional[bool] = None,
                  output_path: Optional[PathLike] = None) -> Dict[str, Any]:
    """Corpus BLEU of ``translate_fn`` on a test set (e.g. newstest2014 en-de).

    Args:
        translate_fn: ``list[str] -> list[str]``, called on batches of source
            sentences in file order (see :func:`make_translator`).
        src_path, ref_path: the source and reference files (plain text or .sgm,
            :func:`read_text`); ``ref_path`` may list several references.
        batch_size: sentences per ``translate_fn`` call.
        progress: a tqdm bar on rank 0.
        limit: only the first ``limit`` sentences.
        tokenize, lowercase: sacrebleu options (defaults: 13a, cased).
        distributed: shard sentences over ranks; ``None`` detects torchrun. The
            hypotheses are gathered in order and BLEU computed once on rank 0.
        output_path: write the hypotheses there, one per line (rank 0).

    Returns:
        ``{"bleu", "signature", "n", "precisions", "bp", "sys_len", "ref_len",
        "text", "hypotheses"}``, identical on every rank.
    """
    src, refs = read_parallel(src_path, ref_path, limit)
    return evaluate_bleu_texts(translate_fn, src, refs, batch_size=batch_size,
                               progress=progress, tokenize=tokenize, lowercase=lowercase,
                               distributed=distributed, output_path=output_path)
