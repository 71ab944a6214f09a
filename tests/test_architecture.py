"""docs/ARCHITECTURE.md stays true (issue 15 item 5): its operator table lists
exactly the operators of the schema block in csrc/register.cpp, each with the
dispatch keys it really registers (in the binary and in its family's
cpu.cpp / cuda.cu), a fake kernel, a reference with the wrapper's signature,
and at least one other test that calls it. Also: the deprecated ``a_signed``
of the LUT ops is accepted and ignored (docs/FORMAT.md), and the one
device-independent operator, ``exp_level_table``, against its reference."""
import inspect
import pathlib
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dnateq
from dnateq import reference as ref

from conftest import gen, make_data, random_codes

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCH = ROOT / "docs" / "ARCHITECTURE.md"


def _schema_ops():
    """Operator names of the TORCH_LIBRARY block, in order (private ones too)."""
    text = (CSRC / "register.cpp").read_text()
    block = text[text.index("TORCH_LIBRARY(dnateq, m)"):]
    block = block[:block.index("\n}\n")]
    return re.findall(r'm\.def\(\s*"([A-Za-z_]\w*)\(', block)


def _table():
    """Rows of the "Operators" table: name -> dict of its columns."""
    text = ARCH.read_text()
    section = text[text.index("## Operators"):]
    section = section[:section.index("\n## ", 4)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \| (\w+) \| (\w+) \| (\w+) \| (\w+) \| `reference\.(\w+)` \|",
                     line)
        if m:
            name, fam, cpu, cuda, fake, refname = m.groups()
            assert name not in rows, f"{name} listed twice"
            rows[name] = dict(family=fam, cpu=cpu, cuda=cuda, fake=fake, ref=refname)
    return rows


SCHEMA = _schema_ops()
PUBLIC = [n for n in SCHEMA if not n.startswith("_")]
TABLE = _table()


def _has(name, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key("dnateq::" + name, key)


def _impl_lines(path):
    return set(re.findall(r'm\.impl\("(\w+)"', path.read_text())) if path.exists() else set()


def test_table_lists_exactly_the_schema_ops():
    assert len(SCHEMA) == len(set(SCHEMA)), "an operator is defined twice"
    assert PUBLIC, "no operator found in csrc/register.cpp"
    assert sorted(TABLE) == sorted(PUBLIC)
    # The Python surface is the same list.
    assert sorted(dnateq.ops.__all__) == sorted(PUBLIC + ["weight_terms"])
    assert set(PUBLIC) <= set(ref.__all__), "dnateq.reference.__all__ misses an operator"
    for name in dnateq.ops.__all__:
        assert getattr(dnateq, name) is getattr(dnateq.ops, name)


@pytest.mark.parametrize("name", PUBLIC)
def test_registered_backends_match_the_table(name):
    row = TABLE[name]
    fam = CSRC / row["family"]
    for f in ("front.h", "cpu.cpp", "cuda.cu"):
        assert (fam / f).exists(), f"family {row['family']} has no {f}"
    in_cpu, in_cuda = name in _impl_lines(fam / "cpu.cpp"), name in _impl_lines(fam / "cuda.cu")
    if row["cpu"] == "any":
        assert row["cuda"] == "any"
        assert _has(name, "CompositeExplicitAutograd")
        assert name in _impl_lines(CSRC / "register.cpp")
        assert not in_cpu and not in_cuda
        return
    assert row["cpu"] == "yes", "every device kernel operator runs on the CPU"
    assert in_cpu and _has(name, "CPU")
    assert in_cuda == (row["cuda"] == "yes"), f"{name}: cuda.cu registration vs table"
    # Where the extension was built with CUDA, the binary agrees with the source.
    if any(_has(n, "CUDA") for n in PUBLIC):
        assert _has(name, "CUDA") == (row["cuda"] == "yes")


@pytest.mark.parametrize("name", PUBLIC)
def test_every_op_has_a_fake_kernel(name):
    entry = torch._library.simple_registry.singleton.find("dnateq::" + name)
    kernel = entry.fake_impl.kernel
    assert kernel is not None, f"{name} has no register_fake"
    if TABLE[name]["fake"] == "data":
        with FakeTensorMode() as mode:
            x = mode.from_tensor(torch.randn(8))
            with pytest.raises(RuntimeError, match="cannot be traced"):
                getattr(torch.ops.dnateq, name)(x, *_DATA_ARGS[name])
    else:
        assert TABLE[name]["fake"] == "shape"


_DATA_ARGS = {"exp_fit": (3,), "exp_error": (1.3, 0.1, 0.0, 3)}


@pytest.mark.parametrize("name", PUBLIC)
def test_every_op_has_a_reference_with_its_signature(name):
    row = TABLE[name]
    assert row["ref"] == name
    r = getattr(ref, name, None)
    assert callable(r), f"dnateq.reference has no {name}"
    wrapper = inspect.signature(getattr(dnateq.ops, name)).parameters
    oracle = inspect.signature(r).parameters
    assert list(wrapper) == list(oracle)
    schema = [a.name for a in getattr(torch.ops.dnateq, name).default._schema.arguments]
    assert list(wrapper) == schema


@pytest.mark.parametrize("name", PUBLIC)
def test_every_op_has_a_test(name):
    pat = re.compile(r"\b" + name + r"\b")
    hits = [p.name for p in sorted((ROOT / "tests").glob("test_*.py"))
            if p.name != pathlib.Path(__file__).name and pat.search(p.read_text())]
    hits += [p.name for p in sorted((ROOT / "tests" / "cpp").glob("*.cpp"))
             if pat.search(p.read_text())]
    assert hits, f"no test other than {pathlib.Path(__file__).name} mentions {name}"


# --- the deprecated a_signed (docs/FORMAT.md) ------------------------------

P = (1.3, 0.05, 0.01, 0.04, -0.002)  # alpha, sa, ba, sw, bw


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("bits", [3, 5])
def test_a_signed_is_accepted_and_ignored(device, bits):
    g = gen(11)
    w = random_codes((24, 40), bits, g)
    wp = dnateq.exp_pack(w, bits, True).to(device)
    x = make_data((3, 40), g).to(device)
    x_pos = x.abs()  # an unsigned input too: the flag does not matter either way
    layouts = [None] + ([dnateq.exp_lut_layout(wp, [24, 40], bits, True)] if device == "cpu"
                        else [])
    for lay in layouts:
        for inp in (x, x_pos):
            y = [dnateq.exp_linear_lut(inp, wp, [24, 40], *P, bits, a, True, "nearest", None,
                                       w_layout=lay) for a in (True, False)]
            assert torch.equal(y[0], y[1])
            want = ref.exp_linear_lut(inp.cpu(), wp.cpu(), [24, 40], *P, bits, True, True)
            torch.testing.assert_close(y[0].cpu(), want, rtol=1e-5, atol=1e-5)
    w4 = random_codes((4, 3, 3, 3), bits, g)
    w4p = dnateq.exp_pack(w4, bits, True).to(device)
    x4 = make_data((2, 3, 6, 6), g).to(device)
    y = [dnateq.exp_conv2d_lut(x4, w4p, [4, 3, 3, 3], *P, bits, a, True, "nearest", None,
                               1, 1) for a in (True, False)]
    assert torch.equal(y[0], y[1])


# --- exp_level_table: the one device-independent operator --------------------

@pytest.mark.parametrize("bits", range(2, 8))
def test_level_table_is_the_reference_and_what_dequantize_indexes(bits):
    for alpha, scale, offset in [(1.3, 0.1, 0.0), (2.0, 1e-3, -0.02), (1.05, 3.0, 0.5)]:
        t = dnateq.exp_level_table(alpha, scale, offset, bits)
        assert t.dtype == torch.float32 and t.shape == (1 << bits,) and t.device.type == "cpu"
        assert torch.equal(t, ref.exp_level_table(alpha, scale, offset, bits))
        assert t[0] == 0
        codes = torch.arange(-128, 128, dtype=torch.int8)
        codes = codes[(codes.to(torch.int64) & 0x7F) < (1 << bits)]
        sign = torch.where(codes < 0, -1.0, 1.0)
        want = dnateq.exp_dequantize(codes, alpha, scale, offset, bits)
        got = sign * t[codes.to(torch.int64) & 0x7F]
        assert torch.equal(got, want)


def test_level_table_bad_arguments_and_tracing():
    for args, msg in [((1.0, 0.1, 0.0, 3), "alpha"), ((1.3, 0.1, 0.0, 8), "bits"),
                      ((1.3, -0.1, 0.0, 3), "scale"), ((1.3, 0.1, float("nan"), 3), "offset"),
                      ((1.3, 1e300, 0.0, 3), "non-finite")]:
        with pytest.raises(RuntimeError, match=msg):
            dnateq.exp_level_table(*args)
        with pytest.raises((ValueError, TypeError), match=msg):
            ref.exp_level_table(*args)

    def f(x):
        return x * dnateq.exp_level_table(1.3, 0.1, 0.0, 3)[1:5].sum()

    torch._dynamo.reset()
    x = torch.randn(4)
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), f(x))
