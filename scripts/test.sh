#!/usr/bin/env bash
# The test suite: set up .venv if needed, lint, type-check, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/mypy --strict common/protocol.py  # what crosses the client/server boundary
.venv/bin/python -m pytest "$@"
