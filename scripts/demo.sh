#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the fedmri demo into runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/fedmri demo --out runs/demo "$@"
