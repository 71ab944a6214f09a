"""Every operator rejects bad input with a clear error naming the argument
(SPEC section 5: TORCH_CHECK messages name the argument, the expected and the
actual value), and leaves its input tensors unchanged. The oracle is held to
the same rules."""
import re

import pytest
import torch

import dnateq
from dnateq import reference as ref

from conftest import gen, random_codes

ERRORS = (RuntimeError, ValueError, TypeError)
NAN, INF = float("nan"), float("inf")
BITS = 4


def _base():
    """Valid arguments of every op, by name (argument order = schema order)."""
    g = gen(1234)
    x = torch.randn(3, 5, generator=g)
    codes = random_codes((3, 5), BITS, g)
    w = random_codes((2, 5), BITS, g)
    a4 = random_codes((1, 2, 5, 5), BITS, g, signed=False)
    w4 = random_codes((3, 2, 3, 3), BITS, g)
    x4 = torch.randn(1, 2, 5, 5, generator=g)
    p = dict(alpha=1.5, sa=0.1, ba=0.01, sw=0.2, bw=0.02, bits=BITS)
    return {
        "exp_quantize": (["x", "alpha", "scale", "offset", "bits", "rounding", "check_finite"],
                         dict(x=x, alpha=1.5, scale=0.1, offset=0.01, bits=BITS,
                              rounding="nearest", check_finite=True)),
        "exp_dequantize": (["codes", "alpha", "scale", "offset", "bits", "dtype"],
                           dict(codes=codes, alpha=1.5, scale=0.1, offset=0.01, bits=BITS,
                                dtype=torch.float32)),
        "exp_pack": (["codes", "bits", "signed"], dict(codes=codes, bits=BITS, signed=True)),
        "exp_unpack": (["packed", "bits", "signed", "shape"],
                       dict(packed=ref.exp_pack(codes, BITS, True), bits=BITS, signed=True,
                            shape=[3, 5])),
        "exp_linear_count": (
            ["a_codes", "w_codes", "alpha", "sa", "ba", "sw", "bw", "bits", "bias",
             "counter_bits", "w_terms"],
            dict(a_codes=codes, w_codes=w, bias=torch.randn(2, generator=g), counter_bits=None,
                 w_terms=ref_weight_terms(w), **p)),
        "exp_conv2d_count": (
            ["a_codes", "w_codes", "alpha", "sa", "ba", "sw", "bw", "bits", "bias", "stride",
             "padding", "dilation", "groups", "counter_bits", "w_terms"],
            dict(a_codes=a4, w_codes=w4, bias=torch.randn(3, generator=g), stride=[1, 1],
                 padding=[1, 1], dilation=[1, 1], groups=1, counter_bits=None,
                 w_terms=ref_weight_terms(w4), **p)),
        "exp_linear_lut": (
            ["x", "w_packed", "w_shape", "alpha", "sa", "ba", "sw", "bw", "bits", "a_signed",
             "w_signed", "rounding", "bias"],
            dict(x=x, w_packed=ref.exp_pack(w, BITS, True), w_shape=[2, 5], a_signed=True,
                 w_signed=True, rounding="nearest", bias=torch.randn(2, generator=g), **p)),
        "exp_conv2d_lut": (
            ["x", "w_packed", "w_shape", "alpha", "sa", "ba", "sw", "bw", "bits", "a_signed",
             "w_signed", "rounding", "bias", "stride", "padding", "dilation", "groups"],
            dict(x=x4, w_packed=ref.exp_pack(w4, BITS, True), w_shape=[3, 2, 3, 3],
                 a_signed=True, w_signed=True, rounding="nearest",
                 bias=torch.randn(3, generator=g), stride=[1, 1], padding=[1, 1],
                 dilation=[1, 1], groups=1, **p)),
        "exp_fit": (["x", "bits", "search", "rounding", "alpha"],
                    dict(x=x, bits=BITS, search="golden", rounding="nearest", alpha=None)),
        "exp_error": (["x", "alpha", "scale", "offset", "bits", "rounding"],
                      dict(x=x, alpha=1.5, scale=0.1, offset=0.01, bits=BITS,
                           rounding="nearest")),
        "exp_errors": (["x", "alpha", "scale", "offset", "bits", "rounding"],
                       dict(x=x, alpha=[1.5, 1.2], scale=[0.1, 0.2], offset=[0.01, 0.0],
                            bits=BITS, rounding="nearest")),
    }


def ref_weight_terms(w):
    return dnateq.weight_terms(w, BITS)


def _with_nonfinite(t, v):
    t = t.clone()
    t.view(-1)[3] = v
    return t


def _above_n(c):
    """Codes with a bit in n..6 set (biased exponent 2^n)."""
    c = c.clone()
    c.view(-1)[1] = 1 << BITS
    return c


# (op, {arg: new value} or callable(args) -> None, regex the message must match)
CASES = []


def case(op, change, match, cid):
    CASES.append(pytest.param(op, change, match, id=f"{op}-{cid}"))


PARAM_OPS = {
    # op: (scale names, offset names)
    "exp_quantize": (["scale"], ["offset"]),
    "exp_dequantize": (["scale"], ["offset"]),
    "exp_linear_count": (["sa", "sw"], ["ba", "bw"]),
    "exp_conv2d_count": (["sa", "sw"], ["ba", "bw"]),
    "exp_linear_lut": (["sa", "sw"], ["ba", "bw"]),
    "exp_conv2d_lut": (["sa", "sw"], ["ba", "bw"]),
    "exp_error": (["scale"], ["offset"]),
}
ALL_OPS = ["exp_quantize", "exp_dequantize", "exp_pack", "exp_unpack", "exp_linear_count",
           "exp_conv2d_count", "exp_linear_lut", "exp_conv2d_lut", "exp_fit", "exp_error",
           "exp_errors"]
FLOAT_INPUT_OPS = ["exp_quantize", "exp_linear_lut", "exp_conv2d_lut", "exp_fit", "exp_error",
                   "exp_errors"]
ROUNDING_OPS = ["exp_quantize", "exp_linear_lut", "exp_conv2d_lut", "exp_fit", "exp_error",
                "exp_errors"]

for op in ALL_OPS:
    for b in (1, 8, 0, -1):
        case(op, {"bits": b}, r"\bbits\b", f"bits{b}")
for op, (scales, offsets) in PARAM_OPS.items():
    for a in (1.0, 0.5, NAN, INF, -2.0):
        case(op, {"alpha": a}, r"\balpha\b", f"alpha{a}")
    for s in scales:
        for v in (0.0, -1.0, NAN, INF):
            case(op, {s: v}, rf"\b{s}\b", f"{s}{v}")
    for o in offsets:
        for v in (NAN, INF, -INF):
            case(op, {o: v}, rf"\b{o}\b", f"{o}{v}")
for a in (1.0, 0.5, NAN, INF):
    case("exp_fit", {"alpha": a}, r"\balpha\b", f"alpha{a}")
for op in ROUNDING_OPS:
    for r in ("floor", "", "Nearest", "LOG"):
        case(op, {"rounding": r}, r"\brounding\b", f"rounding-{r or 'empty'}")
for a in (1.0, 0.5, NAN):
    case("exp_errors", {"alpha": [1.5, a]}, r"\balpha\b", f"alpha{a}")
case("exp_errors", {"scale": [0.1, 0.0]}, r"\bscale\b", "scale0")
case("exp_errors", {"offset": [NAN, 0.0]}, r"\boffset\b", "offset-nan")
case("exp_errors", {"offset": [0.0]}, r"\balpha\b.*\bscale\b.*\boffset\b|length",
     "length-mismatch")
case("exp_fit", {"search": "fast"}, r"\bsearch\b", "search")
case("exp_fit", {"search": ""}, r"\bsearch\b", "search-empty")
for op in FLOAT_INPUT_OPS:
    for v in (NAN, INF, -INF):
        case(op, lambda d, v=v: d.__setitem__("x", _with_nonfinite(d["x"], v)),
             r"non-finite", f"x-{v}")
    for dt in (torch.float64, torch.int32, torch.int8, torch.bool):
        case(op, lambda d, dt=dt: d.__setitem__("x", d["x"].to(dt)), r"\bx\b", f"x-{dt}")
# int8 codes
for op, names in (("exp_dequantize", ["codes"]), ("exp_pack", ["codes"]),
                  ("exp_linear_count", ["a_codes", "w_codes"]),
                  ("exp_conv2d_count", ["a_codes", "w_codes"])):
    for n in names:
        for dt in (torch.uint8, torch.float32, torch.int32):
            case(op, lambda d, n=n, dt=dt: d.__setitem__(n, d[n].to(dt)), rf"\b{n}\b",
                 f"{n}-{dt}")
        case(op, lambda d, n=n: d.__setitem__(n, _above_n(d[n])), rf"\b{n}\b", f"{n}-above-n")
case("exp_pack", lambda d: d.update(signed=False,
                                    codes=torch.tensor([1, -127, 3], dtype=torch.int8)),
     r"\bcodes\b|\bsign", "unsigned-with-sign")
case("exp_dequantize", {"dtype": torch.int32}, r"\bdtype\b", "dtype-int32")
case("exp_dequantize", {"dtype": torch.bool}, r"\bdtype\b", "dtype-bool")
# unpack
case("exp_unpack", lambda d: d.__setitem__("packed", d["packed"].view(torch.int8)),
     r"\bpacked\b", "packed-int8")
case("exp_unpack", lambda d: d.__setitem__("packed", d["packed"].to(torch.int32)),
     r"\bpacked\b", "packed-int32")
case("exp_unpack", {"shape": [4, 5]}, r"\bpacked\b|\bshape\b", "rows-mismatch")
case("exp_unpack", {"shape": [3, 50]}, r"\bpacked\b|\bshape\b", "K-mismatch")
case("exp_unpack", {"signed": False, "shape": [3, 50]}, r"\bpacked\b|\bshape\b",
     "bytes-mismatch-unsigned")
case("exp_unpack", {"shape": [3, -5]}, r"\bpacked\b|\bshape\b", "negative-shape")
case("exp_unpack", lambda d: d.__setitem__("packed", d["packed"].reshape(-1)),
     r"\bpacked\b", "packed-1d")
# linear count shapes
case("exp_linear_count", lambda d: d.__setitem__("a_codes", d["a_codes"][:, :4]),
     r"\ba_codes\b|\bw_codes\b", "K-mismatch")
case("exp_linear_count", lambda d: d.__setitem__("w_codes", d["w_codes"].reshape(-1)),
     r"\bw_codes\b", "w-1d")
case("exp_linear_count", lambda d: d.__setitem__("w_codes", d["w_codes"].reshape(2, 5, 1)),
     r"\bw_codes\b|\ba_codes\b", "w-3d")
case("exp_linear_count", lambda d: d.__setitem__("a_codes", d["a_codes"][0, 0]),
     r"\ba_codes\b", "a-0d")
for op in ("exp_linear_count", "exp_conv2d_count"):
    case(op, lambda d: d.__setitem__("bias", torch.zeros(7)), r"\bbias\b", "bias-shape")
    case(op, lambda d: d.__setitem__("bias", torch.zeros(2, 3)), r"\bbias\b", "bias-2d")
    for cb in (1, 0, 33, -8):
        case(op, {"counter_bits": cb}, r"\bcounter_bits\b", f"counter_bits{cb}")
    case(op, lambda d: d.__setitem__("w_terms", d["w_terms"].to(torch.int64)), r"\bw_terms\b",
         "w_terms-dtype")
    case(op, lambda d: d.__setitem__("w_terms", d["w_terms"][:, :4]), r"\bw_terms\b",
         "w_terms-cols")
    case(op, lambda d: d.__setitem__("w_terms", d["w_terms"][:1]), r"\bw_terms\b",
         "w_terms-rows")
for op in ("exp_linear_lut", "exp_conv2d_lut"):
    case(op, lambda d: d.__setitem__("bias", torch.zeros(7)), r"\bbias\b", "bias-shape")
# conv count shapes
case("exp_conv2d_count", lambda d: d.__setitem__("a_codes", d["a_codes"][0]),
     r"\ba_codes\b", "a-3d")
case("exp_conv2d_count", lambda d: d.__setitem__("w_codes", d["w_codes"][0]),
     r"\bw_codes\b", "w-3d")
case("exp_conv2d_count", {"groups": 2}, r"\bgroups\b|\bw_codes\b|channel", "groups-mismatch")
case("exp_conv2d_count", {"groups": 0}, r"\bgroups\b", "groups0")
case("exp_conv2d_count", lambda d: d.__setitem__("w_codes", d["w_codes"][:, :1]),
     r"\bgroups\b|\bw_codes\b|channel", "channels-mismatch")
for op in ("exp_conv2d_count", "exp_conv2d_lut"):
    case(op, {"stride": [0, 1]}, r"\bstride\b", "stride0")
    case(op, {"padding": [-1, 0]}, r"\bpadding\b", "padding-neg")
    case(op, {"dilation": [1, 0]}, r"\bdilation\b", "dilation0")
    case(op, {"padding": [0, 0], "dilation": [4, 4]},
         r"\ba_codes\b|\bx\b|kernel|size|output", "kernel-too-big")
# lut shapes
for op, shp in (("exp_linear_lut", [2, 5]), ("exp_conv2d_lut", [3, 2, 3, 3])):
    case(op, lambda d: d.__setitem__("w_packed", d["w_packed"].view(torch.int8)),
         r"\bw_packed\b", "w_packed-int8")
    case(op, lambda d: d.__setitem__("w_packed", d["w_packed"][:, :-4]),
         r"\bw_packed\b|\bw_shape\b", "w_packed-short")
    case(op, lambda d: d.__setitem__("w_packed", d["w_packed"][:1]),
         r"\bw_packed\b|\bw_shape\b", "w_packed-rows")
case("exp_linear_lut", {"w_shape": [2, 6]}, r"\bw_packed\b|\bw_shape\b|\bx\b", "w_shape-K")
case("exp_linear_lut", {"w_shape": [2, 5, 1]}, r"\bw_shape\b", "w_shape-3d")
case("exp_linear_lut", lambda d: d.__setitem__("x", d["x"][:, :4]), r"\bx\b|\bw_shape\b",
     "x-K")
case("exp_conv2d_lut", lambda d: d.__setitem__("x", d["x"][0]), r"\bx\b", "x-3d")
case("exp_conv2d_lut", {"groups": 2}, r"\bgroups\b|\bw_shape\b|\bx\b|channel",
     "groups-mismatch")
case("exp_conv2d_lut", {"w_shape": [3, 2, 3]}, r"\bw_shape\b", "w_shape-3d")


def _prepare(op, change):
    names, vals = _base()[op]
    vals = dict(vals)
    if callable(change):
        change(vals)
    else:
        vals.update(change)
    return [vals[n] for n in names]


def _snapshot(args):
    return [(i, a.clone()) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


def _unchanged(args, snap):
    for i, before in snap:
        after = args[i]
        assert after.dtype == before.dtype and after.shape == before.shape
        if before.is_floating_point():
            torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
        else:
            assert torch.equal(after, before), f"argument {i} was modified"


@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("op,change,match", CASES)
def test_bad_input(impl, op, change, match):
    fn = getattr(dnateq if impl == "cpp" else ref, op)
    args = _prepare(op, change)
    snap = _snapshot(args)
    with pytest.raises(ERRORS, match=match) as info:
        fn(*args)
    assert "dnateq" in str(info.value)
    _unchanged(args, snap)


@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_valid_base_arguments_work(impl, op):
    """The unmodified base arguments are valid (so each bad-input case tests
    exactly one defect)."""
    fn = getattr(dnateq if impl == "cpp" else ref, op)
    args = _prepare(op, {})
    snap = _snapshot(args)
    fn(*args)
    _unchanged(args, snap)


def test_nonfinite_message_names_argument():
    x = _with_nonfinite(torch.randn(3, 5), NAN)
    with pytest.raises(ERRORS, match="non-finite") as info:
        dnateq.exp_quantize(x, 1.5, 0.1, 0.01, 4)
    assert re.search(r"\bx\b", str(info.value))
    with pytest.raises(ERRORS, match="non-finite") as info:
        dnateq.exp_fit(x, 4)
    assert re.search(r"\bx\b", str(info.value))


def test_bits_message_shows_value():
    with pytest.raises(ERRORS, match=re.escape("bits must be in [2, 7], got 8")):
        dnateq.exp_quantize(torch.ones(3), 1.5, 0.1, 0.0, 8)
    with pytest.raises(ERRORS, match=r"alpha must be a finite base > 1, got 1"):
        dnateq.exp_quantize(torch.ones(3), 1.0, 0.1, 0.0, 4)
    with pytest.raises(ERRORS, match=r'rounding must be "log" or "nearest"'):
        dnateq.exp_error(torch.ones(3), 1.5, 0.1, 0.0, 4, "round")


def test_check_finite_false_still_checks_on_cpu():
    """SPEC: on CPU the non-finite check is always on (check_finite only lets
    CUDA skip its reduction)."""
    for v in (NAN, INF):
        x = _with_nonfinite(torch.randn(3, 5), v)
        x0 = x.clone()
        with pytest.raises(ERRORS, match="non-finite"):
            dnateq.exp_quantize(x, 1.5, 0.1, 0.01, 4, "nearest", False)
        torch.testing.assert_close(x, x0, rtol=0, atol=0, equal_nan=True)
        with pytest.raises(ERRORS, match="non-finite"):
            ref.exp_quantize(x, 1.5, 0.1, 0.01, 4, "nearest", False)


def test_overflowing_levels_rejected():
    """Parameters whose top level overflows float32 are an error naming alpha."""
    with pytest.raises(ERRORS, match=r"\balpha\b"):
        dnateq.exp_quantize(torch.ones(3), 16.0, 1.0, 0.0, 7)
    with pytest.raises(ERRORS, match=r"\balpha\b"):
        ref.exp_quantize(torch.ones(3), 16.0, 1.0, 0.0, 7)
