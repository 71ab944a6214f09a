"""scripts/build_stamp.py: setup.sh skips the build only when the built
extension matches the sources and the toolchain (issue 14 item 7). These tests
use a fake source tree; nothing is built."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "build_stamp", os.path.join(ROOT, "scripts", "build_stamp.py"))
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)

ENV = {"TORCH_CUDA_ARCH_LIST": "9.0"}
TOOLS = ("2.9.0", "12.8", "/usr/local/cuda")


def _tree(tmp_path):
    (tmp_path / "csrc" / "fit").mkdir(parents=True)
    (tmp_path / "csrc" / "lut").mkdir()
    (tmp_path / "python" / "dnateq").mkdir(parents=True)
    (tmp_path / "csrc" / "checks.h").write_text("// checks\n")
    (tmp_path / "csrc" / "fit" / "cpu.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "csrc" / "lut" / "cuda.cu").write_text("// cuda\n")
    (tmp_path / "setup.py").write_text("setup()\n")
    (tmp_path / "python" / "dnateq" / "_C.abi3.so").write_bytes(b"\x7fELF built")
    return str(tmp_path)


def _built(root, env=ENV, tools=TOOLS):
    want = bs.compute(root, env, *tools)
    bs.write(root, want)
    return want


def test_fresh_build_is_up_to_date(tmp_path):
    root = _tree(tmp_path)
    assert bs.stale_reason(root, bs.compute(root, ENV, *TOOLS)) == "no build stamp yet"
    _built(root)
    assert bs.stale_reason(root, bs.compute(root, ENV, *TOOLS)) is None


@pytest.mark.parametrize("path", ["csrc/fit/cpu.cpp", "csrc/checks.h", "csrc/lut/cuda.cu",
                                  "setup.py"])
def test_changed_source_rebuilds(tmp_path, path):
    root = _tree(tmp_path)
    _built(root)
    with open(os.path.join(root, path), "a") as fh:
        fh.write(" ")
    assert "sources" in bs.stale_reason(root, bs.compute(root, ENV, *TOOLS))


def test_new_or_removed_source_rebuilds(tmp_path):
    root = _tree(tmp_path)
    _built(root)
    (tmp_path / "csrc" / "fit" / "new.cpp").write_text("")
    assert "sources" in bs.stale_reason(root, bs.compute(root, ENV, *TOOLS))
    (tmp_path / "csrc" / "fit" / "new.cpp").unlink()
    assert bs.stale_reason(root, bs.compute(root, ENV, *TOOLS)) is None
    (tmp_path / "csrc" / "lut" / "cuda.cu").unlink()
    assert "sources" in bs.stale_reason(root, bs.compute(root, ENV, *TOOLS))


def test_toolchain_changes_rebuild(tmp_path):
    root = _tree(tmp_path)
    _built(root)
    assert "torch" in bs.stale_reason(root, bs.compute(root, ENV, "2.10.0", *TOOLS[1:]))
    assert "CUDA" in bs.stale_reason(root, bs.compute(root, {"DNATEQ_CUDA": "0"}, *TOOLS))
    assert "CUDA" in bs.stale_reason(root, bs.compute(root, ENV, TOOLS[0], None, None))
    assert "ARCH" in bs.stale_reason(root, bs.compute(
        root, {"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, *TOOLS))
    # DNATEQ_CUDA=1 on a CPU-only build: never "up to date" (setup.py explains)
    _built(root, {"DNATEQ_CUDA": "0"})
    assert "CUDA" in bs.stale_reason(root, bs.compute(root, {"DNATEQ_CUDA": "1"},
                                                      TOOLS[0], None, None))


def test_replaced_or_missing_library_rebuilds(tmp_path):
    root = _tree(tmp_path)
    _built(root)
    so = tmp_path / "python" / "dnateq" / "_C.abi3.so"
    so.write_bytes(b"\x7fELF copied from elsewhere")
    assert "not the one" in bs.stale_reason(root, bs.compute(root, ENV, *TOOLS))
    so.unlink()
    assert bs.stale_reason(root, bs.compute(root, ENV, *TOOLS)) == "no built extension"


def test_corrupt_stamp_rebuilds(tmp_path):
    root = _tree(tmp_path)
    _built(root)
    with open(os.path.join(root, bs.STAMP), "w") as fh:
        fh.write("{not json")
    assert bs.stale_reason(root, bs.compute(root, ENV, *TOOLS)) == "unreadable build stamp"


def test_cli_says_why_in_one_line():
    """The real script on this checkout answers in one line (skip or build) and
    exits 0 / 1 accordingly; DNATEQ_FORCE_BUILD always says build."""
    script = os.path.join(ROOT, "scripts", "build_stamp.py")
    env = dict(os.environ, DNATEQ_FORCE_BUILD="1")
    r = subprocess.run([sys.executable, script, "check"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and r.stdout.count("\n") == 1 and "building" in r.stdout
    env["DNATEQ_FORCE_BUILD"] = "0"
    r = subprocess.run([sys.executable, script, "check"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode in (0, 1) and r.stdout.count("\n") == 1, r.stdout + r.stderr
    assert ("skipping the build" in r.stdout) == (r.returncode == 0)


def test_setup_sh_uses_the_stamp():
    text = open(os.path.join(ROOT, "scripts", "setup.sh")).read()
    assert "build_stamp.py check" in text and "build_stamp.py write" in text
    assert "hypothesis" in text
