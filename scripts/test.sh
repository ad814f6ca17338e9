#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, then lint and check formatting.
# --fast: the inner loop, without the long Ray/cluster tests (marker `slow`) and the LeRobot
# comparisons (marker `lerobot`). Every other argument goes to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    args+=(-m "not slow and not lerobot")
  else
    args+=("$arg")
  fi
done
scripts/setup.sh
.venv/bin/python -m pytest -q ${args[@]+"${args[@]}"}
.venv/bin/ruff check smolvla_ray tests benchmarks
.venv/bin/ruff format --check smolvla_ray tests benchmarks
