"""Saving and loading layers with per-output-channel weight parameters and
smoothing vectors (file format version 3, docs/FORMAT.md), and files written
before (version 1) still loading with the same outputs."""
import os

import pytest
import torch
import torch.nn as nn

import dnateq
from dnateq.nn import ExpConv2d, ExpLinear

from conftest import gen, make_data
from test_per_channel_modules import _channel_w_params, _outputs

DATA = os.path.join(os.path.dirname(__file__), "data")


class _Tiny(nn.Module):
    """The architecture of tests/data/v1_tiny.dnateq."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_per_channel_and_smooth_save_load(tmp_path):
    g = gen(7600)
    model = _Tiny().eval()
    q = _Tiny().eval()
    x = make_data((2, 3, 4, 4), g)
    for name, mod in (("conv", model.conv), ("fc", model.fc)):
        alpha, S, B = _channel_w_params(mod.weight.detach(), 4)
        cls = ExpConv2d if name == "conv" else ExpLinear
        setattr(q, name, cls.from_float(mod, 4, (alpha, S, B), (alpha, 0.05, 0.0),
                                        name == "conv"))
    q.fc.set_smooth(torch.rand(64, generator=g) + 0.5)
    q.conv.set_smooth(torch.rand(3, generator=g) + 0.5)
    out = _outputs(q.fc, torch.relu(q.conv(x)).flatten(1))
    path = tmp_path / "pc.dnateq"
    dnateq.save(q, path)
    blob = torch.load(path, weights_only=True)
    assert blob["version"] == dnateq.persistence.FORMAT_VERSION == 3
    for k in ("fc.w_scale", "fc.w_offset", "fc.smooth", "conv.w_scale", "conv.smooth"):
        assert k in blob["state"] and k in blob["sha256"]
    back = dnateq.load(path, model)
    for name in ("conv", "fc"):
        a, b = getattr(q, name), getattr(back, name)
        for buf in ("w_scale", "w_offset", "smooth", "w_packed", "w_terms"):
            assert torch.equal(getattr(a, buf), getattr(b, buf)), (name, buf)
    out2 = _outputs(back.fc, torch.relu(back.conv(x)).flatten(1))
    for m in out:
        assert torch.equal(out[m], out2[m]), m
    assert torch.equal(back(x), q(x))
    # a corrupted per-channel tensor fails its checksum
    blob["state"]["fc.w_scale"][0] += 1.0
    blob["sections_sha256"] = dict(blob["sections_sha256"])
    torch.save(blob, tmp_path / "bad.dnateq")
    with pytest.raises(dnateq.DnateqFileError, match="fc.w_scale"):
        dnateq.load(tmp_path / "bad.dnateq", model)


def test_version_1_file_still_loads():
    """tests/data/v1_tiny.dnateq was written by dnateq.save before per-channel
    parameters existed (format version 1); v1_tiny_io.pt holds the float model,
    an input and the outputs of the three modes computed by that code."""
    io = torch.load(os.path.join(DATA, "v1_tiny_io.pt"), weights_only=True)
    model = _Tiny().eval()
    model.load_state_dict(io["float_state"])
    blob = torch.load(os.path.join(DATA, "v1_tiny.dnateq"), weights_only=True)
    assert blob["version"] == 1
    q = dnateq.load(os.path.join(DATA, "v1_tiny.dnateq"), model)
    for mode in ("lut", "count", "fake"):
        for m in (q.conv, q.fc):
            assert m.w_scale is None and m.w_offset is None and m.smooth is None
            m.mode = mode
        if mode == "count":
            # integer counts and one double sum: the same bits on every CPU
            assert torch.equal(q(io["x"]), io[f"y_{mode}"]), mode
        else:
            # "lut" (the fast path's kernels) and "fake" (torch's float conv and
            # linear, whose MKL/oneDNN kernels differ between AVX2 and AVX-512
            # CPUs) may sum in another order than the machine that wrote the file:
            # fp32 rounding only (SPEC lets "lut" differ by rtol 1e-4)
            torch.testing.assert_close(q(io["x"]), io[f"y_{mode}"], rtol=1e-5, atol=1e-6)
