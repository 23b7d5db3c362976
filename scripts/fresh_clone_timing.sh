#!/usr/bin/env bash
# Time the two commands from a fresh clone of HEAD: `bash scripts/demo.sh`, then `bash .ci/run`
# N times in a row (default 3; 0 times the demo alone). Logs go to OUT (default: a new temporary
# folder); the summary is printed as JSON on stdout (scripts/summarize_timing.py). Takes about an
# hour on 2 cores. Each demo line is stamped with the seconds since the demo began, so the JSON
# can say where the time went, and scripts/speed_probe.py runs before and after each command,
# because this machine's speed varies within a day.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
runs="${1:-3}"
out="${2:-$(mktemp -d)}"
clone="$(mktemp -d)/fedmri"
probe() { echo "probe $1 $("$repo/.venv/bin/python" "$repo/scripts/speed_probe.py")" >> "$out/chain.log"; }
git clone -q "$repo" "$clone" && cd "$clone" || exit 1
git log -1 --format=%h > "$out/chain.log"
probe before-demo
s=$(date +%s)
bash scripts/demo.sh 2>&1 | while IFS= read -r line; do echo "[$(( $(date +%s) - s ))] $line"; done > "$out/chain-demo.log"
echo "demo rc=${PIPESTATUS[0]} wall=$(( $(date +%s) - s ))s lines=$(wc -l < "$out/chain-demo.log")" >> "$out/chain.log"
probe after-demo
for i in $(seq 1 "$runs"); do
  s=$(date +%s); bash .ci/run > "$out/chain-ci$i.log" 2>&1
  echo "ci$i rc=$? wall=$(( $(date +%s) - s ))s" >> "$out/chain.log"
  probe "after-ci$i"
done
"$repo/.venv/bin/python" "$repo/scripts/summarize_timing.py" "$out"
