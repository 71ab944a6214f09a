"""The paper's Transformer-base translation model, on ``nn.Transformer``.

Vaswani et al. (2017) "base": 6 encoder + 6 decoder layers, ``d_model`` 512,
8 heads, feed-forward 2048, sinusoidal positions, embeddings scaled by
``sqrt(d_model)``, the output projection tied to the target embedding.

**The 96 FC layers.** DNA-TEQ quantizes "96 FC layers" of this model (paper,
section III-B: "12 out of 96 FC layers choose the tensor of weights"). With
the attention's Q, K, V and output projections as separate layers:

- encoder layer: self-attention Q, K, V, out (4) + feed-forward (2) = 6;
- decoder layer: self-attention (4) + encoder-decoder attention (4) +
  feed-forward (2) = 10;
- 6 x 6 + 6 x 10 = **96**, all inside ``model.transformer``.

The embeddings and the output projection (``generator``, whose weight is the
target embedding matrix when tied, as in the paper's TensorFlow model) are not
among them; SPEC section 6 counts them separately. To quantize exactly the
paper's 96 layers: ``dnateq.quantize(model, loader, skip=PAPER_SKIP)``.

``nn.MultiheadAttention`` packs Q, K, V into one ``in_proj_weight`` and calls
``F.multi_head_attention_forward``, hiding them from forward hooks. With
``separate_qkv=True`` (default) the model is built with
:class:`dnateq.nn.ExpMultiheadAttention` (float, explicit ``q_proj``,
``k_proj``, ``v_proj``, ``out_proj`` Linears), the same replacement
``dnateq.quantize`` makes; :func:`split_qkv` does it to any model.

Decoding follows the encode/decode protocol of :mod:`dnateq.eval.bleu`
(``encode(src) -> (memory, src_pad_mask)``, ``decode(tgt, memory, mask) ->
logits``, ``pad_id``/``bos_id``/``eos_id``), so ``model.greedy_decode`` /
``model.beam_search`` and ``dnateq.eval.make_translator`` work on it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..nn.modules import ExpMultiheadAttention
from ._checkpoint import load_into, read_state_dict

__all__ = ["TransformerTranslator", "transformer_base", "split_qkv", "paper_fc_layers",
           "PAPER_FC_LAYERS", "PAPER_SKIP", "Vocab", "translation_batches"]

#: FC layers of the paper's Transformer (6 + 6 layers, separate Q/K/V/out).
PAPER_FC_LAYERS = 96
#: ``skip=`` for ``dnateq.quantize`` so that exactly the paper's 96 layers are quantized.
PAPER_SKIP = ("generator",)


def split_qkv(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` inside ``model`` (in place) by
    its float equivalent with separate Q/K/V/out ``nn.Linear``s
    (:meth:`dnateq.nn.ExpMultiheadAttention.from_float`; same outputs), and turn
    off ``nn.TransformerEncoder``'s nested-tensor fast path, which reads the
    packed weights. Returns ``model``."""
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name in targets:
        parent = model
        *path, attr = name.split(".")
        for p in path:
            parent = getattr(parent, p)
        setattr(parent, attr, ExpMultiheadAttention.from_float(getattr(parent, attr)))
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.enable_nested_tensor = False
            m.use_nested_tensor = False
    return model


def paper_fc_layers(model: "TransformerTranslator") -> List[str]:
    """Names of the FC layers the paper counts: every ``nn.Linear`` inside
    ``model.transformer`` (after :func:`split_qkv`: 96 for Transformer-base)."""
    return [f"transformer.{n}" for n, m in model.transformer.named_modules()
            if isinstance(m, nn.Linear)]


class _SinusoidalPositions(nn.Module):
    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64)
                        * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
        # not persistent: a function of the shape, not a learned weight
        self.register_buffer("pe", pe.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[0]:
            raise ValueError(f"dnateq TransformerTranslator: sequence length {x.shape[1]} "
                             f"exceeds max_len={self.pe.shape[0]}")
        return x + self.pe[: x.shape[1]].to(x.dtype)


class TransformerTranslator(nn.Module):
    """Encoder-decoder translation model on ``nn.Transformer`` (batch first).

    Args:
        src_vocab, tgt_vocab: vocabulary sizes.
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
            dropout, norm_first: as ``nn.Transformer`` (defaults: Transformer-base).
        max_len: longest sequence the positional table covers.
        pad_id, bos_id, eos_id: special token ids (shared by both vocabularies).
        tie_output: the output projection shares the target embedding's weight
            (as in the paper's model); its bias stays separate.
        share_embeddings: source and target use one embedding (joint vocabulary;
            needs ``src_vocab == tgt_vocab``).
        separate_qkv: build the attention with separate Q/K/V/out Linears
            (see the module docstring); ``False`` keeps ``nn.MultiheadAttention``.

    ``forward(src, tgt_in) -> logits [B, T, tgt_vocab]`` (teacher forcing);
    ``forward((src, tgt_in))`` also works, so a loader of
    ``{"input": (src, tgt_in)}`` batches calibrates it with ``dnateq.quantize``
    (:func:`translation_batches`).
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 512, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, max_len: int = 1024,
                 pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, tie_output: bool = True,
                 share_embeddings: bool = False, separate_qkv: bool = True,
                 norm_first: bool = False):
        super().__init__()
        for name, v in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab)):
            if not isinstance(v, int) or v < 3:
                raise ValueError(f"dnateq TransformerTranslator: {name} must be an int >= 3 "
                                 f"(pad, bos, eos), got {v!r}")
        ids = (pad_id, bos_id, eos_id)
        if len(set(ids)) != 3 or not all(0 <= i < min(src_vocab, tgt_vocab) for i in ids):
            raise ValueError(f"dnateq TransformerTranslator: pad/bos/eos ids {ids} must be "
                             "distinct and inside both vocabularies")
        if share_embeddings and src_vocab != tgt_vocab:
            raise ValueError("dnateq TransformerTranslator: share_embeddings needs "
                             f"src_vocab == tgt_vocab, got {src_vocab} and {tgt_vocab}")
        self.config = dict(src_vocab=src_vocab, tgt_vocab=tgt_vocab, d_model=d_model,
                           nhead=nhead, num_encoder_layers=num_encoder_layers,
                           num_decoder_layers=num_decoder_layers,
                           dim_feedforward=dim_feedforward, dropout=dropout, max_len=max_len,
                           pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, tie_output=tie_output,
                           share_embeddings=share_embeddings, separate_qkv=separate_qkv,
                           norm_first=norm_first)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.d_model = d_model
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=pad_id)
        self.tgt_embed = (self.src_embed if share_embeddings
                          else nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id))
        for emb in {id(self.src_embed): self.src_embed, id(self.tgt_embed): self.tgt_embed}.values():
            # N(0, d^-1/2): embeddings are scaled by sqrt(d) on use, and the tied
            # output projection then starts at the usual logit scale.
            nn.init.normal_(emb.weight, 0.0, d_model ** -0.5)
            with torch.no_grad():
                emb.weight[pad_id].zero_()
        self.positions = _SinusoidalPositions(d_model, max_len)
        self.dropout = nn.Dropout(dropout)
        self.transformer = nn.Transformer(
            d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
            batch_first=True, norm_first=norm_first)
        self.generator = nn.Linear(d_model, tgt_vocab)
        if tie_output:
            self.generator.weight = self.tgt_embed.weight
        # The nested-tensor encoder path would bypass the (maybe split) modules.
        self.transformer.encoder.enable_nested_tensor = False
        self.transformer.encoder.use_nested_tensor = False
        if separate_qkv:
            split_qkv(self)

    # -- the encode/decode protocol ------------------------------------------------
    def _embed(self, emb: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.positions(emb(ids) * math.sqrt(self.d_model)))

    def encode(self, src: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``src`` [B, S] token ids (padded with ``pad_id``) -> ``(memory [B, S, D],
        src_pad_mask [B, S])`` (True at padding)."""
        if src.dim() != 2:
            raise ValueError(f"dnateq TransformerTranslator.encode: src must be [batch, len] "
                             f"token ids, got shape {list(src.shape)}")
        mask = src == self.pad_id
        memory = self.transformer.encoder(self._embed(self.src_embed, src),
                                          src_key_padding_mask=mask)
        return memory, mask

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor,
               memory_pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tgt`` [B, T] (starting with ``bos_id``) -> logits [B, T, tgt_vocab]
        under a causal mask. Padding only ever follows a sequence's real tokens,
        so the causal mask alone keeps it out of every real position."""
        T = tgt.shape[1]
        causal = torch.triu(torch.full((T, T), float("-inf"), device=tgt.device,
                                       dtype=memory.dtype), diagonal=1)
        h = self.transformer.decoder(self._embed(self.tgt_embed, tgt), memory, tgt_mask=causal,
                                     memory_key_padding_mask=memory_pad_mask,
                                     tgt_is_causal=True)
        return self.generator(h)

    def forward(self, src: Any = None, tgt: Optional[torch.Tensor] = None, *,
                input: Any = None, target: Any = None) -> torch.Tensor:
        # ``input``/``target``: the keys of translation_batches' dicts, so that
        # model(**batch) (dnateq.quantize's call of a dict batch) works; the
        # teacher-forcing target is not an input and is ignored.
        if src is None:
            src = input
        if tgt is None:
            if isinstance(src, (tuple, list)) and len(src) == 2:
                src, tgt = src
            else:
                raise ValueError("dnateq TransformerTranslator.forward: needs (src, tgt_in): "
                                 "call model(src, tgt_in) or model((src, tgt_in))")
        memory, mask = self.encode(src)
        return self.decode(tgt, memory, mask)

    # -- decoding (see dnateq.eval.bleu) -----------------------------------------
    def greedy_decode(self, src: torch.Tensor, **kwargs) -> List[List[int]]:
        """Greedy search; see :func:`dnateq.eval.bleu.greedy_decode`."""
        from ..eval.bleu import greedy_decode
        return greedy_decode(self, src, **kwargs)

    def beam_search(self, src: torch.Tensor, **kwargs) -> List[List[int]]:
        """Beam search; see :func:`dnateq.eval.bleu.beam_search`."""
        from ..eval.bleu import beam_search
        return beam_search(self, src, **kwargs)

    def fc_layers(self) -> List[str]:
        """The paper's FC layers (:func:`paper_fc_layers`)."""
        return paper_fc_layers(self)

    # -- checkpoints ---------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], *, trust_checkpoint: bool = False,
                        **config) -> "TransformerTranslator":
        """Build with ``config`` and load ``path`` (a state dict of this class,
        with packed ``nn.MultiheadAttention`` or separate Q/K/V weights; a
        ``{"config": ..., "state_dict": ...}`` dict also supplies the config).
        Eval mode."""
        what = "dnateq.models.TransformerTranslator"
        cfg = _stored_config(path)
        if cfg:
            cfg = {**cfg, **config}
        else:
            cfg = dict(config)
        sd = read_state_dict(path, what=what, trust_checkpoint=trust_checkpoint)
        split = any(k.endswith(".q_proj.weight") for k in sd)
        want_split = cfg.pop("separate_qkv", True)
        missing = [k for k in ("src_vocab", "tgt_vocab") if k not in cfg]
        if missing:
            raise ValueError(f"{what}.from_checkpoint: pass {missing} (the checkpoint does not "
                             "store the configuration)")
        model = cls(**cfg, separate_qkv=split)
        load_into(model, sd, what=what, source=os.fspath(path))
        if want_split and not split:
            split_qkv(model)
        return model.eval()

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """``{"config": ..., "state_dict": ...}``, readable by :meth:`from_checkpoint`
        with ``weights_only=True``."""
        torch.save({"config": dict(self.config), "state_dict": self.state_dict()}, path)


def _stored_config(path) -> Optional[Dict[str, Any]]:
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception:
        return None   # read_state_dict reports the problem
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        return dict(obj["config"])
    return None


def transformer_base(src_vocab: int, tgt_vocab: int, **kwargs) -> TransformerTranslator:
    """Transformer-base (Vaswani et al. 2017) as evaluated in the paper, with
    separate Q/K/V projections; checks that it has the paper's 96 FC layers."""
    kwargs.setdefault("separate_qkv", True)
    model = TransformerTranslator(src_vocab, tgt_vocab, **kwargs)
    n = len(paper_fc_layers(model))
    if (kwargs["separate_qkv"] and kwargs.get("num_encoder_layers", 6) == 6
            and kwargs.get("num_decoder_layers", 6) == 6):
        assert n == PAPER_FC_LAYERS, f"expected {PAPER_FC_LAYERS} FC layers, found {n}"
    return model


# ---------------------------------------------------------------------------
# a minimal word vocabulary and batching, for tests, demos and calibration
# ---------------------------------------------------------------------------

class Vocab:
    """Whitespace-token vocabulary with ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<unk>`` 3 (the ids :class:`TransformerTranslator` defaults to). Real
    WMT models use subword vocabularies (SentencePiece/BPE): pass their
    encode/decode functions to :func:`dnateq.eval.make_translator` instead."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, tokens: Iterable[str]):
        self.itos: List[str] = list(self.SPECIALS)
        for t in tokens:
            if t not in self.itos:
                self.itos.append(t)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> "Vocab":
        """From the whitespace tokens of ``texts``, in order of first appearance."""
        return cls(t for line in texts for t in line.split())

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, add_eos: bool = True) -> List[int]:
        ids = [self.stoi.get(t, self.unk_id) for t in text.split()]
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else self.SPECIALS[3])
        return " ".join(out)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """Right-pad token id lists into a LongTensor [B, max_len]."""
    if not seqs:
        raise ValueError("dnateq: cannot pad an empty batch")
    L = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def translation_batches(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]],
                        batch_size: int, pad_id: int = 0, bos_id: int = 1
                        ) -> List[Dict[str, Any]]:
    """Teacher-forcing batches ``{"input": (src [B,S], tgt_in [B,T]), "target":
    tgt_out [B,T]}`` from token id lists (targets ending with EOS), in order:
    ``dnateq.quantize(model, translation_batches(...))`` traces the encoder and
    the decoder on real sentence pairs."""
    if len(src) != len(tgt):
        raise ValueError(f"dnateq.translation_batches: {len(src)} sources but {len(tgt)} "
                         "targets")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"dnateq.translation_batches: batch_size must be a positive int, "
                         f"got {batch_size!r}")
    out = []
    for i in range(0, len(src), batch_size):
        s = pad_batch(src[i:i + batch_size], pad_id)
        t = [list(x) for x in tgt[i:i + batch_size]]
        tin = pad_batch([[bos_id] + x[:-1] if x else [bos_id] for x in t], pad_id)
        tout = pad_batch([x if x else [pad_id] for x in t], pad_id)
        out.append({"input": (s, tin), "target": tout})
    return out
