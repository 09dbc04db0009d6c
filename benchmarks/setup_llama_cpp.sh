#!/usr/bin/env bash
# llama.cpp (through llama-cpp-python, which builds it from source) in its own virtual environment,
# the peer of benchmarks/quantization.py for batch-1 decode of the same GGUF. Idempotent; the venv
# is gitignored. The build takes a few minutes on 2 cores.
#
#   bash benchmarks/setup_llama_cpp.sh            # -> benchmarks/.llama-cpp
#   LLAMA_CPP_VENV=/path bash benchmarks/setup_llama_cpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLAMA_CPP_VENV:-benchmarks/.llama-cpp}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    "$VENV/bin/pip" install -q --upgrade pip
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        "$VENV/bin/pip" install -q "llama-cpp-python==0.3.36"
fi
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
