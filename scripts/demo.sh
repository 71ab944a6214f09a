#!/usr/bin/env bash
# The README's main command: sets up (scripts/setup.sh), then runs the demo
# (python -m dnateq demo): a CNN trained on scikit-learn's bundled digits is
# quantized with dnateq.quantize and the report printed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
"${PYTHON:-python3}" -m dnateq demo "$@"
