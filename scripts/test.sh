#!/usr/bin/env bash
# The test suite on a fresh machine: set up (with torch for HF parity), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/python -m pytest -q "$@"
