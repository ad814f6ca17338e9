#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, then lint.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
.venv/bin/ruff check smolvla_ray tests benchmarks
