"""The example notebooks run top to bottom in a fresh kernel (nbclient), in a
temporary working directory, on the stand-ins they generate themselves:

- ``examples/imagenet_resnet50.ipynb``: a synthetic ImageFolder and a random
  ResNet-50 with a linear-probe classifier (no ImageNet, no weights needed);
- ``examples/wmt14_transformer_bleu.ipynb``: a small Transformer trained in the
  notebook on a synthetic translation task (word mapping with adjective-noun
  reordering), where BLEU is meaningful: float BLEU > 90, DNA-TEQ within 1 BLEU.

Each notebook writes its numbers to the JSON file named by ``DNATEQ_NB_OUT``;
the tests assert on them. ``examples/hardware_report.ipynb`` is executed by
tests/test_hw.py (not repeated here).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_notebook(name: str, tmp_path: Path, env: dict) -> tuple:
    """Execute ``examples/<name>`` with ``env`` added to the kernel's
    environment; returns (results JSON, executed notebook, seconds)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = EXAMPLES / name
    nb = nbformat.read(str(path), as_version=4)
    out = tmp_path / "results.json"
    # TMPDIR: the notebooks' own working folders (tempfile.mkdtemp) land in tmp_path
    add = dict(env, DNATEQ_NB_OUT=str(out), MPLBACKEND="Agg", TMPDIR=str(tmp_path), PYTHONPATH=os.pathsep.join(
        [str(ROOT / "python")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                  else [])))
    saved = {k: os.environ.get(k) for k in add}
    os.environ.update(add)               # the kernel inherits this process's environment
    t0 = time.perf_counter()
    try:
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    elapsed = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    print(f"\nexamples/{name} ran in {elapsed:.1f} s")
    return json.loads(out.read_text()), nb, elapsed


def text_of(nb) -> str:
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                     + str(o.get("data", {}).get("text/plain", "")) for o in outs)


def png_count(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_notebooks_are_clean_v4_python3():
    nbformat = pytest.importorskip("nbformat")
    for name in ("imagenet_resnet50.ipynb", "wmt14_transformer_bleu.ipynb"):
        nb = nbformat.read(str(EXAMPLES / name), as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", [])   # papermill-style
        assert all(not c.get("outputs") for c in code), f"{name} is stored with outputs"
        src = "\n".join(c.source for c in code)
        assert "plt.show()" not in src and "/work/" not in src    # no local paths


@pytest.mark.slow
def test_imagenet_resnet50_notebook(tmp_path):
    env = {"DNATEQ_NB_QUICK": "1"}
    for k in ("DNATEQ_IMAGENET", "DNATEQ_RESNET50_WEIGHTS", "DNATEQ_LIMIT", "DNATEQ_DEVICE"):
        env[k] = ""                          # the notebook's own stand-in, random weights
    res, nb, _ = run_notebook("imagenet_resnet50.ipynb", tmp_path, env)
    assert res["standin"] is True and res["images"] == 80 and res["classes"] == 10
    f, q = res["float"], res["dnateq"]
    assert f["n"] == q["n"] == 80 and "top5" in f and "top5" in q
    assert f["top1"] >= 50.0                 # the linear probe is far above chance (10 %)
    if res["threshold"] is not None:      # a threshold met max_loss on this eval set
        assert f["top1"] - q["top1"] <= 1.0 + 1e-9
    else:                                  # none did: the all-7-bit fallback, reported
        assert res["avg_bits"] == pytest.approx(7.0)
    assert 3.0 <= res["avg_bits"] <= 7.0
    assert res["storage_bits"] == pytest.approx(res["avg_bits"] + 1.0)
    assert set(res["uniform"]) == {"paper", "storage"} and "top1" in res["int8"]
    assert res["roundtrip_identical"] is True and res["file_bytes"] > 0
    assert [r["threshold"] for r in res["sweep"]] == [0.02, 0.05, 0.10, 0.20]
    assert len(res["files"]) == 2 and all(Path(p).is_file() for p in res["files"])
    text = text_of(nb)
    assert "stand-in" in text and "WARNING: no DNATEQ_RESNET50_WEIGHTS" in text
    assert "| conv1 | conv2d |" in text.lower() or "| conv1 |" in text
    assert png_count(nb) == 2                # bits per layer, threshold sweep


@pytest.mark.slow
def test_wmt14_transformer_bleu_notebook(tmp_path):
    env = {"DNATEQ_NB_QUICK": "1"}
    for k in ("DNATEQ_WMT_SRC", "DNATEQ_WMT_REF", "DNATEQ_WMT_CHECKPOINT", "DNATEQ_WMT_VOCAB",
              "DNATEQ_DEVICE"):
        env[k] = ""                          # the synthetic task, trained in the notebook
    res, nb, _ = run_notebook("wmt14_transformer_bleu.ipynb", tmp_path, env)
    assert res["synthetic"] is True and res["test_sentences"] >= 200
    for search in ("greedy", "beam"):
        fb, qb = res["bleu_float"][search], res["bleu_dnateq"][search]
        assert fb > 90.0, (search, fb)                      # BLEU is meaningful here
        assert abs(fb - qb) <= 1.0, (search, fb, qb)        # DNA-TEQ within 1 BLEU
    # the paper's layer count: 96 FC layers in Transformer-base; the small model's
    # quantized layers are exactly its FC layers inside model.transformer
    assert res["fc_layers_transformer_base"] == 96
    assert res["quantized_layers"] == res["fc_layers_model"] == 2 * 6 + 2 * 10
    assert 3.0 <= res["avg_bits"] <= 7.0
    text = text_of(nb)
    assert "96" in text and "BLEU" in text and "synthetic" in text
    assert png_count(nb) >= 2
