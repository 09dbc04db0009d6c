#!/usr/bin/env bash
# The test suite on a fresh machine: set up (with torch for HF parity), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Two workers (this machine has 2 cores), one test file per worker at a time so a file's shared
# engines and fixtures stay in one process.
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
