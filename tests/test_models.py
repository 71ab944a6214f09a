"""dnateq.models: torchvision AlexNet/ResNet-50 (offline-safe weights), the
Transformer-base translator with the paper's 96 FC layers, the CIFAR ResNets."""
from __future__ import annotations

import copy
import os
import urllib.error

import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq import models as M
from dnateq.nn import ExpLinear, ExpMultiheadAttention


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors: intra-op threads only add contention on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


# ---------------------------------------------------------------------------
# torchvision CNNs
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet50_sd(tmp_path_factory):
    """A (random) ResNet-50 state dict with 10 classes, saved once."""
    torch.manual_seed(0)
    m = M.resnet50(num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "r50.pth"
    torch.save(m.state_dict(), path)
    return path, m


def test_weights_none_builds_offline():
    a = M.alexnet()
    assert count(a, nn.Conv2d) == 5 and count(a, nn.Linear) == 3
    assert not a.training
    with torch.no_grad():
        assert a(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    r = M.resnet50(weights=None)
    assert count(r, nn.Conv2d) == 53 and count(r, nn.Linear) == 1
    assert r.fc.out_features == 1000


def test_missing_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    import torchvision.models._api as api

    def offline(url, *a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        for build, spec, fname in [(M.alexnet, "DEFAULT", "alexnet-owt-7be5be79.pth"),
                                   (M.resnet50, "IMAGENET1K_V1", "resnet50-0676ba61.pth"),
                                   (M.resnet50, "ResNet50_Weights.IMAGENET1K_V2",
                                    "resnet50-11ad3fa6.pth")]:
            with pytest.raises(RuntimeError) as ei:
                build(spec)
            msg = str(ei.value)
            assert "could not be downloaded" in msg and "URLError" in msg
            assert os.path.join(str(tmp_path / "hub"), "checkpoints", fname) in msg
            assert "weights='/path/to/" + fname in msg and "https://download.pytorch.org" in msg
    finally:
        torch.hub.set_dir(old)


def test_weights_found_in_the_hub_cache(tmp_path, resnet50_sd, monkeypatch):
    """A file placed where the offline message says is used, without a download."""
    from torchvision.models import ResNet50_Weights

    def no_network(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr("torch.hub.download_url_to_file", no_network)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        torch.manual_seed(1)
        ref = M.resnet50()   # 1000 classes, as the enum's metadata says
        path = M.hub_checkpoint_path(ResNet50_Weights.IMAGENET1K_V1)
        assert path.startswith(str(tmp_path / "hub"))
        os.makedirs(os.path.dirname(path))
        torch.save(ref.state_dict(), path)
        got = M.resnet50("IMAGENET1K_V1")
        assert torch.equal(got.fc.weight, ref.fc.weight)
        assert torch.equal(got.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)
        # a damaged cached file gets a message that names it
        with open(path, "r+b") as f:
            f.truncate(1000)
        with pytest.raises(RuntimeError, match="cached weights file .* delete it"):
            M.resnet50("IMAGENET1K_V1")
    finally:
        torch.hub.set_dir(old)


def test_local_checkpoint(tmp_path, resnet50_sd):
    path, ref = resnet50_sd
    got = M.resnet50(str(path))             # num_classes from the checkpoint
    assert got.fc.out_features == 10 and not got.training
    for (k, v), (k2, v2) in zip(got.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # DDP-style wrapper and prefixes
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v
                                           for k, v in ref.state_dict().items()}}, wrapped)
    got2 = M.resnet50(wrapped)
    assert torch.equal(got2.conv1.weight, ref.conv1.weight)


def test_bad_checkpoints(tmp_path, resnet50_sd):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 20)
    with pytest.raises(RuntimeError, match="cannot read checkpoint .*corrupt"):
        M.resnet50(str(garbage))
    path, _ = resnet50_sd
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(RuntimeError, match="corrupt, truncated"):
        M.resnet50(str(trunc))
    with pytest.raises(FileNotFoundError, match="weights='/no/such/file.pth'"):
        M.alexnet("/no/such/file.pth")
    with pytest.raises(ValueError, match="IMAGENET1K_V7.*AlexNet_Weights"):
        M.alexnet("IMAGENET1K_V7")
    # a whole pickled model is refused unless trusted
    full = tmp_path / "full.pt"
    torch.save(nn.Linear(3, 2), full)
    with pytest.raises(RuntimeError, match="trust_checkpoint=True"):
        M.alexnet(str(full))
    # ...and, trusted, must still fit the architecture
    with pytest.raises(RuntimeError, match="does not fit the model: .*missing key"):
        M.alexnet(str(full), trust_checkpoint=True)
    # the wrong architecture: the message names keys
    other = tmp_path / "cifar.pt"
    torch.save(M.resnet20().state_dict(), other)
    with pytest.raises(RuntimeError, match="does not fit the model.*unexpected key"):
        M.alexnet(str(other))
    notsd = tmp_path / "notsd.pt"
    torch.save({"epoch": 3, "lr": 0.1}, notsd)
    with pytest.raises(RuntimeError, match="holds no state dict"):
        M.alexnet(str(notsd))


# ---------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------

SMALL = dict(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0)


def test_transformer_base_has_the_papers_96_fc_layers():
    m = M.transformer_base(37, 41, **SMALL)
    fc = m.fc_layers()
    assert len(fc) == M.PAPER_FC_LAYERS == 96
    enc = [n for n in fc if ".encoder." in n]
    dec = [n for n in fc if ".decoder." in n]
    assert len(enc) == 6 * 6 and len(dec) == 6 * 10
    assert sum(n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for n in fc) == 72
    assert count(m, nn.MultiheadAttention) == 0 and count(m, ExpMultiheadAttention) == 18
    # the output projection is counted separately (tied to the target embedding)
    assert "generator" not in fc and m.generator.weight is m.tgt_embed.weight
    assert count(m, nn.Linear) == 97
    # nn.MultiheadAttention hides Q/K/V: only out_proj and the FFN are Linears
    packed = M.TransformerTranslator(37, 41, separate_qkv=False, **SMALL)
    assert len(M.paper_fc_layers(packed)) == 6 * 3 + 6 * 4
    assert len(M.paper_fc_layers(M.split_qkv(packed))) == 96


def test_real_size_transformer_base():
    m = M.transformer_base(32000, 32000, share_embeddings=True)
    assert m.config["d_model"] == 512 and len(m.fc_layers()) == 96
    n_params = sum(p.numel() for p in m.parameters())
    # Vaswani et al.: 65M parameters for base with a 37k shared vocabulary
    assert 55e6 < n_params < 70e6


def test_split_qkv_is_exact():
    torch.manual_seed(0)
    packed = M.TransformerTranslator(30, 30, separate_qkv=False, num_encoder_layers=2,
                                     num_decoder_layers=2, **SMALL).eval()
    split = M.split_qkv(copy.deepcopy(packed))
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, 30, (3, 7), generator=g)
    src[1, 4:] = 0
    tgt = torch.randint(3, 30, (3, 5), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(split(src, tgt), packed(src, tgt), rtol=1e-5, atol=1e-6)
        assert torch.equal(split((src, tgt)), split(src, tgt))
    with pytest.raises(ValueError, match=r"needs \(src, tgt_in\)"):
        split(src)


def test_quantize_takes_exactly_the_96_layers():
    torch.manual_seed(0)
    m = M.transformer_base(40, 40, **SMALL).eval()
    g = torch.Generator().manual_seed(1)

    def sent():
        n = int(torch.randint(3, 9, (1,), generator=g))
        return torch.randint(3, 40, (n,), generator=g).tolist() + [2]
    pairs = [(sent(), sent()) for _ in range(16)]
    batches = M.translation_batches([p[0] for p in pairs], [p[1] for p in pairs], 8)
    q = dnateq.quantize(m, batches, skip=list(M.PAPER_SKIP), progress=False, calib_batches=2,
                        sample_size=2048, max_threshold=0.02)
    names = [n for n, mod in q.named_modules() if isinstance(mod, ExpLinear)]
    assert len(names) == 96 and set(names) == set(M.paper_fc_layers(m))
    assert isinstance(q.generator, nn.Linear) and not isinstance(q.generator, ExpLinear)
    with torch.no_grad():
        out = q(batches[0]["input"])
    assert out.shape == (8, batches[0]["input"][1].shape[1], 40)
    assert q.greedy_decode(batches[0]["input"][0], max_len_b=3)   # decodes


def test_translation_batches():
    b = M.translation_batches([[5, 6, 2], [7, 2]], [[8, 2], [9, 9, 9, 2]], batch_size=2)
    assert len(b) == 1
    src, tin = b[0]["input"]
    assert src.tolist() == [[5, 6, 2], [7, 2, 0]]
    assert tin.tolist() == [[1, 8, 0, 0], [1, 9, 9, 9]]
    assert b[0]["target"].tolist() == [[8, 2, 0, 0], [9, 9, 9, 2]]
    with pytest.raises(ValueError, match="batch_size"):
        M.translation_batches([[1]], [[1]], 0)
    with pytest.raises(ValueError, match="1 sources but 2 targets"):
        M.translation_batches([[1]], [[1], [2]], 1)


def test_translator_checkpoints(tmp_path):
    torch.manual_seed(0)
    m = M.TransformerTranslator(25, 26, num_encoder_layers=1, num_decoder_layers=2,
                                **SMALL).eval()
    src = torch.randint(3, 25, (2, 6))
    tgt = torch.randint(3, 26, (2, 4))
    with torch.no_grad():
        ref = m(src, tgt)
    p = tmp_path / "t.pt"
    m.save_checkpoint(p)
    got = M.TransformerTranslator.from_checkpoint(p)
    with torch.no_grad():
        assert torch.equal(got(src, tgt), ref)
    # a checkpoint of the packed nn.MultiheadAttention model is split on load
    torch.manual_seed(0)
    packed = M.TransformerTranslator(25, 26, num_encoder_layers=1, num_decoder_layers=2,
                                     separate_qkv=False, **SMALL).eval()
    p2 = tmp_path / "packed.pt"
    torch.save(packed.state_dict(), p2)
    with pytest.raises(ValueError, match="src_vocab"):
        M.TransformerTranslator.from_checkpoint(p2)
    got2 = M.TransformerTranslator.from_checkpoint(p2, src_vocab=25, tgt_vocab=26,
                                                   num_encoder_layers=1, num_decoder_layers=2,
                                                   **SMALL)
    assert count(got2, ExpMultiheadAttention) == 1 + 2 * 2
    with torch.no_grad():
        torch.testing.assert_close(got2(src, tgt), packed(src, tgt), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="does not fit"):
        M.TransformerTranslator.from_checkpoint(p2, src_vocab=25, tgt_vocab=26, **SMALL)


def test_translator_bad_arguments():
    with pytest.raises(ValueError, match="src_vocab"):
        M.TransformerTranslator(2, 10)
    with pytest.raises(ValueError, match="distinct"):
        M.TransformerTranslator(10, 10, pad_id=1, bos_id=1)
    with pytest.raises(ValueError, match="share_embeddings"):
        M.TransformerTranslator(10, 11, share_embeddings=True)
    m = M.TransformerTranslator(10, 10, max_len=8, **SMALL)
    with pytest.raises(ValueError, match="max_len=8"):
        m.encode(torch.ones(1, 9, dtype=torch.long))


def test_vocab():
    v = M.Vocab.build(["a b c", "b d"])
    assert len(v) == 4 + 4
    assert v.encode("a d zz") == [4, 7, v.unk_id, v.eos_id]
    assert v.decode([1, 4, 7, 2, 5]) == "a d"


# ---------------------------------------------------------------------------
# CIFAR ResNets (../shared/data)
# ---------------------------------------------------------------------------

def test_cifar_exports_still_work():
    assert count(M.resnet20(), nn.Conv2d) == 19 and count(M.resnet32(), nn.Conv2d) == 31
    assert M.cifar_resnet(44).layer1.__len__() == 7
    assert callable(M.load_cifar_resnet)


def test_pretrained_cifar_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="DNATEQ_SHARED_DATA"):
        M.pretrained_cifar_resnet(20, data_dir=str(tmp_path))


@pytest.mark.real
@pytest.mark.parametrize("depth", [20, 32])
def test_pretrained_cifar_resnets(depth):
    d = M.shared_data_dir()
    if not os.path.isfile(os.path.join(d, f"resnet{depth}_cifar10.th")):
        pytest.skip(f"real data not found in {d} (set DNATEQ_SHARED_DATA)")
    m = M.pretrained_cifar_resnet(depth)     # read with weights_only=True
    ref = M.load_cifar_resnet(os.path.join(d, f"resnet{depth}_cifar10.th"))
    assert not m.training
    assert list(m.state_dict()) == list(ref.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k


@pytest.mark.real
@pytest.mark.slow
def test_pretrained_cifar_resnet32_accuracy():
    # (ResNet-20's, through dnateq.eval, is in test_eval.py)
    d = M.shared_data_dir()
    if not os.path.isfile(os.path.join(d, "resnet32_cifar10.th")):
        pytest.skip(f"real data not found in {d} (set DNATEQ_SHARED_DATA)")
    from dnateq.eval import cifar10_dataset
    x, y = cifar10_dataset("test")[:]
    with torch.no_grad():
        acc = 100.0 * float((M.pretrained_cifar_resnet(32)(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(93.17, abs=0.01)   # the shared README's measured value
