"""The README's main command: the digits demo quantizes a real model within
its loss budget, and the trained model is cached."""
import os

import pytest
import torch

from dnateq import demo


def test_demo_quantizes_digits_cnn(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DNATEQ_CACHE", str(tmp_path))
    out = demo.run(seed=0, max_loss=1.0, progress=False)
    assert out["acc_float"] > 90.0  # a real model, really trained
    assert out["acc_float"] - out["acc_dnateq"] <= 1.0
    assert 3.0 <= out["totals"]["avg_bits"] < 7.0
    assert out["totals"]["storage_bits"] > out["totals"]["avg_bits"]
    assert os.path.exists(tmp_path / "digits_cnn_seed0.pt")
    printed = capsys.readouterr().out
    assert "| conv1 |" in printed
    for row in ("float32", "INT8 uniform", "DNA-TEQ's n per layer", "DNA-TEQ's storage bits",
                "DNA-TEQ "):
        assert row in printed
    assert out["acc_float"] - out["acc_int8"] <= 1.0          # INT8 is near-lossless here
    assert set(out["acc_uniform"]) == {"paper", "storage"}
    # fidelity to the float model and the paired test against uniform at equal storage
    assert out["fidelity"]["float"] == {"agreement": 100.0, "cosine": pytest.approx(1.0)}
    assert 90.0 < out["fidelity"]["dnateq"]["agreement"] <= 100.0
    pair = out["paired_vs_uniform_storage"]
    assert 0.0 < pair["p"] <= 1.0 and "exact McNemar p" in printed
    assert pair["a_only"] - pair["b_only"] == round(
        (out["acc_dnateq"] - out["acc_uniform"]["storage"]) * 450 / 100)
    # the packed codes are smaller than INT8 weights; the file (codes, per-channel
    # parameters, biases, the ~10 KB calibration record) smaller than FP32 weights
    assert out["totals"]["bytes_packed"] < out["totals"]["bytes_int8"]
    assert out["file_bytes"] < out["totals"]["bytes_fp32"]
    # second run loads the cached weights: same float accuracy, no training line
    again = demo.run(seed=0, max_loss=1.0, progress=False)
    assert again["acc_float"] == out["acc_float"]
    assert "trained the digits CNN" not in capsys.readouterr().out


def test_paired_test_counts_discordant_images():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    right = torch.nn.functional.one_hot(y, 3).float()
    wrong = torch.nn.functional.one_hot((y + 1) % 3, 3).float()
    a = right.clone()
    b = right.clone()
    b[:6] = wrong[:6]          # 6 images only a gets right
    a[7] = wrong[7]            # 1 image only b gets right
    r = demo.paired_test(a, b, y)
    assert (r["a_only"], r["b_only"]) == (6, 1)
    assert r["p"] == pytest.approx(0.125)   # 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8/128
    assert demo.paired_test(a, a, y)["p"] == 1.0


def test_fidelity_of_identical_and_flipped_logits():
    ref = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert demo.fidelity(ref, ref) == {"agreement": 100.0, "cosine": pytest.approx(1.0)}
    f = demo.fidelity(-ref, ref)
    assert f["agreement"] == 0.0 and f["cosine"] == pytest.approx(-1.0)
