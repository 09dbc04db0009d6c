"""LoRA throughput (#19): the same offline workload with no adapter, one adapter for every request,
and four adapters mixed in every batch (Punica / S-LoRA's question: what does serving many
adapters at once cost?).

    python benchmarks/lora.py                 # SmolLM2-135M f32, 32 chat prompts x 128 tokens
    python benchmarks/lora.py --smoke         # seconds: a tiny random model, 4 prompts x 8 tokens

Runs, in one process on the same machine, each timed as the best of --repeats passes after an
untimed pass that compiles every bucket (EOS ignored, so every run makes the same tokens):
  base         LLM(...) without enable_lora: the baseline
  lora_none    LLM(..., enable_lora=True, max_loras=4), no request names an adapter
  lora_one     the same engine, every request with adapter 0
  lora_mixed4  the same engine, request i with adapter i % 4 (every batch mixes all four)
Adapters are PEFT directories written here with random A and B (rank --rank, all seven targets:
q, k, v, o, gate, up, down), read by the engine's PEFT loader. Goal of the issue: lora_mixed4 at
>= 0.8x base. Prints one JSON document; writes it and a PNG bar chart to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMOKE_CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                    max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 4 x 8 tokens")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.smoke:
        args.num_prompts, args.output_len, args.repeats = 4, 8, 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="jpaged-lora-bench-") as tmp:
        report = run(args, Path(tmp))
    report["machine"] = machine_info(load_before)
    write_outputs(report, Path(args.out_dir), "smoke" if args.smoke else "smollm2")
    print(json.dumps(report, indent=2))
    return 0


def run(args, tmp: Path) -> dict:
    from jpaged import LLM, LoRARequest, SamplingParams
    engine_args = dict(dtype=args.dtype, max_num_seqs=args.num_prompts,
                       max_num_batched_tokens=2048, max_model_len=1024)
    base_llm, config, prompts = make_llm(args, LLM, engine_args)
    adapters = [write_adapter(tmp / f"adapter{i}", config, args.rank, seed=i)
                for i in range(args.num_adapters)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len,
                            min_tokens=args.output_len, ignore_eos=True)
    report = {"workload": {"model": args.model or ("random tiny" if args.smoke else
                                                   "SmolLM2-135M-Instruct"),
                           "num_prompts": len(prompts), "output_len": args.output_len,
                           "dtype": args.dtype, "rank": args.rank, "targets": list(TARGETS),
                           "num_adapters": args.num_adapters, "repeats": args.repeats}}
    report["base"] = timed(base_llm, prompts, params, None, args.repeats)
    del base_llm
    lora_llm, _, _ = make_llm(args, LLM, dict(engine_args, enable_lora=True,
                                              max_loras=args.num_adapters,
                                              max_lora_rank=args.rank))
    requests = [LoRARequest(f"a{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
    runs = {"lora_none": None, "lora_one": requests[0],
            "lora_mixed4": [requests[i % len(requests)] for i in range(len(prompts))]}
    for name, lora in runs.items():
        report[name] = timed(lora_llm, prompts, params, lora, args.repeats)
    base = report["base"]["output_tokens_per_s"]
    for name in runs:
        report[name]["vs_base"] = round(report[name]["output_tokens_per_s"] / base, 3)
    report["goal"] = {"lora_mixed4_vs_base_at_least": 0.8,
                      "met": report["lora_mixed4"]["vs_base"] >= 0.8}
    return report


def make_llm(args, LLM, engine_args: dict):
    """(LLM, its ModelConfig, token-id prompts)."""
    if args.smoke:
        from jpaged.models.random_weights import random_checkpoint
        llm = LLM.from_checkpoint(random_checkpoint(SMOKE_CONFIG, "float32"),
                                  **{k: v for k, v in engine_args.items() if k != "dtype"},
                                  num_pages=256)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(2, 500, 20 + 3 * i).tolist() for i in range(args.num_prompts)]
        return llm, llm.llm_engine.model_config, prompts
    llm = LLM(args.model, **engine_args)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
               for q in (QUESTIONS * -(-args.num_prompts // len(QUESTIONS)))[:args.num_prompts]]
    return llm, llm.llm_engine.model_config, [list(p) for p in prompts]


def timed(llm, prompts, params, lora, repeats: int) -> dict:
    """Best of `repeats` timed passes after an untimed one (which compiles the buckets)."""
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch, params, use_tqdm=False, lora_request=lora)
    times, tokens = [], 0
    for _ in range(repeats):
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False, lora_request=lora)
        times.append(time.perf_counter() - start)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    best = min(times)
    return {"output_tokens": tokens, "seconds": round(best, 3), "all_seconds": [round(t, 3) for t in times],
            "output_tokens_per_s": round(tokens / best, 1)}


def write_adapter(path: Path, config, rank: int, seed: int) -> Path:
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) with random A, B."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    d, f, n, k, h = (config.hidden_size, config.intermediate_size, config.num_heads,
                     config.num_kv_heads, config.head_dim)
    dims = {"q_proj": (d, n * h), "k_proj": (d, k * h), "v_proj": (d, k * h),
            "o_proj": (n * h, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    tensors = {}
    for layer in range(config.num_layers):
        for target, (fan_in, fan_out) in dims.items():
            part = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.02, (rank, fan_in)).astype(
                np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.02, (fan_out, rank)).astype(
                np.float32)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "lora_dropout": 0.0, "bias": "none"}))
    return path


def machine_info(load_before) -> dict:
    import jax
    return {"device": jax.devices()[0].device_kind, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def write_outputs(report: dict, out_dir: Path, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"lora_{tag}.json").write_text(json.dumps(report, indent=2))
    names = ["base", "lora_none", "lora_one", "lora_mixed4"]
    values = [report[n]["output_tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, values, color=["C0", "C1", "C2", "C3"])
    for i, n in enumerate(names):
        label = f"{values[i]:.0f}" + ("" if n == "base" else f"\n{report[n]['vs_base']:.2f}x")
        ax.text(i, values[i], label, ha="center", va="bottom", fontsize=8)
    ax.axhline(0.8 * values[0], color="k", ls="--", lw=1, label="goal: 0.8x base")
    ax.legend(loc="lower right", fontsize=8)
    w = report["workload"]
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{w['model']}: {w['num_prompts']} prompts x {w['output_len']} tokens, "
                 f"{w['dtype']}, LoRA rank {w['rank']} on q,k,v,o,gate,up,down", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"lora_{tag}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
