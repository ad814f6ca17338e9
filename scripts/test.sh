#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, then lint and check formatting.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
.venv/bin/ruff check smolvla_ray tests benchmarks
.venv/bin/ruff format --check smolvla_ray tests benchmarks
