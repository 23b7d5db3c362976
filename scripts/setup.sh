#!/usr/bin/env bash
# Create .venv if it is missing and install fedmri (editable, with dev tools) into it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# torch is pinned to 2.13.0 (CPU build); see README "GPU" for CUDA.
.venv/bin/pip install -q -e '.[dev]'
