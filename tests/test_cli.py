"""``python -m dnateq quantize | eval | demo | ops``: every subcommand on tiny
generated data (and on the real CIFAR subsets where present), the files
``quantize --out`` writes, the ``eval --quantized`` round trip, and the
argparse-style usage errors (exit status 2).

Most tests call ``dnateq.__main__.main(argv)`` in this process (no interpreter
start-up per call); one runs the real ``python -m dnateq`` in a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dnateq import __main__ as dm
from dnateq import cli
from dnateq.models import TransformerTranslator, Vocab, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cat"]
COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
SRC = ["ein Hund", "eine Katze schlaeft", "der Baum ist alt", "ein roter Hund", "es regnet",
       "guten Morgen"]
REF = ["a dog", "a cat sleeps", "the tree is old", "a red dog", "it rains", "good morning"]


def has_cifar() -> bool:
    d = shared_data_dir()
    return all(os.path.isfile(os.path.join(d, f)) for f in
               ("resnet20_cifar10.th", "cifar10_test_761.npz", "cifar10_train_761.npz"))


def write_images(root: Path, per_class: int, seed: int) -> None:
    """Tiny class-coloured noise images, 40x40 PNG, one folder per class."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array(COLORS[c], dtype=np.float64)[None, None, :] * 0.7
            arr = (base + rng.integers(0, 80, (40, 40, 3))).clip(0, 255).astype("uint8")
            Image.fromarray(arr).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def imagenet_standin(tmp_path_factory):
    """train/ (4 per class) and val/ (3 per class), and a ResNet-50 checkpoint
    with a 3-class head (random weights: the accuracy is the pipeline's, not
    a trained model's)."""
    import torchvision
    d = tmp_path_factory.mktemp("inet")
    write_images(d / "train", 4, 0)
    write_images(d / "val", 3, 1)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None, num_classes=3).state_dict(),
               d / "r50.pth")
    return d


def run_main(argv, capsys):
    rc = dm.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        dm.main([str(a) for a in argv])
    assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert "usage: python -m dnateq" in err and "error:" in err
    return err


SMALL = ["--bits", "3,4", "--threshold-step", "2%", "--max-threshold", "4%", "--no-progress",
         "--workers", "0"]


# ---------------------------------------------------------------------------
# quantize + eval on a generated ImageFolder with ResNet-50
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_quantize_resnet50_imagefolder_and_eval_round_trip(imagenet_standin, tmp_path, capsys):
    d = imagenet_standin
    out = tmp_path / "run"
    common = ["--model", "resnet50", "--weights", d / "r50.pth", "--imagenet", d,
              "--resize", "36", "--crop", "32", "--batch-size", "8"]
    rc, printed, _ = run_main(["quantize", *common, "--calib-images", "8", *SMALL,
                               "--out", out], capsys)
    assert rc == 0
    for f in ("model.dnateq", "report.md", "report.csv", "report.json", "summary.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "resnet50" and s["metric"] == "top1" and s["layers"] == 54
    assert s["data"]["eval_images"] == 9 and s["data"]["classes"] == 3
    assert "8 images of" in s["data"]["calibration"] and "train" in s["data"]["calibration"]
    assert s["float"]["n"] == s["dnateq"]["n"] == 9
    assert 3.0 <= s["avg_bits"] <= 4.0 and s["storage_bits"] == pytest.approx(s["avg_bits"] + 1)
    assert s["loss"] <= 1.0 + 1e-9                       # max_loss in points of top-1
    assert s["file_bytes"] == (out / "model.dnateq").stat().st_size
    assert s["options"]["bits"] == [3, 4] and s["options"]["threshold_step"] == 0.02
    # printed: the per-layer report and the summary table
    # (the default smoothing pass marks the layers it smoothed)
    assert re.search(r"\| conv1( \(smoothed\))? \| Conv2d \|", printed)
    assert "DNA-TEQ" in printed and "float32" in printed
    md = (out / "report.md").read_text()
    assert "## Per-layer report" in md and "## Threshold loop" in md
    assert (out / "report.csv").read_text().count("\n") == 55   # header + 54 layers
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["report"]["layers"]) == 54 and "history" in rep["calibration"]

    # eval: the float model, then the saved quantized one, equal the quantize run's numbers
    ej = tmp_path / "float.json"
    rc, printed, _ = run_main(["eval", *common, "--workers", "0", "--no-progress",
                               "--json", ej], capsys)
    assert rc == 0 and "float32" in printed and "top-1" in printed
    assert json.loads(ej.read_text())["result"]["correct"] == s["float"]["correct"]
    qj = tmp_path / "q.json"
    rc, printed, _ = run_main(["eval", *common, "--workers", "0", "--no-progress",
                               "--quantized", out / "model.dnateq", "--json", qj], capsys)
    assert rc == 0 and "DNA-TEQ" in printed
    q = json.loads(qj.read_text())
    assert q["result"]["correct"] == s["dnateq"]["correct"]
    assert q["avg_bits"] == pytest.approx(s["avg_bits"])


@pytest.mark.slow
def test_quantize_single_folder_splits_calibration_from_evaluation(imagenet_standin, tmp_path,
                                                                   capsys):
    """One folder of classes (no train/val): calibration and evaluated images
    are disjoint; the proxy metric needs no labels; one bit-width is quick."""
    d = imagenet_standin
    rc, _, _ = run_main(["quantize", "--model", "resnet50", "--weights", d / "r50.pth",
                         "--imagenet", d / "val", "--crop", "32", "--calib-images", "3",
                         "--batch-size", "3", "--metric", "proxy", "--bits", "4",
                         "--no-progress", "--workers", "0", "--out", tmp_path], capsys)
    assert rc == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["metric"] == "proxy" and s["bits_histogram"] == {"4": 54}
    assert s["data"]["eval_images"] == 6                 # 9 images - 3 for calibration
    assert "disjoint" in s["data"]["calibration"]
    assert s["data"]["preprocessing"] == "resize 37, center crop 32"


# ---------------------------------------------------------------------------
# the real CIFAR-10 ResNet-20
# ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.real
def test_quantize_cifar_resnet20_with_baselines_and_eval(tmp_path, capsys):
    if not has_cifar():
        pytest.skip(f"real data not found in {shared_data_dir()} (set DNATEQ_SHARED_DATA)")
    out = tmp_path / "r20"
    rc, printed, _ = run_main(["quantize", "--model", "cifar-resnet20", "--cifar",
                               "--limit", "96", "--calib-images", "32", "--batch-size", "32",
                               "--sample-size", "8192", "--bits", "3-7",
                               "--threshold-step", "3%", "--max-threshold", "9%",
                               "--baselines", "--no-progress", "--out", out], capsys)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["float"]["n"] == 96 and s["data"]["source"] == "cifar10"
    assert s["float"]["top1"] > 80.0                     # the trained network
    assert s["float"]["top1"] - s["dnateq"]["top1"] <= 1.0 + 1e-9
    assert set(s["baselines"]) == {"int8", "uniform_paper", "uniform_storage"}
    assert "uniform INT8" in printed and "DNA-TEQ's storage bits" in printed
    rc, printed, _ = run_main(["eval", "--model", "cifar-resnet20", "--limit", "96",
                               "--quantized", out / "model.dnateq", "--no-progress"], capsys)
    assert rc == 0 and f"top-1 {s['dnateq']['top1']:.2f} %" in printed


# ---------------------------------------------------------------------------
# a tiny TransformerTranslator checkpoint on sentence files
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def translation_standin(tmp_path_factory):
    d = tmp_path_factory.mktemp("mt")
    (d / "src.txt").write_text("\n".join(SRC) + "\n", encoding="utf-8")
    (d / "ref.txt").write_text("\n".join(REF) + "\n", encoding="utf-8")
    vocab = Vocab.build(SRC + REF)
    (d / "vocab.txt").write_text("\n".join(vocab.itos) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    m = TransformerTranslator(len(vocab), len(vocab), d_model=16, nhead=2, num_encoder_layers=1,
                              num_decoder_layers=1, dim_feedforward=32, dropout=0.0)
    m.save_checkpoint(d / "mt.pt")
    torch.save(m.state_dict(), d / "bare.pt")   # no stored configuration
    return d


def test_quantize_and_eval_transformer_on_sentence_files(translation_standin, tmp_path, capsys):
    d = translation_standin
    common = ["--model", "transformer", "--weights", d / "mt.pt", "--vocab", d / "vocab.txt",
              "--src", d / "src.txt", "--ref", d / "ref.txt", "--decode", "greedy",
              "--batch-size", "4", "--no-progress"]
    rc, printed, err = run_main(["quantize", *common, "--bits", "4,6", "--max-loss", "100",
                                 "--threshold-step", "5%", "--max-threshold", "10%",
                                 "--out", tmp_path], capsys)
    assert rc == 0 and "BLEU" in printed
    assert "calibrating on the evaluated sentences" in err      # said, not hidden
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["metric"] == "bleu" and s["float"]["n"] == 6
    # the paper's layers: everything in model.transformer, not the output projection
    # (1 encoder layer x 6 + 1 decoder layer x 10 FC layers)
    assert s["layers"] == 16
    rep = json.loads((tmp_path / "report.json").read_text())
    assert "generator" in rep["report"]["skipped"]
    qj = tmp_path / "q.json"
    rc, printed, _ = run_main(["eval", *common, "--quantized", tmp_path / "model.dnateq",
                               "--json", qj], capsys)
    assert rc == 0
    assert json.loads(qj.read_text())["result"]["bleu"] == pytest.approx(s["dnateq"]["bleu"])


def test_transformer_bare_checkpoint_needs_its_configuration(translation_standin, capsys):
    d = translation_standin
    err = usage_error(["eval", "--model", "transformer", "--weights", d / "bare.pt",
                       "--vocab", d / "vocab.txt", "--src", d / "src.txt", "--ref",
                       d / "ref.txt", "--no-progress"], capsys)
    assert "does not fit the model" in err


# ---------------------------------------------------------------------------
# usage errors: argparse-style message, exit status 2
# ---------------------------------------------------------------------------

def test_usage_errors_exit_2(imagenet_standin, translation_standin, tmp_path, capsys):
    d, t = imagenet_standin, translation_standin
    cases = [
        (["quantize", "--model", "resnet50", "--imagenet", tmp_path / "nope", "--weights",
          "random"], "is not a directory"),
        (["quantize", "--model", "resnet50", "--imagenet", d], "needs --weights"),
        (["quantize", "--model", "resnet50"], "needs --imagenet DIR"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights",
          tmp_path / "missing.pth"], "does not exist"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--cifar"], "not allowed with"),
        (["quantize", "--model", "cifar-resnet20", "--imagenet", d], "takes --cifar"),
        (["quantize", "--model", "cifar-resnet20", "--cifar", tmp_path / "nocifar"],
         "does not exist"),
        (["quantize", "--model", "transformer", "--src", t / "src.txt"], "needs --ref"),
        (["quantize", "--model", "transformer", "--src", t / "src.txt", "--ref",
          t / "ref.txt", "--weights", t / "mt.pt"], "needs --vocab"),
        (["quantize", "--model", "transformer"], "needs --src FILE and --ref FILE"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "random",
          "--metric", "bleu"], "--metric bleu is for --model transformer"),
        (["quantize", "--model", "transformer", "--src", t / "src.txt", "--ref",
          t / "ref.txt", "--weights", t / "mt.pt", "--vocab", t / "vocab.txt",
          "--metric", "top1"], "--metric top1 is for classifiers"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "random",
          "--bits", "2-9"], "bits must be exponent bit-widths in 2..7"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "random",
          "--bits", "x"], "invalid bits"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "random",
          "--threshold-step", "5"], "as a fraction, or a percentage"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "random",
          "--threshold-step", "10%", "--max-threshold", "5%"], "exceeds --max-threshold"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "random",
          "--calib-src", t / "src.txt"], "go together"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "random",
          "--calib-dir", tmp_path / "none"], "--calib-dir"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "random",
          "--vocab", t / "vocab.txt"], "--vocab/--tgt-vocab are for --model transformer"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "IMAGENET1K_V9"],
         "IMAGENET1K_V9"),
        (["quantize", "--model", "resnet50", "--imagenet", d, "--weights", "random",
          "--batch-size", "0"], "positive integer"),
        (["quantize", "--model", "resnet9"], "invalid choice"),
        (["eval", "--model", "resnet50", "--imagenet", d, "--weights", d / "r50.pth",
          "--quantized", tmp_path / "none.dnateq"], "--quantized"),
        (["eval", "--model", "resnet50", "--imagenet", d, "--weights", d / "r50.pth",
          "--mode", "count"], "--mode applies to a --quantized model"),
        (["eval", "--model", "resnet50", "--imagenet", d, "--weights", d / "r50.pth",
          "--json", tmp_path / "no" / "dir.json"], "does not exist"),
        (["eval", "--model", "resnet50", "--imagenet", d, "--weights", d / "r50.pth",
          "--src", t / "src.txt"], "not allowed with"),
    ]
    for argv, needle in cases:
        err = usage_error(argv, capsys)
        assert needle in err, (argv, err[-400:])


def test_checkpoint_and_file_mismatches_are_usage_errors(imagenet_standin, tmp_path, capsys):
    d = imagenet_standin
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    err = usage_error(["eval", "--model", "resnet50", "--imagenet", d, "--weights", bad],
                      capsys)
    assert "corrupt" in err or "not a PyTorch checkpoint" in err
    # a checkpoint of another architecture
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "lin.pth")
    err = usage_error(["eval", "--model", "resnet50", "--imagenet", d, "--weights",
                       tmp_path / "lin.pth"], capsys)
    assert "does not fit the model" in err
    # a file that is not a dnateq model
    err = usage_error(["eval", "--model", "resnet50", "--imagenet", d, "--weights",
                       d / "r50.pth", "--quantized", bad, "--workers", "0"], capsys)
    assert "dnateq" in err and str(bad) in err
    # more class folders than the model has outputs
    import torchvision
    torch.save(torchvision.models.resnet50(weights=None, num_classes=2).state_dict(),
               tmp_path / "r50_2.pth")
    err = usage_error(["eval", "--model", "resnet50", "--imagenet", d, "--weights",
                       tmp_path / "r50_2.pth", "--workers", "0"], capsys)
    assert "3 class folders but the model has 2 outputs" in err


# ---------------------------------------------------------------------------
# argument types, demo and ops dispatch, the real entry point
# ---------------------------------------------------------------------------

def test_argument_types():
    assert cli.parse_bits("3-7") == [3, 4, 5, 6, 7]
    assert cli.parse_bits("3,5") == [3, 5] and cli.parse_bits("3-4,7") == [3, 4, 7]
    assert cli.parse_fraction("5%") == pytest.approx(0.05)
    assert cli.parse_fraction("0.05") == 0.05
    import argparse
    for bad in ("0", "1.5", "-1%", "nan", "abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_fraction(bad)
    for bad in ("1-3", "8", "5-3", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_bits(bad)


def test_read_vocab_keeps_special_ids(tmp_path):
    (tmp_path / "v.txt").write_text("<pad>\n<s>\n</s>\n<unk>\nHaus 12\n\nhouse 3\n",
                                    encoding="utf-8")
    (tmp_path / "w.txt").write_text("Haus\nhouse\n", encoding="utf-8")
    a, b = cli.read_vocab(str(tmp_path / "v.txt")), cli.read_vocab(str(tmp_path / "w.txt"))
    assert a.itos == b.itos == ["<pad>", "<s>", "</s>", "<unk>", "Haus", "house"]


def test_ops_and_demo_dispatch(monkeypatch, capsys):
    rc, printed, _ = run_main(["ops", "--k", "64", "--n", "16", "--batch", "8"], capsys)
    assert rc == 0 and "count, lut and fake agree (rtol 1e-4): yes" in printed
    seen = {}
    from dnateq import demo
    monkeypatch.setattr(demo, "run", lambda **kw: seen.update(kw))   # demo.run: test_demo.py
    rc, _, _ = run_main(["demo", "--seed", "3", "--max-loss", "0.5", "--no-progress"], capsys)
    assert rc == 0 and seen == dict(seed=3, max_loss=0.5, progress=False)


def test_python_dash_m_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "python")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                  else [])))
    p = subprocess.run([sys.executable, "-m", "dnateq", "--help"], env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    for cmd in ("quantize", "eval", "demo", "ops"):
        assert cmd in p.stdout
    p = subprocess.run([sys.executable, "-m", "dnateq", "quantize", "--model", "alexnet",
                        "--imagenet", str(tmp_path / "missing"), "--weights", "random"],
                       env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "python -m dnateq quantize: error: --imagenet" in p.stderr
