#!/usr/bin/env bash
# The README's main command: sets up (scripts/setup.sh), then runs the demo.
# Until model calibration lands this is the operator tour and a quick CPU
# operator benchmark (python -m dnateq demo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
"${PYTHON:-python3}" -m dnateq demo "$@"
