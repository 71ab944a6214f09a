"""examples/reproduce_paper_tables.py: the quick run on the real CIFAR ResNets
writes the four tables and the Fig. 8 plots; the --wmt path on a tiny
generated translator adds a Transformer row."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dnateq.models import TransformerTranslator, Vocab, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "reproduce_paper_tables.py"


def run_script(args, cwd, timeout=600):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "python")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                  else [])))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                          cwd=str(cwd), capture_output=True, text=True, timeout=timeout)


def has_cifar() -> bool:
    d = shared_data_dir()
    return all(os.path.isfile(os.path.join(d, f)) for f in
               ("resnet20_cifar10.th", "resnet32_cifar10.th", "cifar10_test_761.npz",
                "cifar10_train_761.npz"))


def section(md: str, title: str) -> str:
    i = md.index(title)
    j = md.find("\n## ", i + 1)
    return md[i:j if j >= 0 else None]


@pytest.mark.slow
@pytest.mark.real
def test_quick_run_on_the_cifar_resnets(tmp_path):
    if not has_cifar():
        pytest.skip(f"real data not found in {shared_data_dir()} (set DNATEQ_SHARED_DATA)")
    out = tmp_path / "tables"
    p = run_script(["--quick", "--no-progress", "--out", out], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    md = (out / "tables.md").read_text()
    for title in ("## Table I: mean RSS of distribution fits, activations",
                  "## Table II: mean RSS of distribution fits, weights",
                  "## Table III: uniform vs DNA-TEQ at the same bits per layer",
                  "## Table IV: accuracy, average bits and compression",
                  "## Fig. 8: threshold sensitivity"):
        assert title in md, title
    for model in ("cifar-resnet20", "cifar-resnet32"):
        for title in ("## Table I", "## Table II", "## Table III", "## Table IV"):
            assert f"| {model} |" in section(md, title), (model, title)
        for png in (f"fig8_{model}.png", f"bits_{model}.png"):
            assert (out / png).stat().st_size > 1000
    assert (out / "fig8_threshold_sweep.png").stat().st_size > 1000
    # exactly one bold (lowest) mean RSS per row of Tables I-II
    for title in ("## Table I", "## Table II"):
        rows = [ln for ln in section(md, title).splitlines() if ln.startswith("| cifar")]
        assert len(rows) == 2 and all(ln.count("**") == 2 for ln in rows)
    res = json.loads((out / "results.json").read_text())
    for r in res:
        assert r["float"]["n"] == 256 and r["float"]["top1"] > 85.0
        assert r["float"]["top1"] - r["dnateq"]["top1"] <= 1.0 + 1e-9   # max_loss held
        assert 3.0 <= r["avg_bits"] < 7.0
        assert r["storage_bits"] == pytest.approx(r["avg_bits"] + 1.0)
        # the exponential fits the activations best on average (the paper's Table I)
        assert r["fits"]["best"]["activations"] == "exponential"
        # DNA-TEQ's quantizer error is below uniform's at the same n bits (Table III)
        assert r["rmae"]["paper"]["dnateq"] < r["rmae"]["paper"]["uniform"]
        assert [x["threshold"] for x in r["sweep"]["rows"]] == [0.02, 0.05, 0.1, 0.2, 0.3]
    assert "| cifar-resnet20 |" in p.stdout            # the markdown is printed too


@pytest.mark.slow
def test_wmt_path_adds_a_transformer_row(tmp_path):
    src = ["ein Hund", "eine Katze", "der Baum ist alt", "ein roter Hund", "es regnet",
           "guten Morgen", "das Haus", "ein Buch"]
    ref = ["a dog", "a cat", "the tree is old", "a red dog", "it rains", "good morning",
           "the house", "a book"]
    (tmp_path / "src.txt").write_text("\n".join(src) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(ref) + "\n", encoding="utf-8")
    vocab = Vocab.build(src + ref)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab.itos[4:]) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    TransformerTranslator(len(vocab), len(vocab), d_model=16, nhead=2, num_encoder_layers=1,
                          num_decoder_layers=1, dim_feedforward=32,
                          dropout=0.0).save_checkpoint(tmp_path / "mt.pt")
    out = tmp_path / "t"
    p = run_script(["--models", "--wmt", tmp_path / "src.txt", tmp_path / "ref.txt",
                    "--checkpoint", tmp_path / "mt.pt", "--vocab", tmp_path / "vocab.txt",
                    "--decode", "greedy", "--quick", "--batch-size", "4", "--no-progress",
                    "--out", out], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    md = (out / "tables.md").read_text()
    for title in ("## Table I", "## Table II", "## Table III", "## Table IV"):
        assert "| Transformer (translation) |" in section(md, title)
    assert re.search(r"\| Transformer \(translation\) \| [\d.]+ / [\d.]+ BLEU", md)
    assert (out / "fig8_Transformer_translation.png").is_file()
    r = json.loads((out / "results.json").read_text())[0]
    assert r["metric"] == "bleu" and r["layers"] == 16     # 1 x 6 + 1 x 10 FC layers


def test_usage_errors(tmp_path):
    p = run_script(["--imagenet", tmp_path], tmp_path, timeout=120)
    assert p.returncode == 2 and "--imagenet needs --weights" in p.stderr
    p = run_script(["--models", "--imagenet", tmp_path / "none", "--weights", "random"],
                   tmp_path, timeout=120)
    assert p.returncode == 2 and "is not a directory" in p.stderr
