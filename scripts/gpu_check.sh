#!/usr/bin/env bash
# One short GPU check (< 8 min): see scripts/gpu_check.py. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
timeout 480 "$PY" scripts/gpu_check.py
