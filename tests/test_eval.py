"""dnateq.eval: top-k over ImageFolders, BLEU with sacrebleu, greedy/beam search.

Everything runs on stand-ins generated in tmp_path: an ImageFolder of solid
colour images whose red channel encodes the image id, read back by a model
that answers a hand-written logit table (so the expected top-1/top-5 are
known without running a classifier), small parallel text files, and a tiny
random TransformerTranslator.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dnateq  # noqa: F401  (loads the operators)
from dnateq import eval as E
from dnateq.models import TransformerTranslator, Vocab, pretrained_cifar_resnet, shared_data_dir

@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add contention on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------
# the ImageFolder stand-in
# ---------------------------------------------------------------------------

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]
# The rank (0 = best) of the true class in each image's logits, by hand:
# top-1 correct where 0 (6 of 12), top-5 where < 5 (10 of 12).
RANKS = [0, 0, 1, 0, 4, 5, 0, 3, 0, 2, 5, 0]
SIZES = [(40, 30), (30, 40), (64, 64), (300, 260)]


def make_imagefolder(root: Path, n_per_class: int = 2, extra: int = 0) -> Path:
    """Class folders of solid images; image ``i`` (in ImageFolder's sorted
    order) has red = 10 * i. ``extra`` more images go into the last class."""
    from PIL import Image
    i = 0
    for c, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True)
        for j in range(n_per_class + (extra if c == len(CLASSES) - 1 else 0)):
            w, h = SIZES[i % len(SIZES)]
            Image.new("RGB", (w, h), (10 * i, 128, 200)).save(d / f"img{j:02d}.png")
            i += 1
    return root


class TableModel(nn.Module):
    """Reads the image id from the red channel and returns ``table[id]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        red = x[:, 0].mean((1, 2)) * E.IMAGENET_STD[0] + E.IMAGENET_MEAN[0]
        ids = torch.round(red * 255 / 10).long()
        return self.table[ids]


def logit_table(ranks, labels, n_classes=len(CLASSES)) -> torch.Tensor:
    """Logits putting each sample's true class at the given rank."""
    rows = []
    for r, y in zip(ranks, labels):
        others = [c for c in range(n_classes) if c != y]
        order = others[:r] + [y] + others[r:]
        row = torch.empty(n_classes)
        for pos, c in enumerate(order):
            row[c] = float(n_classes - pos)
        rows.append(row)
    return torch.stack(rows)


@pytest.fixture
def folder(tmp_path):
    return make_imagefolder(tmp_path / "val")


@pytest.fixture
def table_model():
    labels = [i // 2 for i in range(12)]
    return TableModel(logit_table(RANKS, labels))


def test_topk_matches_hand_computation(folder, table_model):
    for bs in (1, 5, 12):
        res = E.evaluate_imagenet(table_model, folder, batch_size=bs, workers=0, progress=False)
        assert res["n"] == 12
        assert res["correct"] == {1: 6, 5: 10}
        assert res["top1"] == pytest.approx(50.0)
        assert res["top5"] == pytest.approx(100.0 * 10 / 12)


def test_topk_with_worker_processes_and_other_k(folder, table_model):
    loader = E.imagefolder_loader(folder, batch_size=4, workers=2)
    res = E.evaluate_topk(table_model, loader, topk=(1, 2, 3, 6), progress=False)
    # ranks 0,0,1,0,4,5,0,3,0,2,5,0 -> <2: 7, <3: 8, <6: 12
    assert res["correct"] == {1: 6, 2: 7, 3: 8, 6: 12}


def test_topk_against_torch_topk_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=g)
    y = torch.randint(0, 10, (50,), generator=g)
    loader = [(logits[i:i + 7], y[i:i + 7]) for i in range(0, 50, 7)]
    res = E.evaluate_topk(nn.Identity(), loader, topk=(1, 3, 5), progress=False)
    for k in (1, 3, 5):
        ref = int((logits.topk(k, 1).indices == y[:, None]).any(1).sum())
        assert res["correct"][k] == ref


def test_ties_count_against_the_sample():
    # all classes tie: the true class is never strictly among the top-k < C
    loader = [(torch.zeros(4, 6), torch.tensor([0, 1, 2, 3]))]
    res = E.evaluate_topk(nn.Identity(), loader, topk=(1, 5, 6), progress=False)
    assert res["correct"] == {1: 0, 5: 0, 6: 4}


def test_dict_batches_and_mode_restored(table_model):
    table_model.train()
    x = torch.zeros(3, 3, 8, 8)
    x[:, 0] = ((torch.tensor([0.0, 10.0, 20.0]) / 255 - E.IMAGENET_MEAN[0])
               / E.IMAGENET_STD[0])[:, None, None]
    res = E.evaluate_topk(table_model, [{"image": x, "label": torch.tensor([0, 0, 1])}],
                          topk=(1,), progress=False, device="cpu")
    assert res["correct"] == {1: 2}   # ids 0,1,2 have ranks 0,0,1
    assert table_model.training


def test_standard_transforms():
    from torchvision import transforms as T
    tf = E.imagenet_transforms()
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert tf.transforms[0].size == 256 and tf.transforms[1].size == (224, 224)
    assert tuple(tf.transforms[3].mean) == E.IMAGENET_MEAN
    from PIL import Image
    out = tf(Image.new("RGB", (500, 300), (255, 0, 0)))
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(
        [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]))


def test_transforms_from_weights_enum(folder):
    from torchvision.models import ResNet50_Weights
    w = ResNet50_Weights.IMAGENET1K_V2
    for spec in (w, "ResNet50_Weights.IMAGENET1K_V2"):
        tf = E.imagenet_transforms(spec)
        assert tf.resize_size == [232] and tf.crop_size == [224]   # the enum's own
    assert E.resolve_weights("DEFAULT", "resnet50") is w
    loader = E.imagefolder_loader(folder, batch_size=12, workers=0, weights=w)
    x, y = next(iter(loader))
    assert x.shape == (12, 3, 224, 224) and y.tolist() == [i // 2 for i in range(12)]
    with pytest.raises(ValueError, match="IMAGENET9"):
        E.imagenet_transforms("ResNet50_Weights.IMAGENET9")


def test_limit_spreads_over_classes(folder, table_model):
    ds = E.imagefolder_dataset(folder, limit=6)
    assert len(ds) == 6
    assert sorted({ds[i][1] for i in range(6)}) == list(range(6))
    res = E.evaluate_imagenet(table_model, folder, limit=6, batch_size=4, workers=0,
                              progress=False)
    # images 0,2,4,6,8,10 -> ranks 0,1,4,0,0,5
    assert res["n"] == 6 and res["correct"] == {1: 3, 5: 5}


def test_progress_bar_and_silence(folder, table_model, capsys):
    E.evaluate_imagenet(table_model, folder, workers=0, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    E.evaluate_imagenet(table_model, folder, workers=0, progress=True)
    assert "dnateq: ImageNet" in capsys.readouterr().err


def test_imagefolder_bad_input(tmp_path, folder, table_model):
    with pytest.raises(FileNotFoundError, match="root="):
        E.imagefolder_loader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="root=.*no class folder"):
        E.imagefolder_loader(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="root="):
        E.imagefolder_loader(tmp_path / "noimg")
    for bs in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            E.imagefolder_loader(folder, batch_size=bs)
    with pytest.raises(ValueError, match="workers"):
        E.imagefolder_loader(folder, workers=-1)
    with pytest.raises(ValueError, match="limit"):
        E.imagefolder_loader(folder, limit=0)
    with pytest.raises(ValueError, match=r"topk=\(1, 7\).*6 classes"):
        E.evaluate_imagenet(table_model, folder, topk=(1, 7), workers=0, progress=False)
    with pytest.raises(ValueError, match="topk"):
        E.evaluate_topk(table_model, [], topk=(0,), progress=False)
    with pytest.raises(ValueError, match="no sample"):
        E.evaluate_topk(table_model, [], progress=False)


def test_evaluate_topk_bad_batches():
    ident = nn.Identity()
    with pytest.raises(ValueError, match="labels outside"):
        E.evaluate_topk(ident, [(torch.zeros(2, 6), torch.tensor([0, 6]))], progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        E.evaluate_topk(ident, [(torch.full((2, 6), math.nan), torch.tensor([0, 1]))],
                        progress=False)
    with pytest.raises(ValueError, match=r"logits \[batch, classes\]"):
        E.evaluate_topk(ident, [(torch.zeros(2, 6, 2), torch.tensor([0, 1]))], progress=False)
    with pytest.raises(ValueError, match="labels of shape"):
        E.evaluate_topk(ident, [(torch.zeros(2, 6), torch.tensor([0, 1, 2]))], progress=False)
    with pytest.raises(ValueError, match=r"\(inputs, labels\)"):
        E.evaluate_topk(ident, [(torch.zeros(2, 6),)], progress=False)
    with pytest.raises(TypeError, match="batches"):
        E.evaluate_topk(ident, [torch.zeros(2, 6)], progress=False)


def test_topk_eval_fn(folder, table_model):
    fn = E.topk_eval_fn(E.imagefolder_loader(folder, batch_size=6, workers=0), k=5)
    assert fn(table_model) == pytest.approx(100.0 * 10 / 12)


@pytest.mark.cuda
def test_topk_on_cuda(folder, table_model):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    res = E.evaluate_imagenet(table_model, folder, device="cuda", workers=0, progress=False)
    assert res["correct"] == {1: 6, 5: 10}
    assert next(table_model.buffers()).device.type == "cuda"


@pytest.mark.real
@pytest.mark.slow
def test_cifar_resnet20_real_top1():
    d = shared_data_dir()
    if not os.path.isfile(os.path.join(d, "resnet20_cifar10.th")):
        pytest.skip(f"real data not found in {d} (set DNATEQ_SHARED_DATA)")
    model = pretrained_cifar_resnet(20)
    res = E.evaluate_topk(model, E.cifar10_loader("test", batch_size=256), progress=False)
    assert res["n"] == 761
    assert res["top1"] == pytest.approx(91.72, abs=0.01)   # the README's measured value
    assert res["top5"] > res["top1"]


# ---------------------------------------------------------------------------
# parallel text
# ---------------------------------------------------------------------------

SRC = ["ein kleiner Test .", "das Haus ist rot .", "guten Morgen", "wir sehen uns morgen .",
       "die Katze schläft"]
REF = ["a small test .", "the house is red .", "good morning", "see you tomorrow .",
       "the cat sleeps"]


def write_lines(path: Path, lines, final_newline=True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""), encoding="utf-8")
    return path


def test_read_parallel_plain_and_sgm(tmp_path):
    s = write_lines(tmp_path / "src.de", SRC)
    r = write_lines(tmp_path / "ref.en", REF, final_newline=False)
    src, refs = E.read_parallel(s, r)
    assert src == SRC and refs == [REF]
    assert E.read_parallel(s, r, limit=2) == (SRC[:2], [REF[:2]])
    sgm = tmp_path / "ref.en.sgm"
    sgm.write_text('<refset setid="newstest2014" srclang="any" trglang="en">\n'
                   '<doc sysid="ref" docid="1" genre="news" origlang="de">\n'
                   + "".join(f'<seg id="{i + 1}"> {t}  </seg>\n' for i, t in enumerate(REF))
                   + "</doc>\n</refset>\n", encoding="utf-8")
    assert E.read_text(sgm) == REF
    r2 = write_lines(tmp_path / "ref2.en", [t.upper() for t in REF])
    src, refs = E.read_parallel(s, [r, r2])
    assert refs == [REF, [t.upper() for t in REF]]


def test_read_parallel_bad_input(tmp_path):
    s = write_lines(tmp_path / "src", SRC)
    r = write_lines(tmp_path / "ref", REF[:-1])
    with pytest.raises(ValueError, match=r"src_path=.* has 5 sentences but ref_path=.* has 4"):
        E.read_parallel(s, r)
    with pytest.raises(FileNotFoundError, match="src_path="):
        E.read_parallel(tmp_path / "missing", r)
    with pytest.raises(FileNotFoundError, match="ref_path="):
        E.read_parallel(s, tmp_path / "missing")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="empty"):
        E.read_parallel(tmp_path / "empty", r)
    with pytest.raises(ValueError, match="limit"):
        E.read_parallel(s, s, limit=0)


def test_bleu_identity_is_100_and_matches_sacrebleu(tmp_path):
    import sacrebleu
    s = write_lines(tmp_path / "src", REF)
    r = write_lines(tmp_path / "ref", REF)
    res = E.evaluate_bleu(lambda xs: list(xs), s, r, batch_size=2, progress=False)
    assert res["bleu"] == pytest.approx(100.0)
    assert res["n"] == 5 and res["hypotheses"] == REF
    assert res["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")

    def drop_last_word(xs):
        return [" ".join(x.split()[:-1]) for x in xs]
    out = tmp_path / "hyp.txt"
    got = E.evaluate_bleu(drop_last_word, s, r, batch_size=3, progress=False, output_path=out)
    ref = sacrebleu.corpus_bleu(drop_last_word(REF), [REF])
    assert got["bleu"] == pytest.approx(ref.score, abs=1e-12)
    assert got["bp"] == pytest.approx(ref.bp) and got["sys_len"] == ref.sys_len
    assert 0 < got["bleu"] < 100
    assert out.read_text(encoding="utf-8").splitlines() == drop_last_word(REF)
    # batching does not change anything
    for bs in (1, 100):
        assert E.evaluate_bleu(drop_last_word, s, r, batch_size=bs,
                               progress=False)["bleu"] == got["bleu"]
    low = E.evaluate_bleu(lambda xs: [x.lower() for x in xs], s,
                          write_lines(tmp_path / "up", [t.upper() for t in REF]),
                          lowercase=True, progress=False)
    assert low["bleu"] == pytest.approx(100.0) and "case:lc" in low["signature"]


def test_bleu_bad_input(tmp_path, capsys):
    s = write_lines(tmp_path / "src", SRC)
    r = write_lines(tmp_path / "ref", REF)
    for bs in (0, -3, None):
        with pytest.raises(ValueError, match="batch_size"):
            E.evaluate_bleu(lambda xs: xs, s, r, batch_size=bs, progress=False)
    with pytest.raises(ValueError, match="returned 1 for a batch of 2"):
        E.evaluate_bleu(lambda xs: xs[:1], s, r, batch_size=2, progress=False)
    with pytest.raises(TypeError, match="callable"):
        E.evaluate_bleu("not a function", s, r, progress=False)
    E.evaluate_bleu(lambda xs: xs, s, r, progress=False)
    assert capsys.readouterr().err == ""
    E.evaluate_bleu(lambda xs: xs, s, r, progress=True)
    assert "dnateq: translating" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------

def tiny_translator(vocab=5, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
               dim_feedforward=32, dropout=0.0)
    cfg.update(kw)
    return TransformerTranslator(vocab, vocab, **cfg).eval()


@torch.no_grad()
def all_sequence_scores(model, src_row, words, max_tokens, alpha):
    """Length-normalized log-probability of every ``w_1..w_n EOS`` with
    ``n <= max_tokens`` words (EOS forced after ``max_tokens``), by brute force
    over the prefix tree: ``{tuple(words): score}``."""
    memory, mask = model.encode(src_row[None])
    out = {}
    frontier = [((), 0.0)]
    for n in range(max_tokens + 1):
        nxt = []
        for prefix, lp_sum in frontier:
            ys = torch.tensor([[model.bos_id, *prefix]])
            logits = model.decode(ys, memory, mask)[0, -1].float()
            logits[model.pad_id] = logits[model.bos_id] = -math.inf
            lp = torch.log_softmax(logits, -1).double()
            out[prefix] = (lp_sum + float(lp[model.eos_id])) / ((5.0 + n + 1) / 6.0) ** alpha
            if n < max_tokens:
                nxt += [(prefix + (w,), lp_sum + float(lp[w])) for w in words]
        frontier = nxt
    return out


def sequence_score(model, src_row, toks, alpha):
    """Length-normalized log-probability of ``toks`` + EOS."""
    with torch.no_grad():
        memory, mask = model.encode(src_row[None])
        ys = [model.bos_id]
        total = 0.0
        for tok in list(toks) + [model.eos_id]:
            logits = model.decode(torch.tensor([ys]), memory, mask)[0, -1].float()
            logits[model.pad_id] = logits[model.bos_id] = -math.inf
            total += float(torch.log_softmax(logits, -1).double()[tok])
            ys.append(tok)
    return total / ((5.0 + len(toks) + 1) / 6.0) ** alpha


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_with_a_wide_beam_is_exhaustive(alpha):
    model = tiny_translator(vocab=5, seed=3)   # words: 3, 4
    src = torch.tensor([[3, 4, 4, 2], [4, 2, 0, 0]])
    L = 3
    got = model.beam_search(src, beam_size=16, length_penalty=alpha, max_len_a=0.0, max_len_b=L)
    for b in range(2):
        scores = all_sequence_scores(model, src[b], [3, 4], L, alpha)
        assert len(scores) == 1 + 2 + 4 + 8
        best = max(scores, key=scores.get)
        assert tuple(got[b]) == best, (b, got[b], best, scores)
        assert sequence_score(model, src[b], best, alpha) == pytest.approx(scores[best])


def test_greedy_equals_beam_of_one_and_respects_limits():
    model = tiny_translator(vocab=12, seed=1)
    g = torch.Generator().manual_seed(5)
    src = torch.randint(3, 12, (6, 7), generator=g)
    src[2, 4:] = model.pad_id
    src[5, 1:] = model.pad_id
    greedy = model.greedy_decode(src, max_len_a=1.0, max_len_b=3)
    beam1 = model.beam_search(src, beam_size=1, length_penalty=0.0, max_len_a=1.0, max_len_b=3)
    assert greedy == beam1
    lens = (src != model.pad_id).sum(1).tolist()
    for hyp, n in zip(greedy, lens):
        assert len(hyp) <= n + 3
        assert all(t not in (model.pad_id, model.bos_id, model.eos_id) for t in hyp)
    beam4 = model.beam_search(src, beam_size=4, max_len_a=1.0, max_len_b=3)
    assert len(beam4) == 6
    # sentence-by-sentence decoding gives the same: batching does not matter
    for i in range(6):
        row = src[i:i + 1, :max(1, lens[i])]
        assert model.greedy_decode(row, max_len_b=3) == [greedy[i]]
        assert model.beam_search(row, beam_size=4, max_len_b=3) == [beam4[i]]


def test_beam_finds_at_least_the_greedy_score_on_average():
    model = tiny_translator(vocab=9, seed=2)
    g = torch.Generator().manual_seed(7)
    src = torch.randint(3, 9, (8, 5), generator=g)
    greedy = model.greedy_decode(src, max_len_b=4)
    beam = model.beam_search(src, beam_size=6, length_penalty=0.0, max_len_b=4)
    sg = [sequence_score(model, src[i], greedy[i], 0.0) for i in range(8)]
    sb = [sequence_score(model, src[i], beam[i], 0.0) for i in range(8)]
    assert sum(sb) >= sum(sg) - 1e-9


def test_decoding_bad_input():
    model = tiny_translator()
    with pytest.raises(ValueError, match="src must be a LongTensor"):
        model.greedy_decode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold only padding"):
        model.beam_search(torch.tensor([[3, 2], [0, 0]]))
    with pytest.raises(ValueError, match="beam_size"):
        model.beam_search(torch.ones(1, 3, dtype=torch.long) * 3, beam_size=0)
    with pytest.raises(ValueError, match="search"):
        E.make_translator(model, str.split, " ".join, search="sampling")


def test_bleu_end_to_end_with_translator(tmp_path):
    vocab = Vocab.build(SRC + REF)
    model = tiny_translator(vocab=len(vocab), seed=4)
    s = write_lines(tmp_path / "src", SRC)
    r = write_lines(tmp_path / "ref", REF)
    results = {}
    for search in ("greedy", "beam"):
        tr = E.make_translator(model, vocab.encode, vocab.decode, search=search, beam_size=3,
                               max_len_b=5, device="cpu")
        a = E.evaluate_bleu(tr, s, r, batch_size=2, progress=False)
        b = E.evaluate_bleu(tr, s, r, batch_size=5, progress=False)
        assert a["hypotheses"] == b["hypotheses"] and a["bleu"] == b["bleu"]   # deterministic
        assert 0.0 <= a["bleu"] <= 100.0 and a["n"] == 5
        results[search] = a
    assert Vocab.build(["a b"]).decode(Vocab.build(["a b"]).encode("a b")) == "a b"
    # an empty source sentence (or an encoder returning no ids) still translates
    tr = E.make_translator(model, lambda s: vocab.encode(s, add_eos=False), vocab.decode,
                           search="beam", max_len_b=3)
    assert len(tr(["", "guten Morgen"])) == 2


@pytest.mark.slow
def test_trained_translator_scores_100_float_and_quantized():
    """A tiny Transformer trained to memorize 5 pairs: decoding reproduces the
    references (so masks, positions and the encode/decode protocol agree with
    teacher forcing), in float and after dnateq.quantize."""
    from dnateq.models import PAPER_SKIP, translation_batches
    sv, tv = Vocab.build(SRC), Vocab.build(REF)
    torch.manual_seed(0)
    model = TransformerTranslator(len(sv), len(tv), d_model=32, nhead=4, num_encoder_layers=2,
                                  num_decoder_layers=2, dim_feedforward=64, dropout=0.0)
    batch = translation_batches([sv.encode(s) for s in SRC], [tv.encode(r) for r in REF],
                                len(SRC))[0]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        logits = model(batch["input"])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           batch["target"].reshape(-1), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    for search in ("greedy", "beam"):
        tr = E.make_translator(model, sv.encode, tv.decode, search=search)
        res = E.evaluate_bleu_texts(tr, SRC, REF, batch_size=2, progress=False)
        assert res["hypotheses"] == REF and res["bleu"] == pytest.approx(100.0)
    q = dnateq.quantize(model, [batch], skip=list(PAPER_SKIP), progress=False, calib_batches=1)
    res = E.evaluate_bleu_texts(E.make_translator(q, sv.encode, tv.decode, search="beam"),
                                SRC, REF, progress=False)
    assert res["bleu"] >= 90.0
