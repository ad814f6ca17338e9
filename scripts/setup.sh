#!/usr/bin/env bash
# Create .venv (Python 3.11+) with the project and its test extra.
# CPU machines get the pinned CPU build of torch first, so pip does not pull a CUDA build;
# set SMOLVLA_TORCH="torch" (or a CUDA wheel spec) on GPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${SMOLVLA_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch, smolvla_ray; print('setup ok: torch', torch.__version__)"
