#!/usr/bin/env bash
# Time the two commands from a fresh clone of HEAD: `bash scripts/demo.sh`, then `bash .ci/run`
# N times in a row (default 3). Logs go to OUT (default: a new temporary folder); the summary is
# printed as JSON on stdout (scripts/summarize_timing.py). Takes about an hour on 2 cores.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
runs="${1:-3}"
out="${2:-$(mktemp -d)}"
clone="$(mktemp -d)/fedmri"
git clone -q "$repo" "$clone" && cd "$clone" || exit 1
git log -1 --format=%h > "$out/chain.log"
s=$(date +%s); bash scripts/demo.sh > "$out/chain-demo.log" 2>&1
echo "demo rc=$? wall=$(( $(date +%s) - s ))s lines=$(wc -l < "$out/chain-demo.log")" >> "$out/chain.log"
for i in $(seq 1 "$runs"); do
  s=$(date +%s); bash .ci/run > "$out/chain-ci$i.log" 2>&1
  echo "ci$i rc=$? wall=$(( $(date +%s) - s ))s" >> "$out/chain.log"
done
"$repo/.venv/bin/python" "$repo/scripts/summarize_timing.py" "$out"
