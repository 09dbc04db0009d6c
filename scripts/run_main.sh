#!/usr/bin/env bash
# The main job on a fresh machine: set up, then batched generation on SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/jpaged generate "$@"
