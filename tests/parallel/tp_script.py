"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_tensor_parallel.py).

argv[1] is a JSON job: {"model": "random" | PATH, "sizes": [1, 2, ...], "prompts": [[ids]],
"max_tokens": n, "config": {overrides of RANDOM_LLAMA}, "llm": {LLM keyword arguments, e.g.
quantization / kv_cache_dtype}}.
Prints one line "RESULT {json}" with, per size, the greedy tokens, their log-probs, and the shard
shapes of the engine's weights and KV cache read from `addressable_shards`.
"""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

os.environ.setdefault("JPAGED_COMPILATION_CACHE_DIR", "off")
os.environ.setdefault("JPAGED_MODEL_CACHE_DIR", "off")

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.models.random_weights import random_checkpoint  # noqa: E402
from jpaged.models.weights import quantize_params  # noqa: E402

# 32 query heads, 8 KV heads (Llama-3-70B's ratio) at toy width.
RANDOM_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=128,
                    intermediate_size=256, num_hidden_layers=2, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=8, rms_norm_eps=1e-5,
                    max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=1)


def shard_shapes(array) -> list[list[int]]:
    array = getattr(array, "values", array)           # a QuantizedWeight: its values
    if isinstance(array, tuple):          # split per layer (one device): [L] + each layer's shard
        return [[len(array)] + shape for shape in shard_shapes(array[0])]
    return [list(s.data.shape) for s in array.addressable_shards]


def full_shape(array) -> list[int]:
    array = getattr(array, "values", array)
    return [len(array)] + full_shape(array[0]) if isinstance(array, tuple) else list(array.shape)


def run(job: dict, size: int) -> dict:
    kwargs = dict(tensor_parallel_size=size, num_pages=64, page_size=4, max_model_len=64,
                  max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    if job["model"] == "random":
        checkpoint = random_checkpoint({**RANDOM_LLAMA, **job.get("config", {})}, dtype="float32")
        # peaky logits, so greedy never sits on a near-tie that summation order could flip
        checkpoint.params = jax.tree.map(lambda x: x * 15.0, checkpoint.params)
        llm = LLM.from_checkpoint(checkpoint, **kwargs, **job.get("llm", {}))
    else:
        llm = LLM(job["model"], dtype="float32", **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True,
                            logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    # n=2 forks share the prompt's pages: copy-on-write runs the page mover on the sharded cache
    forks = llm.generate([{"prompt_token_ids": job["prompts"][0]}],
                         SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=4, ignore_eos=True),
                         use_tqdm=False)[0]
    # new weights (the same values, the checkpoint's layout) swap in without compiling anything
    compilations = llm.stats().num_compilations
    if job["model"] == "random":
        quantization = job.get("llm", {}).get("quantization")
        llm.update_params(checkpoint.params if quantization is None else
                          quantize_params(checkpoint.params, quantization))
    again = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    runner = llm.llm_engine.runner
    # NOTE: on one CPU device the layer matmul weights are per layer (tuples; weights.py)
    layers = runner.params["layers"]
    leaves = {name: layers[group][name] for group, name in (
        ("attn", "wqkv"), ("attn", "wo"), ("mlp", "w_gate_up"), ("mlp", "w_down"))}
    leaves.update(embed=runner.params["embed"]["embedding"], kv_cache_k=runner.kv_cache.k)
    return {"tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                         for o in outs],
            "shards": {name: shard_shapes(a) for name, a in leaves.items()},
            "shapes": {name: full_shape(a) for name, a in leaves.items()},
            "forks": [c.token_ids for c in forks.outputs],
            "after_update": [o.outputs[0].token_ids for o in again],
            "compiled_by_update": llm.stats().num_compilations - compilations,
            "kv_cache_spec": [list(runner.kv_cache.k.sharding.spec)
                              if hasattr(runner.kv_cache.k.sharding, "spec") else None],
            "collectives": collectives(runner),
            "param_bytes_device0": on_device0(jax.tree.leaves(runner.params)),
            "kv_page_bytes_device0": on_device0([runner.kv_cache.k, runner.kv_cache.v])
            // runner.kv_cache.num_pages,
            "compilations": llm.stats().num_compilations}


def on_device0(arrays) -> int:
    """Bytes of these arrays' shards that device 0 holds."""
    device = jax.devices()[0]
    return sum(shard.data.nbytes for a in arrays for shard in a.addressable_shards
               if shard.device == device)


def collectives(runner) -> dict[str, list[str]]:
    """The collectives XLA inserted into each compiled step bucket, by kind (operand shapes)."""
    out = {}
    for key, compiled in runner.compiled_steps().items():
        ops = re.findall(r"= (\S+) (all-reduce|all-gather|all-to-all|reduce-scatter)\(",
                         compiled.as_text())
        out["decode" if key.decode_only else "mixed"] = sorted(f"{kind} {shape}" for shape, kind in ops)
    return out


def main() -> None:
    job = json.loads(sys.argv[1])
    assert jax.device_count() == 8, jax.devices()
    result = {}
    for size in job["sizes"]:
        try:
            result[size] = run(job, size)
        except ValueError as exc:
            result[size] = {"error": str(exc)}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()


PROMPTS_FOR_MULTIHOST = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
