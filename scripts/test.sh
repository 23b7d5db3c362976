#!/usr/bin/env bash
# The test suite: set up .venv if needed, lint, type-check, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/mypy --strict common/protocol.py  # what crosses the client/server boundary
# Two workers: the `slow` real-process tests one after another on one of them, the rest on the
# other (tests/conftest.py). They wait on Flower, Ray, heartbeats and imports much of the time.
.venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
