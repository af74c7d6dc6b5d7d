#!/usr/bin/env bash
# One short GPU check (< 10 min): see scripts/gpu_check.py. Run from the repository root.
#   bash scripts/gpu_check.sh          on a CUDA machine
#   bash scripts/gpu_check.sh --cpu    the same checks in bf16 on the CPU (run by the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
timeout 600 "$PY" scripts/gpu_check.py "$@"
