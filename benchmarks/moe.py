"""MoE throughput: the grouped matmul (each routed row through its own expert) vs the dense
formulation (every token through every expert, weighted by a dense [T, E] routing matrix).

    python benchmarks/moe.py                  # CPU: a small Qwen3-MoE-like model, float32
    python benchmarks/moe.py --smoke          # seconds: tiny shapes, one repeat

The model has Qwen3-30B-A3B's routing geometry (128 experts, 8 per token, expert width 3/8 of D,
32 q / 4 kv heads) at a width a 2-core CPU runs (D 512, 2 layers) with random weights; the
jitted step of the engine's model (`CausalLM`, the per-layer weight placement the engine uses on
CPU) runs a prefill of B prompts x W tokens and a decode of B tokens, each timed as the median of
`--repeats` calls after a warm-up. Implementations (CausalLM.moe_impl): "segment" (sort by expert,
blocks of rows per expert: the CPU default), "ragged_dot" (jax.lax.ragged_dot, the default off CPU;
XLA:CPU expands it into a masked product with every expert), "dense". Prints one JSON object
(tokens/s per implementation and phase, the machine's load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jpaged.models import CausalLM, KVCache, arrange_layers             # noqa: E402
from jpaged.models.kv_cache import AttentionMetadata                  # noqa: E402
from jpaged.models.random_weights import random_checkpoint            # noqa: E402

CONFIG = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=8192, hidden_size=512,
              intermediate_size=1536, num_hidden_layers=2, num_attention_heads=32,
              num_key_value_heads=4, head_dim=16, num_experts=128, num_experts_per_tok=8,
              moe_intermediate_size=192, norm_topk_prob=True, max_position_embeddings=4096,
              rms_norm_eps=1e-6, rope_theta=1e6)
SMOKE = dict(CONFIG, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
             num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, vocab_size=512)
PAGE_SIZE = 16


def metadata(num_seqs: int, width: int, context: int, decode: bool) -> AttentionMetadata:
    """B sequences of `context` tokens in contiguous pages; `width` new tokens each."""
    pages = -(-context // PAGE_SIZE)
    tables = 1 + np.arange(num_seqs * pages, dtype=np.int32).reshape(num_seqs, pages)
    pos = np.arange(context - width, context)
    rows = np.repeat(np.arange(num_seqs), width)
    slots = tables[rows, np.tile(pos, num_seqs) // PAGE_SIZE] * PAGE_SIZE + np.tile(
        pos, num_seqs) % PAGE_SIZE
    qsl = np.arange(num_seqs + 1, dtype=np.int32) * width
    return AttentionMetadata(jnp.asarray(tables), jnp.asarray(slots, jnp.int32),
                             jnp.full((num_seqs,), context, jnp.int32), jnp.asarray(qsl),
                             decode_only=decode)


def time_step(model, params, num_seqs: int, width: int, context: int, repeats: int) -> float:
    """Median seconds of one jitted step bringing `width` new tokens to each of B sequences."""
    config = model.config
    cache = KVCache.zeros(config, 1 + num_seqs * -(-context // PAGE_SIZE), PAGE_SIZE, jnp.float32)
    md = metadata(num_seqs, width, context, decode=width == 1)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, num_seqs * width), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(context - width, context), num_seqs), jnp.int32)
    step = jax.jit(lambda p, c: model.apply({"params": p}, tokens, positions, c, md)[0])
    step(params, cache).block_until_ready()                                  # compile, warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(params, cache).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=8, help="sequences B")
    parser.add_argument("--prompt", type=int, default=128, help="prefill tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default="segment,ragged_dot,dense")
    args = parser.parse_args(argv)
    config = SMOKE if args.smoke else CONFIG
    repeats = 1 if args.smoke else args.repeats
    checkpoint = random_checkpoint(config, "float32", seed=0)
    params = arrange_layers(checkpoint.params)
    load_before = os.getloadavg()
    result = {"config": {k: v for k, v in config.items() if k != "architectures"},
              "batch": args.batch, "prompt_tokens": args.prompt, "repeats": repeats,
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "impls": {}}
    for impl in args.impls.split(","):
        model = CausalLM(checkpoint.config, jnp.float32, moe_impl=impl)
        prefill = time_step(model, params, args.batch, args.prompt, args.prompt, repeats)
        decode = time_step(model, params, args.batch, 1, args.prompt + 1, repeats)
        result["impls"][impl] = {
            "prefill_tokens_per_s": round(args.batch * args.prompt / prefill, 1),
            "decode_tokens_per_s": round(args.batch / decode, 1),
            "prefill_ms": round(prefill * 1e3, 2), "decode_ms": round(decode * 1e3, 2)}
    result["load_average_before_after"] = [round(load_before[0], 2),
                                           round(os.getloadavg()[0], 2)]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
