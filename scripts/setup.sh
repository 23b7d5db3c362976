#!/usr/bin/env bash
# Create .venv if it is missing and install fedmri (editable, with dev tools) into it.
# Re-installs only when pyproject.toml changed since the last install; pip's output goes to
# .venv/install.log (shown if the install fails).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=".venv/.fedmri-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || [ ! -x .venv/bin/fedmri ]; then
  echo "setup: installing fedmri and its pinned dependencies into .venv (log: .venv/install.log)"
  # torch is pinned to 2.13.0 (CPU build); see docs/gpu.md for CUDA.
  if ! .venv/bin/pip install -e '.[dev]' > .venv/install.log 2>&1; then
    tail -n 40 .venv/install.log
    echo "setup: the install failed; the whole log is .venv/install.log" >&2
    exit 1
  fi
  echo "$wanted" > "$stamp"
fi
