"""The README's main command: the digits demo quantizes a real model within
its loss budget, and the trained model is cached."""
import os

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
    # the packed codes are smaller than INT8 weights; the file (codes, per-channel
    # parameters, biases, the ~10 KB calibration record) smaller than FP32 weights
    assert out["totals"]["bytes_packed"] < out["totals"]["bytes_int8"]
    assert out["file_bytes"] < out["totals"]["bytes_fp32"]
    # second run loads the cached weights: same float accuracy, no training line
    again = demo.run(seed=0, max_loss=1.0, progress=False)
    assert again["acc_float"] == out["acc_float"]
    assert "trained the digits CNN" not in capsys.readouterr().out
