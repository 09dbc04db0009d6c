"""Speculative decoding: per-token latency and throughput with and without it, in one run.

    python benchmarks/speculative.py            # SmolLM2 float32, 128 tokens, batch 1 and 8
    python benchmarks/speculative.py --smoke    # minutes: 8 tokens, 2 prompts, batch 1 and 2

Engines (each LLM(...) over the same SmolLM2-135M-Instruct, prefix caching off so the timed run
repeats the warm run's shapes): "plain" (no speculation), "ngram k=K" (prompt lookup, n-grams
1..4), "layer_skip m=M k=K" (self-speculation with the target's first M layers) and, with
--draft-model PATH, "draft_model k=K" (SmolLM2 is the smallest model here, so none by default). Two workloads, chat-templated:
  - grounded: rewrite / extract / summarise a given passage (the answer copies spans of the
    prompt, where n-gram lookup should hit);
  - chat: open questions (little to copy).
Each engine runs each workload at batch 1 (the prompts one by one: milliseconds per output token)
and at batch B (all at once: output tokens per second), greedy; each measurement runs once
untimed first (compiles its buckets), then timed. Greedy tokens are checked equal to plain's.
Prints one JSON object (figures, acceptance rates, mean accepted lengths, draft/verify seconds,
load average) and writes it with a PNG into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jpaged import LLM, SamplingParams                                 # noqa: E402

PASSAGE = (
    "The Lighthouse at Cape Morrow was built in 1871 by the engineer Helen Avery. It stands 38 "
    "metres tall, its lamp can be seen from 22 nautical miles away, and it was automated in 1989. "
    "The keeper's cottage beside it is now a small museum that opens from April to October, "
    "every day except Mondays, from 10 am to 5 pm. Tickets cost 6 euros for adults and 3 euros "
    "for children; entry is free for residents of Morrow County.")
GROUNDED = [
    f"Here is a passage:\n\n{PASSAGE}\n\nRewrite the passage in the same words, but as a "
    f"bulleted list with one fact per bullet.",
    f"Here is a passage:\n\n{PASSAGE}\n\nCopy every sentence that mentions a number, exactly as "
    f"written.",
    f"Here is a passage:\n\n{PASSAGE}\n\nExtract the opening days, hours and ticket prices of "
    f"the museum, quoting the passage.",
    f"Here is a passage:\n\n{PASSAGE}\n\nRepeat the passage word for word.",
    f"Here is a passage:\n\n{PASSAGE}\n\nWho built the lighthouse, when, and how tall is it? "
    f"Answer with the passage's own words.",
    f"Here is a passage:\n\n{PASSAGE}\n\nRewrite the passage in the past tense where it is in "
    f"the present tense, changing nothing else.",
    f"Here is a passage:\n\n{PASSAGE}\n\nList the facts about the keeper's cottage, copied from "
    f"the passage.",
    f"Here is a passage:\n\n{PASSAGE}\n\nQuote the sentence about tickets, then the sentence "
    f"about automation.",
]
CHAT = [
    "What are three good habits for learning a new language?",
    "Write a short poem about autumn rain.",
    "Explain how a bicycle stays upright while moving.",
    "Give me a simple recipe for a vegetable soup.",
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Suggest a name for a bakery and explain why it fits.",
    "What should I pack for a weekend hiking trip?",
    "Describe the water cycle in a few sentences.",
]


def chat_prompts(llm: LLM, texts: list[str]) -> list[dict]:
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": t}],
                                     add_generation_prompt=True, tokenize=False) for t in texts]
    return [{"prompt_token_ids": list(tok(t, add_special_tokens=False)["input_ids"])}
            for t in texts]


def run(llm: LLM, prompts: list[dict], params: SamplingParams, batch: int):
    """(seconds, output tokens, token ids) of the prompts in groups of `batch`."""
    start, tokens, ids = time.perf_counter(), 0, []
    for i in range(0, len(prompts), batch):
        for out in llm.generate(prompts[i:i + batch], params, use_tqdm=False):
            ids.append(list(out.outputs[0].token_ids))
            tokens += len(ids[-1])
    return time.perf_counter() - start, tokens, ids


def spec_stats(llm: LLM, before) -> dict:
    after = llm.stats()
    drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
    draft_tokens = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    return {"drafts": drafts, "draft_tokens": draft_tokens, "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / draft_tokens, 4) if draft_tokens else None,
            "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
            "draft_seconds": round(after.spec_decode_draft_seconds -
                                   before.spec_decode_draft_seconds, 3),
            "verify_seconds": round(after.spec_decode_verify_seconds -
                                    before.spec_decode_verify_seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    parser.add_argument("--layer-skip-layers", type=int, default=24,
                        help="layer_skip's m (SmolLM2 has 30 layers)")
    parser.add_argument("--draft-model", default=None,
                        help="also run method draft_model with this checkpoint (same tokenizer)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    max_tokens, batch = (8, 2) if args.smoke else (args.max_tokens, args.batch)
    num_prompts = 2 if args.smoke else len(GROUNDED)
    engine = dict(dtype="float32", page_size=16, max_model_len=1024, max_num_seqs=max(batch, 1),
                  max_num_batched_tokens=1024, num_pages=1 + max(batch, 1) * 64,
                  enable_prefix_caching=False)    # the timed run repeats the warm run's shapes
    configs = {
        "plain": None,
        f"ngram k={args.k}": {"method": "ngram", "num_speculative_tokens": args.k,
                              "prompt_lookup_max": 4, "prompt_lookup_min": 1},
        f"layer_skip m={args.layer_skip_layers} k={args.k}": {
            "method": "layer_skip", "num_speculative_tokens": args.k,
            "num_layers": args.layer_skip_layers},
    }
    if args.draft_model:
        configs[f"draft_model k={args.k}"] = {"method": "draft_model", "model": args.draft_model,
                                              "num_speculative_tokens": args.k}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    load_before = os.getloadavg()
    results, reference = {}, {}
    for name, spec in configs.items():
        llm = LLM(None, **engine, speculative_config=spec)
        workloads = {"grounded": chat_prompts(llm, GROUNDED[:num_prompts]),
                     "chat": chat_prompts(llm, CHAT[:num_prompts])}
        for workload, prompts in workloads.items():
            for b in (1, batch):
                run(llm, prompts, params, b)                       # compile this shape's buckets
                before = llm.stats()
                seconds, tokens, ids = run(llm, prompts, params, b)
                key = f"{workload} batch {b}"
                reference.setdefault(key, ids)
                entry = {"seconds": round(seconds, 3), "output_tokens": tokens,
                         "ms_per_token": round(1000 * seconds / max(tokens, 1), 2),
                         "tokens_per_s": round(tokens / seconds, 1),
                         "greedy_equal_to_plain": ids == reference[key]}
                if spec is not None:
                    entry.update(spec_stats(llm, before))
                results.setdefault(name, {})[key] = entry
                print(name, key, json.dumps(entry), file=sys.stderr)
        del llm
    for name, per_key in results.items():
        for key, entry in per_key.items():
            entry["speedup_vs_plain"] = round(results["plain"][key]["ms_per_token"] /
                                              entry["ms_per_token"], 3)
    report = {"benchmark": "speculative", "model": "SmolLM2-135M-Instruct float32",
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "max_tokens": max_tokens, "batch": batch, "num_prompts": num_prompts,
              "smoke": args.smoke, "load_avg_before_after": [round(load_before[0], 2),
                                                             round(os.getloadavg()[0], 2)],
              "results": results}
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / (
        f"speculative_{jax.devices()[0].platform}_jax{jax.__version__}"
        f"{'_smoke' if args.smoke else ''}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report, indent=1))


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = report["results"]
    names = list(results)
    keys = list(results[names[0]])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, label in ((axes[0], "ms_per_token", "ms per output token (lower is better)"),
                              (axes[1], "speedup_vs_plain", "speed-up vs plain (per token)")):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [results[name][k][metric] for k in keys]
            bars = ax.bar([x + i * width for x in range(len(keys))], values, width, label=name)
            for bar, key in zip(bars, keys):
                rate = results[name][key].get("acceptance_rate")
                if rate is not None and metric == "speedup_vs_plain":
                    ax.annotate(f"{rate:.0%}", (bar.get_x() + bar.get_width() / 2,
                                                bar.get_height()), ha="center", fontsize=7)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(keys))], keys,
                      rotation=15)
        ax.set_ylabel(label)
        if metric == "speedup_vs_plain":
            ax.axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Speculative decoding, {report['model']}, {report['device']}, greedy, "
                 f"{report['max_tokens']} tokens (labels: acceptance rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
