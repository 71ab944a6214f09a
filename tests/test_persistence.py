"""dnateq.save / dnateq.load: packed codes on disk, exact round trip, clear errors."""
from __future__ import annotations

import math
import os
import zipfile

import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq import baselines
from dnateq.persistence import DnateqFileError


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 3 * 3, 10)).eval()


def images(n=3, seed=1):
    g = gen(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def quantized():
    model = cnn()
    q = dnateq.quantize(model, images(), progress=False, bits=(3, 5), max_loss=30.0)
    return model, q


def test_round_trip_is_exact_in_every_mode(tmp_path, quantized):
    model, q = quantized
    path = tmp_path / "q.dnateq"
    size = dnateq.save(q, path)
    assert size == os.path.getsize(path)
    q2 = dnateq.load(path, model)
    x = torch.randn(2, 3, 8, 8)
    for name, m in q.named_modules():
        if isinstance(m, (dnateq.nn.ExpLinear, dnateq.nn.ExpConv2d)):
            m2 = dict(q2.named_modules())[name]
            assert m2.params() == m.params()
            assert torch.equal(m2.w_packed, m.w_packed) and torch.equal(m2.w_terms, m.w_terms)
    with torch.no_grad():
        for mode in ("lut", "count", "fake"):
            for mm in (q, q2):
                for m in mm.modules():
                    if hasattr(m, "w_packed"):
                        m.mode = mode
            assert torch.equal(q(x), q2(x)), mode
    r1, r2 = dnateq.report(q).to_dict(), dnateq.report(q2).to_dict()
    assert r1["layers"] == r2["layers"]
    assert r2["totals"]["avg_bits"] == r1["totals"]["avg_bits"]
    assert q2.dnateq_info["threshold"] == q.dnateq_info["threshold"]


def test_float_model_is_untouched_by_load(tmp_path, quantized):
    model, q = quantized
    dnateq.save(q, tmp_path / "q.dnateq")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dnateq.load(tmp_path / "q.dnateq", model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model[0], nn.Conv2d)


@pytest.mark.parametrize("n", [3, 5, 7])
def test_file_size_follows_the_bits(tmp_path, n):
    """A 1024x4096 Linear: the file is the packed codes plus a small fixed overhead;
    packed rows hold ceil(K * (n + 1) / 32) words (sign + n bits per weight)."""
    torch.manual_seed(n)
    big = nn.Sequential(nn.Linear(4096, 1024))
    data = [torch.randn(8, 4096, generator=gen(n))]
    q = dnateq.quantize(big, data, bits=(n,), progress=False, max_loss=100.0)
    size = dnateq.save(q, tmp_path / "big.dnateq")
    packed = 1024 * 4 * math.ceil(4096 * (n + 1) / 32)
    assert q[0].w_packed.numel() == packed
    fixed = 1024 * 4 + 64 * 1024       # float bias + container/metadata allowance
    assert packed <= size <= packed + fixed
    assert size < 4 * 4096 * 1024 * (n + 1) / 32 * 1.02 + fixed   # vs fp32: the bit ratio


def test_uniform_baseline_round_trip(tmp_path):
    model = cnn()
    u = baselines.uniform_quantize(model, images(), bits={"0": 8, "3": (4, 5), "6": 3},
                                   progress=False)
    dnateq.save(u, tmp_path / "u.dnateq")
    u2 = dnateq.load(tmp_path / "u.dnateq", model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(u(x), u2(x))
    assert baselines.summary(u2)["bits"] == baselines.summary(u)["bits"]


def test_transformer_with_split_attention_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                           batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    data = [torch.randn(2, 5, 16, generator=gen(i)) for i in range(2)]
    q = dnateq.quantize(enc, data, progress=False, bits=(4,), max_loss=100.0)
    dnateq.save(q, tmp_path / "t.dnateq")
    q2 = dnateq.load(tmp_path / "t.dnateq", enc)
    assert sum(isinstance(m, dnateq.nn.ExpLinear) for m in q2.modules()) == 2 * (4 + 2)
    with torch.no_grad():
        assert torch.equal(q(data[0]), q2(data[0]))


def test_model_built_with_split_attention_round_trip(tmp_path):
    """A float model whose attention is already split (dnateq.models'
    Transformer builds ExpMultiheadAttention itself) loads without re-splitting."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                           batch_first=True), 1,
                                enable_nested_tensor=False).eval()
    enc.layers[0].self_attn = dnateq.nn.ExpMultiheadAttention.from_float(enc.layers[0].self_attn)
    data = [torch.randn(2, 5, 16, generator=gen(i)) for i in range(2)]
    q = dnateq.quantize(enc, data, progress=False, bits=(4,), max_loss=100.0)
    dnateq.save(q, tmp_path / "s.dnateq")
    q2 = dnateq.load(tmp_path / "s.dnateq", enc)
    with torch.no_grad():
        assert torch.equal(q(data[0]), q2(data[0]))


# -- bad files ---------------------------------------------------------------

def _saved(tmp_path, quantized):
    path = tmp_path / "q.dnateq"
    dnateq.save(quantized[1], path)
    return path


def test_truncated_file(tmp_path, quantized):
    path = _saved(tmp_path, quantized)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.dnateq"
        bad.write_bytes(data[:cut])
        with pytest.raises(DnateqFileError, match="truncated or corrupt"):
            dnateq.load(bad, quantized[0])


def test_flipped_bytes_in_the_codes_are_caught(tmp_path, quantized):
    """Rewrite the archive with one byte of a tensor record changed: the zip
    stays valid, the per-tensor SHA-256 catches it."""
    path = _saved(tmp_path, quantized)
    bad = tmp_path / "flip.dnateq"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        records = [n for n in names if "/data/" in n]
        largest = max(records, key=lambda n: zin.getinfo(n).file_size)
        for n in names:
            b = bytearray(zin.read(n))
            if n == largest:
                b[len(b) // 2] ^= 0x5A
            zout.writestr(zin.getinfo(n), bytes(b))
    with pytest.raises(DnateqFileError, match="SHA-256"):
        dnateq.load(bad, quantized[0])


def test_not_a_dnateq_file(tmp_path, quantized):
    other = tmp_path / "sd.pt"
    torch.save(quantized[0].state_dict(), other)
    with pytest.raises(DnateqFileError, match="not a dnateq quantized-model file"):
        dnateq.load(other, quantized[0])
    junk = tmp_path / "junk.dnateq"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(DnateqFileError, match="truncated or corrupt"):
        dnateq.load(junk, quantized[0])
    with pytest.raises(FileNotFoundError, match="no such file"):
        dnateq.load(tmp_path / "missing.dnateq", quantized[0])


def test_newer_format_version(tmp_path, quantized):
    path = _saved(tmp_path, quantized)
    blob = torch.load(path, weights_only=True)
    blob["version"] = 99
    torch.save(blob, path)
    with pytest.raises(DnateqFileError, match="format version 99"):
        dnateq.load(path, quantized[0])


def test_mismatched_float_model(tmp_path, quantized):
    path = _saved(tmp_path, quantized)
    wrong_shape = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.ReLU(),
                                nn.Flatten(), nn.Linear(8 * 3 * 3, 12))
    with pytest.raises(DnateqFileError, match=r"layer '6'.*weight shape"):
        dnateq.load(path, wrong_shape)
    wrong_geometry = cnn()
    wrong_geometry[3].stride = (1, 1)
    with pytest.raises(DnateqFileError, match="conv geometry"):
        dnateq.load(path, wrong_geometry)
    wrong_type = cnn()
    wrong_type[6] = nn.Identity()
    with pytest.raises(DnateqFileError, match="layer '6' should be Linear, found Identity"):
        dnateq.load(path, wrong_type)
    extra_layer = nn.Sequential(*cnn(), nn.LayerNorm(10))
    with pytest.raises(DnateqFileError, match="missing tensors"):
        dnateq.load(path, extra_layer)


def test_save_refuses_a_float_model(tmp_path):
    with pytest.raises(ValueError, match="no quantized layer"):
        dnateq.save(cnn(), tmp_path / "f.dnateq")
    assert not (tmp_path / "f.dnateq").exists()
    with pytest.raises(TypeError, match="qmodel must be an nn.Module"):
        dnateq.save({"a": 1}, tmp_path / "f.dnateq")
    with pytest.raises(TypeError, match="float_model must be an nn.Module"):
        dnateq.load(tmp_path / "f.dnateq", "resnet")


# -- integrity of every section (issue 14 item 2) -------------------------------

def _rewrite(path, mutate, reseal=False):
    """Load the raw blob, ``mutate(blob)``, save it back; ``reseal`` recomputes the
    section checksums (a crafted, internally consistent file)."""
    from dnateq import persistence as P
    blob = torch.load(path, weights_only=True)
    mutate(blob)
    if reseal:
        blob["sections_sha256"] = {k: P._section_digest(blob.get(k)) for k in P._SECTIONS}
    torch.save(blob, path)


def _change_alpha_digit(blob):
    import json
    layers = json.loads(blob["layers"])
    name = next(iter(layers))
    a = layers[name]["extra"]["params"]["alpha"]
    s = repr(a)
    i = s.index(".") + 3   # the third decimal
    layers[name]["extra"]["params"]["alpha"] = float(s[:i] + str((int(s[i]) + 1) % 10)
                                                     + s[i + 1:])
    assert layers[name]["extra"]["params"]["alpha"] != a
    blob["layers"] = json.dumps(layers)


def test_changed_alpha_digit_fails_its_checksum(tmp_path, quantized):
    path = _saved(tmp_path, quantized)
    _rewrite(path, _change_alpha_digit)
    with pytest.raises(DnateqFileError, match=r"section 'layers': fails its SHA-256"):
        dnateq.load(path, quantized[0])


@pytest.mark.parametrize("section,value", [
    ("info", '{"threshold": 0.1, "changed": true}'), ("mha", ["0"]),
    ("baseline", '{"kind": "uniform"}'), ("sha256", {})])
def test_every_section_is_checksummed(tmp_path, quantized, section, value):
    path = _saved(tmp_path, quantized)
    _rewrite(path, lambda b: b.__setitem__(section, value))
    with pytest.raises(DnateqFileError, match=rf"section '{section}': fails its SHA-256"):
        dnateq.load(path, quantized[0])


def _set_param(key, value):
    def mutate(blob):
        import json
        layers = json.loads(blob["layers"])
        layers[next(iter(layers))]["extra"]["params"][key] = value
        blob["layers"] = json.dumps(layers)
    return mutate


@pytest.mark.parametrize("mutate,section,match", [
    (lambda b: b.__setitem__("info", '{"threshold": 0.1'), "info", "not valid JSON"),
    (lambda b: b.__setitem__("layers", "[1, 2"), "layers", "not valid JSON"),
    (lambda b: b.__setitem__("layers", "[1, 2]"), "layers", "expected a JSON object"),
    (lambda b: b.__setitem__("layers", '{"0": 5}'), "layers", "expected an object"),
    (lambda b: b.__setitem__("layers", '{"0": {"class": "ExpLinear"}}'), "layers",
     "'extra' must be an object"),
    (lambda b: b.__setitem__("layers", 7), "layers", "expected a JSON string"),
    (lambda b: b.__setitem__("mha", "0"), "mha", "expected a list of module names"),
    (lambda b: b.__setitem__("mha", [1]), "mha", "expected a list of module names"),
    (lambda b: b.__setitem__("info", 3), "info", "expected a JSON string or None"),
    (lambda b: b.__setitem__("state", [1]), "state", "expected a dict of named tensors"),
    (lambda b: b.__setitem__("sha256", {"0.bias": 5}), "sha256", "expected a dict of hex"),
    (lambda b: b.__setitem__("sections_sha256", "x"), "sections_sha256", "expected a dict"),
    (_set_param("alpha", "2.0"), "layers", "parameter 'alpha' must be a finite number > 1"),
    (_set_param("alpha", 0.5), "layers", "parameter 'alpha'"),
    (_set_param("bits", 9), "layers", "parameter 'bits' must be an int in"),
    (_set_param("bits", True), "layers", "parameter 'bits'"),
    (_set_param("w_shape", [8, "3"]), "layers", "parameter 'w_shape'"),
    (_set_param("rounding", "up"), "layers", "parameter 'rounding'"),
    (_set_param("a_signed", 1), "layers", "parameter 'a_signed' must be a bool"),
    (_set_param("sw", float("nan")), "layers", "parameter 'sw'"),
])
def test_malformed_sections_raise_dnateq_file_error(tmp_path, quantized, mutate, section,
                                                    match):
    """Crafted files whose checksums were recomputed: the structure is checked
    too, and the error names the file and the section."""
    path = _saved(tmp_path, quantized)
    _rewrite(path, mutate, reseal=section != "sections_sha256")
    with pytest.raises(DnateqFileError, match=rf"{section}.*{match}|{match}") as e:
        dnateq.load(path, quantized[0])
    assert str(path) in str(e.value) and section in str(e.value)


def test_malformed_geometry_mode_and_counter_bits(tmp_path, quantized):
    import json
    for key, value, match in (("geometry", {"stride": [1]}, "malformed conv geometry"),
                              ("mode", "bogus", "mode must be one of"),
                              ("counter_bits", 99, "counter_bits must be None or an int")):
        path = _saved(tmp_path, quantized)

        def mutate(blob):
            layers = json.loads(blob["layers"])
            entry = layers["0"]
            if key == "geometry":
                entry["geometry"] = value
            else:
                entry["extra"][key] = value
            blob["layers"] = json.dumps(layers)
        _rewrite(path, mutate, reseal=True)
        with pytest.raises(DnateqFileError, match=rf"section 'layers': layer '0': {match}"):
            dnateq.load(path, quantized[0])


def test_tensor_dtype_or_shape_change_fails_its_checksum(tmp_path, quantized):
    path = _saved(tmp_path, quantized)
    _rewrite(path, lambda b: b["state"].__setitem__("6.bias", b["state"]["6.bias"].view(2, 5)))
    with pytest.raises(DnateqFileError, match="tensor '6.bias' fails its SHA-256"):
        dnateq.load(path, quantized[0])


def test_format_version_1_files_still_load(tmp_path, quantized):
    """A file as format version 1 wrote it (tensor digests over the bytes only,
    no section checksums) loads to the same model."""
    import hashlib
    model, q = quantized
    path = _saved(tmp_path, quantized)

    def to_v1(blob):
        blob["version"] = 1
        del blob["sections_sha256"]
        blob["sha256"] = {k: hashlib.sha256(v.contiguous().reshape(-1).view(torch.uint8)
                                            .numpy().tobytes()).hexdigest()
                          for k, v in blob["state"].items()}
    _rewrite(path, to_v1)
    q1 = dnateq.load(path, model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(q1(x), q(x))
    _rewrite(path, lambda b: b.__setitem__("version", 0))
    with pytest.raises(DnateqFileError, match="format version 0"):
        dnateq.load(path, model)
