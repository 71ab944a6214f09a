#!/usr/bin/env bash
# One GPU session's checks of the CUDA kernels, in at most 8 minutes on an
# H100/H200 with torch preinstalled and no package registry (do NOT run
# scripts/setup.sh there: it installs packages).
#
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Stages (each under its own time limit, inside a total budget; a stage that
# fails or times out is recorded and the next one still runs):
#   1. build dnateq._C in place for the device's own arch only
#      (TORCH_CUDA_ARCH_LIST from the device's compute capability)
#   2. scripts/gpu_smoke.py (every operator, small shapes) under
#      compute-sanitizer --tool memcheck
#   3. pytest tests/test_cuda_ops.py (+ the CPU emulation / numerics tests)
#   4. benchmarks/bench_cuda_ops.py in two halves (so a timeout loses one
#      half only), each with its own copy-bandwidth measurement:
#        A: bandwidth, quantize, gemv     B: bandwidth, gemm, count, peers
#      then --merge into benchmarks/results/cuda_ops.<device>.json
#   5. the GEMV and count part of the smoke test under --tool racecheck, in
#      whatever budget is left
# Everything (logs, JSONs, nvidia-smi, a summary) goes under $OUT; the result
# JSONs also go into benchmarks/results/.
#
# Environment (all optional):
#   OUT                  output folder (default: gpu_check_out/ in the repo)
#   PYTHON               interpreter (default python3)
#   BUDGET_S             total seconds (default 470)
#   SKIP_BUILD=1         use the dnateq._C already built in python/dnateq
#   GPU_CHECK_DRY_RUN=1  no GPU needed: skips build, sanitizer and pytest,
#                        runs the smoke test on the CPU and the benchmark
#                        halves with --cpu-dry-run (checks this script)
#   BENCH_ARGS           extra arguments for both benchmark halves
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/gpu_check_out}"
BUDGET="${BUDGET_S:-470}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
mkdir -p "$OUT" benchmarks/results
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

log() { printf '[gpu_check %4ds] %s\n' $((SECONDS - START)) "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# stage NAME CAP_S CMD...: runs CMD with a limit of min(CAP_S, time left - 5 s),
# output to $OUT/NAME.log; records rc and seconds.
stage() {
  local name=$1 cap=$2; shift 2
  local lim; lim=$(left); lim=$((lim - 5)); [ "$lim" -gt "$cap" ] && lim=$cap
  if [ "$lim" -lt 10 ]; then
    log "$name: SKIPPED (budget spent)"
    return 124
  fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$lim" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local what=ok
  [ $rc -ne 0 ] && what="FAILED (rc=$rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT after ${lim}s"
  log "$name: $what in $((SECONDS - t0))s (log: $name.log)"
  return $rc
}

log "repo $ROOT, OUT=$OUT, budget ${BUDGET}s, dry run=$DRY"
git -C "$ROOT" log -1 --format='commit %H %s' >> "$SUMMARY" 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  2>&1 | tee -a "$SUMMARY"

if [ "$DRY" = "1" ]; then
  ARCH=none
  SLUG=cpu-dry-run
else
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  CAP=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')" 2>/dev/null)
  if [ -z "$CAP" ]; then
    log "no CUDA device visible to torch: nothing to check (GPU_CHECK_DRY_RUN=1 checks the script)"
    exit 2
  fi
  ARCH="$CAP"
  SLUG=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
  log "device ${SLUG}, compute capability ${ARCH}"
fi

# 1. build ------------------------------------------------------------------
if [ "$DRY" = "1" ] || [ "${SKIP_BUILD:-0}" = "1" ]; then
  log "build: skipped"
else
  command -v nvcc > /dev/null 2>&1 || export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
  stage build 240 env DNATEQ_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace
fi
"$PY" -c "import dnateq, torch; print('dnateq from', dnateq.__file__)" 2>&1 | tee -a "$SUMMARY"

# 2. smoke test of every op under compute-sanitizer --------------------------
if [ "$DRY" = "1" ]; then
  stage smoke_cpu 120 "$PY" scripts/gpu_smoke.py --device cpu
else
  SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ -x "$SAN" ]; then
    stage sanitizer_memcheck 120 "$SAN" --tool memcheck --error-exitcode 9 \
      --print-limit 20 "$PY" scripts/gpu_smoke.py --device cuda
  else
    log "compute-sanitizer not found: smoke test without it"
    stage smoke 60 "$PY" scripts/gpu_smoke.py --device cuda
  fi
fi

# 3. the CUDA tests -----------------------------------------------------------
if [ "$DRY" = "1" ]; then
  log "pytest tests/test_cuda_ops.py: skipped (dry run)"
else
  stage pytest_cuda 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_ops.py \
    tests/test_gemv_emulation.py tests/test_lut_numerics.py
fi

# 4. benchmarks in two halves ---------------------------------------------------
DRYARG=""
[ "$DRY" = "1" ] && DRYARG="--cpu-dry-run --no-graph --peak-bw 1e11"
RES=benchmarks/results
A="$RES/cuda_ops.$SLUG.partA.json"
B="$RES/cuda_ops.$SLUG.partB.json"
M="$RES/cuda_ops.$SLUG.json"
rm -f "$A" "$B"
# shellcheck disable=SC2086
stage bench_A 120 "$PY" benchmarks/bench_cuda_ops.py $DRYARG ${BENCH_ARGS:-} \
  --sections bandwidth,quantize,gemv --json "$A"
# shellcheck disable=SC2086
stage bench_B 120 "$PY" benchmarks/bench_cuda_ops.py $DRYARG ${BENCH_ARGS:-} \
  --sections bandwidth,gemm,count,peers --json "$B"
PARTS=()
[ -f "$A" ] && PARTS+=("$A")
[ -f "$B" ] && PARTS+=("$B")
if [ ${#PARTS[@]} -gt 0 ]; then
  [ "$DRY" = "1" ] && M="$OUT/cuda_ops.$SLUG.json"
  stage bench_merge 30 "$PY" benchmarks/bench_cuda_ops.py --merge "${PARTS[@]}" --json "$M"
  cp "${PARTS[@]}" "$OUT/" 2>/dev/null
  [ -f "$M" ] && cp "$M" "$OUT/" 2>/dev/null
  [ -f "$M" ] && "$PY" - "$M" <<'EOF' | tee -a "$SUMMARY"
import json, sys
d = json.load(open(sys.argv[1]))
for t in d["targets"]:
    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    print(f"target {t['name']:36} >= {t['threshold']:<8g} eager {fmt(t['value']):>8} "
          f"graph {fmt(t.get('value_graph')):>8} kernel {fmt(t.get('value_kernel')):>8}")
bad = [k for k, v in d["checks"].items() if v is False]
print("correctness checks failed:", bad if bad else "none")
EOF
else
  log "no benchmark JSON was written"
fi
[ "$DRY" = "1" ] && rm -f "$A" "$B"

# 5. last (least needed): shared-memory hazards of the kernels that use shared
# memory the most, in whatever budget is left
if [ "$DRY" != "1" ] && [ -x "${SAN:-}" ]; then
  stage sanitizer_racecheck 60 "$SAN" --tool racecheck --error-exitcode 9 \
    --print-limit 20 "$PY" scripts/gpu_smoke.py --device cuda --only gemv2,count
fi

log "done in $((SECONDS - START))s"
if grep -q -E "FAILED|TIMED OUT" "$SUMMARY"; then
  exit 1
fi
exit 0
