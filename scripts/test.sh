#!/usr/bin/env bash
# The test suite: set up .venv if needed, lint, type-check, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/mypy --strict common/protocol.py  # what crosses the client/server boundary
# Two workers, one test file each at a time (a file's tests share its fixtures and processes):
# the real-process tests spend much of their time waiting on Flower, Ray and heartbeats.
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
