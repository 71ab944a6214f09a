"""Build stamp of the dnateq extension: lets scripts/setup.sh skip the 3-4 minute
build when the built ``dnateq._C`` already matches the sources and the installed
torch.

The stamp (``build/dnateq_C.stamp.json``, written after a successful build) holds

- ``sources``: SHA-256 over the path and bytes of every file under ``csrc/``
  (schemas, shared headers and the operator families, CPU and CUDA) and of
  ``setup.py``;
- ``torch``: the installed torch version; ``cuda``: whether setup.py builds the
  CUDA kernels (same rule as setup.py: ``DNATEQ_CUDA``, ``torch.version.cuda``,
  ``CUDA_HOME``); ``arch``: ``TORCH_CUDA_ARCH_LIST`` (only when ``cuda``);
- ``so``: SHA-256 of the built library(ies) ``python/dnateq/_C*.so``, so a library
  replaced by hand (copied, rebuilt from other sources) is never trusted.

The build is skipped only when all of them match and ``import dnateq`` resolves
to this checkout; anything else (no stamp, a changed source, another torch,
CUDA switched, other archs, ``DNATEQ_FORCE_BUILD=1``) rebuilds.

    python scripts/build_stamp.py check   # exit 0 + one line "up to date", else 1 + reason
    python scripts/build_stamp.py write   # after a successful build
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import sys
from typing import Dict, List, Mapping, Optional, Tuple

STAMP = os.path.join("build", "dnateq_C.stamp.json")
SOURCE_DIRS = ("csrc",)
SOURCE_FILES = ("setup.py",)


def source_files(root: str) -> List[str]:
    """Relative paths of the files the extension is built from, sorted."""
    out = []
    for d in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, d)):
            dirnames[:] = sorted(n for n in dirnames if n != "__pycache__")
            for f in filenames:
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    for f in SOURCE_FILES:
        if os.path.isfile(os.path.join(root, f)):
            out.append(f)
    return sorted(p.replace(os.sep, "/") for p in out)


def sources_digest(root: str) -> str:
    h = hashlib.sha256()
    for rel in source_files(root):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
        h.update(str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def so_files(root: str) -> List[str]:
    return sorted(glob.glob(os.path.join(root, "python", "dnateq", "_C*.so")) +
                  glob.glob(os.path.join(root, "python", "dnateq", "_C*.pyd")))


def so_digest(root: str) -> Optional[str]:
    files = so_files(root)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.basename(f).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def cuda_wanted(env: Mapping[str, str], torch_cuda: Optional[str],
                cuda_home: Optional[str]) -> bool:
    """setup.py's rule (a mismatch here only costs a rebuild, never a stale skip:
    the built library's hash is checked too)."""
    flag = env.get("DNATEQ_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True   # required: a CPU build never matches (setup.py then explains)
    return torch_cuda is not None and cuda_home is not None


def toolchain(env: Mapping[str, str]) -> Tuple[str, Optional[str], Optional[str]]:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    return str(torch.__version__), torch.version.cuda, CUDA_HOME


def compute(root: str, env: Mapping[str, str], torch_version: str,
            torch_cuda: Optional[str], cuda_home: Optional[str]) -> Dict[str, object]:
    """The stamp the current sources and toolchain would have (without ``so``)."""
    cuda = cuda_wanted(env, torch_cuda, cuda_home)
    return {"sources": sources_digest(root), "torch": torch_version, "cuda": cuda,
            "arch": env.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0") if cuda else None}


def stale_reason(root: str, want: Dict[str, object]) -> Optional[str]:
    """None when the stamp under ``root`` matches ``want`` and the built library,
    else why a build is needed."""
    path = os.path.join(root, STAMP)
    try:
        with open(path) as fh:
            have = json.load(fh)
    except FileNotFoundError:
        return "no build stamp yet"
    except (OSError, ValueError):
        return "unreadable build stamp"
    if not isinstance(have, dict):
        return "unreadable build stamp"
    names = {"sources": "the sources (csrc/, setup.py) changed",
             "torch": "torch changed", "cuda": "CUDA on/off changed",
             "arch": "TORCH_CUDA_ARCH_LIST changed"}
    for key, why in names.items():
        if have.get(key) != want[key]:
            return why
    so = so_digest(root)
    if so is None:
        return "no built extension"
    if have.get("so") != so:
        return "the built extension is not the one the stamp describes"
    return None


def imports_from(root: str) -> bool:
    spec = importlib.util.find_spec("dnateq")
    if spec is None or spec.origin is None:
        return False
    want = os.path.realpath(os.path.join(root, "python", "dnateq", "__init__.py"))
    return os.path.realpath(spec.origin) == want


def write(root: str, want: Dict[str, object]) -> str:
    stamp = dict(want, so=so_digest(root))
    path = os.path.join(root, STAMP)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(stamp, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def main(argv: List[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if len(argv) != 2 or argv[1] not in ("check", "write"):
        print(__doc__)
        return 2
    env = os.environ
    want = compute(root, env, *toolchain(env))
    if argv[1] == "write":
        write(root, want)
        return 0
    if env.get("DNATEQ_FORCE_BUILD", "0") not in ("", "0"):
        print("setup: DNATEQ_FORCE_BUILD set: building")
        return 1
    why = stale_reason(root, want)
    if why is None and not imports_from(root):
        why = "dnateq is not installed from this checkout"
    if why is not None:
        print(f"setup: building the extension ({why})")
        return 1
    print(f"setup: extension up to date (sources {str(want['sources'])[:12]}, torch "
          f"{want['torch']}, cuda {'on ' + str(want['arch']) if want['cuda'] else 'off'}): "
          "skipping the build (DNATEQ_FORCE_BUILD=1 rebuilds)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
