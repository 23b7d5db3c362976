#!/usr/bin/env bash
# Create .venv if it is missing and install fedmri (editable, with dev tools) into it.
# Re-installs only when pyproject.toml changed since the last install; the installer's output
# goes to .venv/install.log (shown if the install fails).
#
# The install is done by uv (pinned below, itself installed into .venv by pip): it fetches and
# unpacks in parallel and compiles the bytecode on both cores, about 30 s against pip's 100 s on
# 2 cores, with the same versions (docs/development.md). uv does not read pip's configuration,
# so pip's find-links (where this machine keeps the CPU build of torch) and constraints are
# handed to it here.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION="0.13.9"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=".venv/.fedmri-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || [ ! -x .venv/bin/fedmri ]; then
  echo "setup: installing fedmri and its pinned dependencies into .venv (log: .venv/install.log)"
  fail() {
    tail -n 40 .venv/install.log
    echo "setup: $1 failed; the whole log is .venv/install.log" >&2
    exit 1
  }
  .venv/bin/pip install "uv==$UV_VERSION" > .venv/install.log 2>&1 || fail "installing uv $UV_VERSION with pip"
  args=(--python .venv/bin/python --compile-bytecode)
  pip_setting() {  # pip's value for $1 (environment first, then pip's config files), or nothing
    .venv/bin/pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | head -n 1
  }
  links="$(pip_setting find-links)"
  constraint="$(pip_setting constraint)"
  for link in $links; do args+=(--find-links "$link"); done
  if [ -n "$constraint" ]; then args+=(--constraint "$constraint"); fi
  # torch is pinned to 2.13.0 (CPU build); see docs/gpu.md for CUDA.
  .venv/bin/uv pip install "${args[@]}" -e '.[dev]' >> .venv/install.log 2>&1 || fail "the install"
  echo "$wanted" > "$stamp"
fi
