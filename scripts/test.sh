#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, then lint and check formatting.
# --fast: the inner loop, without the long Ray/cluster tests (marker `slow`) and the LeRobot
# comparisons (marker `lerobot`). Every other argument goes to pytest.
# Test files run in SMOLVLA_TEST_WORKERS parallel pytest processes (default 2; 0 = none):
# most of a Ray test is waiting on processes, so two overlap well even on two cores. A file
# stays on one process, so its module-scoped clusters start once; the longest files start
# first (tests/conftest.py), in the order collected, not sorted by their number of tests.
set -euo pipefail
cd "$(dirname "$0")/.."
workers="${SMOLVLA_TEST_WORKERS:-2}"
args=()
if [ "$workers" != "0" ]; then
  args+=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
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
