"""The fake (meta) kernels check their arguments like the real kernels
(issue 14 item 5): for every bad call below, the eager (C++) error and the
fake-tensor error are the same text, and torch.compile / torch.export fail at
trace time with it. dnateq._checks is the transcription of csrc/checks.h that
the fake kernels use; this test pins the two together."""
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dnateq

from conftest import gen, make_data, random_codes

ops = torch.ops.dnateq
B = 4
P = (1.3, 0.1, 0.01, 0.2, -0.01)    # alpha, sa, ba, sw, bw


def _cases():
    g = gen(1)
    x = make_data((3, 10), g)
    x11 = make_data((3, 11), g)
    codes = random_codes((3, 10), B, g)
    w = random_codes((6, 10), B, g)
    wp = dnateq.exp_pack(w, B, True)
    a4 = random_codes((1, 2, 5, 5), B, g)
    w4 = random_codes((4, 2, 3, 3), B, g)
    x4 = make_data((1, 2, 5, 5), g)
    w4p = dnateq.exp_pack(w4, B, True)
    bias6 = torch.randn(6, generator=g)
    L = ops.exp_linear_lut.default
    LC = ops.exp_linear_count.default
    CL = ops.exp_conv2d_lut.default
    CC = ops.exp_conv2d_count.default
    Q = ops.exp_quantize.default
    D = ops.exp_dequantize.default
    PK = ops.exp_pack.default
    U = ops.exp_unpack.default
    big = 2 ** 63 - 1
    g11 = [1, 1]
    return {
        # exp_quantize / dequantize / pack / unpack
        "quantize_int_input": (Q, (codes, 1.3, 0.1, 0.0, B, "nearest", True)),
        "quantize_alpha_le_1": (Q, (x, 1.0, 0.1, 0.0, B, "nearest", True)),
        "quantize_bad_bits": (Q, (x, 1.3, 0.1, 0.0, 8, "nearest", True)),
        "quantize_bad_rounding": (Q, (x, 1.3, 0.1, 0.0, B, "up", True)),
        "quantize_scale_overflow": (Q, (x, 1.3, 1e300, 0.0, B, "nearest", True)),
        "quantize_nan_offset": (Q, (x, 1.3, 0.1, float("nan"), B, "nearest", True)),
        "dequantize_float_codes": (D, (x, 1.3, 0.1, 0.0, B, torch.float32)),
        "dequantize_bad_dtype": (D, (codes, 1.3, 0.1, 0.0, B, torch.float64)),
        "dequantize_scale_le_0": (D, (codes, 1.3, -0.1, 0.0, B, torch.float32)),
        "pack_float_codes": (PK, (x, B, True)),
        "pack_bad_bits": (PK, (codes, 1, True)),
        "unpack_short_buffer": (U, (wp[:, :-4], B, True, [6, 10])),
        "unpack_wrong_rows": (U, (wp, B, True, [5, 10])),
        "unpack_float_buffer": (U, (x, B, True, [3, 10])),
        "unpack_negative_shape": (U, (wp, B, True, [6, -10])),
        # exp_linear_lut
        "lut_float_codes_as_packed": (L, (x, x, [6, 10], *P, B, True, True, "nearest", None)),
        "lut_alpha_le_1": (L, (x, wp, [6, 10], 0.9, *P[1:], B, True, True, "nearest", None)),
        "lut_mismatched_k": (L, (x11, wp, [6, 10], *P, B, True, True, "nearest", None)),
        "lut_short_packed": (L, (x, wp[:, :-4], [6, 10], *P, B, True, True, "nearest", None)),
        "lut_int_input": (L, (codes, wp, [6, 10], *P, B, True, True, "nearest", None)),
        "lut_bad_w_shape": (L, (x, wp, [6, 10, 1], *P, B, True, True, "nearest", None)),
        "lut_bad_bias_shape": (L, (x, wp, [6, 10], *P, B, True, True, "nearest", bias6[:5])),
        "lut_int_bias": (L, (x, wp, [6, 10], *P, B, True, True, "nearest",
                             torch.ones(6, dtype=torch.int32))),
        "lut_bad_rounding": (L, (x, wp, [6, 10], *P, B, True, True, "round", None)),
        "lut_sw_overflow": (L, (x, wp, [6, 10], 1.3, 0.1, 0.0, 1e300, 0.0, B, True, True,
                                "nearest", None)),
        "lut_per_channel_one_only": (L, (x, wp, [6, 10], *P, B, True, True, "nearest", None,
                                         torch.ones(6), None)),
        "lut_per_channel_shape": (L, (x, wp, [6, 10], *P, B, True, True, "nearest", None,
                                      torch.ones(5), torch.zeros(5))),
        "lut_per_channel_dtype": (L, (x, wp, [6, 10], *P, B, True, True, "nearest", None,
                                      torch.ones(6, dtype=torch.float64), torch.zeros(6))),
        # exp_linear_count
        "count_float_codes": (LC, (x, w, *P, B, None, None)),
        "count_float_w_codes": (LC, (codes, x.reshape(3, 10).repeat(2, 1), *P, B, None, None)),
        "count_mismatched_k": (LC, (random_codes((3, 11), B, g), w, *P, B, None, None)),
        "count_w_not_2d": (LC, (codes, w.reshape(6, 10, 1), *P, B, None, None)),
        "count_alpha_le_1": (LC, (codes, w, 1.0, *P[1:], B, None, None)),
        "count_scale_overflow": (LC, (codes, w, 1.3, 1e300, 0.0, 0.1, 0.0, B, None, None)),
        "count_offset_overflow": (LC, (codes, w, 1.3, 0.1, 1e39, 0.1, 0.0, B, None, None)),
        "count_counter_bits": (LC, (codes, w, *P, B, None, 40)),
        "count_bias_shape": (LC, (codes, w, *P, B, bias6[:2], None)),
        "count_w_terms_dtype": (LC, (codes, w, *P, B, None, None,
                                     dnateq.weight_terms(w, B).long())),
        "count_w_terms_shape": (LC, (codes, w, *P, B, None, None,
                                     dnateq.weight_terms(w, B)[:, :8])),
        "count_bad_bits": (LC, (codes, w, *P, 9, None, None)),
        # conv
        "conv_lut_mismatched_channels": (CL, (make_data((1, 3, 5, 5), g), w4p, [4, 2, 3, 3],
                                              *P, B, True, True, "nearest", None, g11, g11,
                                              g11, 1)),
        "conv_lut_too_small": (CL, (make_data((1, 2, 2, 2), g), w4p, [4, 2, 3, 3], *P, B,
                                    True, True, "nearest", None, g11, [0, 0], g11, 1)),
        "conv_lut_dilation_overflow": (CL, (x4, w4p, [4, 2, 3, 3], *P, B, True, True,
                                            "nearest", None, g11, [0, 0], [big, big], 1)),
        "conv_lut_short_packed": (CL, (x4, w4p[:, :-4], [4, 2, 3, 3], *P, B, True, True,
                                       "nearest", None, g11, g11, g11, 1)),
        "conv_lut_alpha_le_1": (CL, (x4, w4p, [4, 2, 3, 3], 1.0, *P[1:], B, True, True,
                                     "nearest", None, g11, g11, g11, 1)),
        "conv_lut_bad_stride": (CL, (x4, w4p, [4, 2, 3, 3], *P, B, True, True, "nearest",
                                     None, [0, 1], g11, g11, 1)),
        "conv_lut_3d_input": (CL, (x4[0], w4p, [4, 2, 3, 3], *P, B, True, True, "nearest",
                                   None, g11, g11, g11, 1)),
        "conv_lut_bad_groups": (CL, (x4, w4p, [4, 2, 3, 3], *P, B, True, True, "nearest",
                                     None, g11, g11, g11, 0)),
        "conv_count_float_codes": (CC, (x4, w4, *P, B, None, g11, g11, g11, 1, None)),
        "conv_count_padding_overflow": (CC, (a4, w4, *P, B, None, g11, [2 ** 62, 0], g11, 1,
                                             None)),
        "conv_count_negative_padding": (CC, (a4, w4, *P, B, None, g11, [-1, 0], g11, 1,
                                             None)),
        "conv_count_alpha_le_1": (CC, (a4, w4, 1.0, *P[1:], B, None, g11, g11, g11, 1,
                                       None)),
        "conv_count_stride_floor": (CC, (random_codes((1, 2, 2, 2), B, g), w4, *P, B, None,
                                         [2, 2], [0, 0], g11, 1, None)),
        # exp_level_table (no tensor argument)
        "level_table_alpha_le_1": (ops.exp_level_table.default, (1.0, 0.1, 0.0, B)),
        "level_table_bad_bits": (ops.exp_level_table.default, (1.3, 0.1, 0.0, 1)),
        "level_table_overflow": (ops.exp_level_table.default, (1.3, 1e300, 0.0, B)),
        # exp_errors
        "errors_lengths": (ops.exp_errors.default, (x, [1.3, 1.2], [0.1], [0.0], B,
                                                     "nearest")),
        "errors_alpha_le_1": (ops.exp_errors.default, (x, [1.0], [0.1], [0.0], B, "nearest")),
        "fits_no_bits": (ops.exp_fits.default, (x, [], "golden", "nearest", None)),
        "fits_bad_bits": (ops.exp_fits.default, (x, [3, 8], "golden", "nearest", None)),
        "fits_bad_search": (ops.exp_fits.default, (x, [3], "grid", "nearest", None)),
        "fits_alpha_count": (ops.exp_fits.default, (x, [3, 4], "golden", "nearest", [1.2])),
        "fits_int_input": (ops.exp_fits.default, (codes, [3], "golden", "nearest", None)),
        "errors_int_input": (ops.exp_errors.default, (codes, [1.3], [0.1], [0.0], B,
                                                       "nearest")),
    }


CASES = _cases()


def _eager_message(op, args):
    with pytest.raises(RuntimeError) as e:
        op(*args)
    return str(e.value).split("\nException raised from")[0]


def _fake_message(op, args):
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError) as e:
            op(*fargs)
    return str(e.value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fake_kernel_gives_the_real_message(name):
    op, args = CASES[name]
    want = _eager_message(op, args)
    assert want.startswith("dnateq: "), want
    assert _fake_message(op, args) == want


# Operators without a CUDA kernel (docs/ARCHITECTURE.md): their bad calls are
# the CPU's on every device.
_CPU_ONLY = ("exp_errors", "exp_fits", "exp_level_table")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_gives_the_cpu_message(name):
    """Each bad call on CUDA tensors fails with the CPU's message: one front per op
    (csrc/<family>/front.h) checks for every device (issue 15 item 2)."""
    op, args = CASES[name]
    if any(c in str(op) for c in _CPU_ONLY):
        pytest.skip(f"{op} runs on the CPU only")
    want = _eager_message(op, args)
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    got = _eager_message(op, cuda_args)
    assert got in (want, want.replace("cpu", "cuda:0")), (got, want)


def test_mixed_devices_are_rejected_at_trace_time():
    """x on the CPU with w_packed elsewhere (meta here; cuda where present)."""
    g = gen(2)
    w = random_codes((6, 10), B, g)
    wp = dnateq.exp_pack(w, B, True).to("meta")
    x = make_data((3, 10), g)
    a, w_meta, b_meta = random_codes((3, 10), B, g), w.to("meta"), torch.randn(6, device="meta")
    wp_cpu = dnateq.exp_pack(w, B, True)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(wp)
        with pytest.raises(RuntimeError,
                           match=r"^dnateq: x and w_packed must be on the same device, "
                                 r"got cpu and meta$"):
            ops.exp_linear_lut(fx, fw, [6, 10], *P, B, True, True, "nearest", None)
        fa = mode.from_tensor(a)
        fwc = mode.from_tensor(w_meta)
        with pytest.raises(RuntimeError, match=r"^dnateq: a_codes and w_codes must be on the "
                                               r"same device, got cpu and meta$"):
            ops.exp_linear_count(fa, fwc, *P, B, None, None)
        fb = mode.from_tensor(b_meta)
        with pytest.raises(RuntimeError, match=r"^dnateq: bias and x must be on the same "):
            ops.exp_linear_lut(fx, mode.from_tensor(wp_cpu), [6, 10], *P, B, True, True,
                               "nearest", fb)


@pytest.mark.parametrize("name", ["lut_mismatched_k", "lut_short_packed", "count_float_codes",
                                  "lut_alpha_le_1", "conv_lut_dilation_overflow"])
def test_compile_and_export_fail_at_trace_time(name):
    op, args = CASES[name]
    want = _eager_message(op, args)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    class M(torch.nn.Module):
        def forward(self, *ts):
            full = list(args)
            for i, t in zip(tensors, ts):
                full[i] = t
            return op(*full)

    inputs = tuple(args[i] for i in tensors)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=re.escape(want)):
        torch.compile(M(), backend="eager", fullgraph=True)(*inputs)
    with pytest.raises(Exception, match=re.escape(want)):
        torch.export.export(M(), inputs)


def test_good_calls_still_trace():
    g = gen(3)
    w = random_codes((6, 10), B, g)
    wp = dnateq.exp_pack(w, B, True)
    x = make_data((3, 10), g)
    a, w_meta, b_meta = random_codes((3, 10), B, g), w.to("meta"), torch.randn(6, device="meta")
    wp_cpu = dnateq.exp_pack(w, B, True)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(wp)
        y = ops.exp_linear_lut(fx, fw, [6, 10], *P, B, True, True, "nearest", None)
        assert y.shape == (3, 6)
