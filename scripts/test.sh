#!/usr/bin/env bash
# The project's test command (README): sets up the machine's Python and builds
# the extension (scripts/setup.sh), runs the pytest suite, then the CMake +
# GoogleTest suite.
#
#   bash scripts/test.sh
#
# Environment (all optional):
#   PYTHON                 interpreter to use (default: python3)
#   MAX_JOBS               parallel compile jobs (default: 2)
#   TORCH_CUDA_ARCH_LIST   CUDA archs of the extension (default: "8.0;9.0");
#                          the CUDA kernels are compiled whenever torch has
#                          CUDA and nvcc is found (see setup.py, DNATEQ_CUDA)
#   PYTEST_ARGS            extra pytest arguments (e.g. "-k pack")
#   DNATEQ_SKIP_CMAKE=1    skip the CMake/ctest stage
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
JOBS="${MAX_JOBS:-2}"
ARCHS="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
START=$SECONDS

section() {
  printf '\n==================== %s ====================\n' "$*"
}
elapsed() {
  local s=$((SECONDS - START))
  printf -- '---- %s done (%dm%02ds elapsed in total)\n' "$1" $((s / 60)) $((s % 60))
}
fail() {
  printf '\n**** FAILED: %s\n' "$*" >&2
  exit 1
}

section "environment"
"$PY" --version
if command -v nvcc >/dev/null 2>&1; then
  echo "nvcc: $(command -v nvcc) ($(nvcc --version | tail -n 1))"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "nvcc: /usr/local/cuda/bin/nvcc (not on PATH; torch finds it via CUDA_HOME)"
else
  echo "nvcc: not found (CPU-only extension)"
fi
echo "cmake: $(cmake --version | head -n 1)"
echo "MAX_JOBS=$JOBS TORCH_CUDA_ARCH_LIST=$ARCHS"

# ---------------------------------------------------------------------------
section "1/3 set up: dependencies and build (scripts/setup.sh)"
PYTHON="$PY" MAX_JOBS="$JOBS" TORCH_CUDA_ARCH_LIST="$ARCHS" bash scripts/setup.sh \
  || fail "set-up (dependencies or building the extension)"
elapsed "build"

# ---------------------------------------------------------------------------
section "2/3 pytest"
set +e
# shellcheck disable=SC2086
"$PY" -m pytest -q tests ${PYTEST_ARGS:-}
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  fail "pytest collected no tests (exit code 5)"
elif [ "$rc" -ne 0 ]; then
  fail "pytest (exit code $rc)"
fi
elapsed "pytest"

# ---------------------------------------------------------------------------
if [ "${DNATEQ_SKIP_CMAKE:-0}" = "1" ]; then
  section "3/3 CMake + GoogleTest: skipped (DNATEQ_SKIP_CMAKE=1)"
else
  section "3/3 CMake + GoogleTest (CPU build in build/cmake)"
  GEN=()
  if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
  if [ -f build/cmake/CMakeCache.txt ] && [ ${#GEN[@]} -gt 0 ] \
     && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' build/cmake/CMakeCache.txt; then
    rm -rf build/cmake  # generator changed
  fi
  cmake -S . -B build/cmake "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DDNATEQ_WITH_CUDA=OFF -DDNATEQ_BUILD_TESTS=ON \
        -DPython3_EXECUTABLE="$(command -v "$PY")" \
    || fail "cmake configure"
  cmake --build build/cmake -j "$JOBS" || fail "cmake build"
  ctest --test-dir build/cmake --output-on-failure -j "$JOBS" --timeout 600 \
    || fail "ctest"
  elapsed "CMake + ctest"
fi

section "all tests passed"
elapsed "everything"
