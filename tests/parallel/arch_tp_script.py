"""Run in a subprocess with 8 forced CPU devices (see test_architectures_parallel.py).

argv[1] is a JSON job: {"runs": [[label, HF dir, tensor_parallel_size, enable_expert_parallel]],
"prompts": [[ids]], "max_tokens": n}. Prints one line "RESULT {json}": per label, the greedy
tokens, the shard shapes of the expert (or MLP) weights and of the KV cache, and the collectives
XLA put in the decode step.
"""

import json
import re
import sys

import jax

from jpaged import LLM, SamplingParams

# one page per sequence, one token bucket: three compiled steps per engine (prefill, decode, sampler)
ENGINE = dict(dtype="float32", page_size=32, max_model_len=32, max_num_seqs=2,
              max_num_batched_tokens=16, enable_prefix_caching=False, num_pages=4)


def shards(array) -> list[list[int]]:
    return [list(s.data.shape) for s in array.addressable_shards]


def run(path: str, size: int, expert_parallel: bool, job: dict) -> dict:
    llm = LLM(path, tensor_parallel_size=size, enable_expert_parallel=expert_parallel, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params,
                        use_tqdm=False)
    runner = llm.llm_engine.runner
    layers = runner.params["layers"]
    weight = (layers["moe"] if "moe" in layers else layers["mlp"])["w_gate_up"]
    decode = [c for k, c in runner.compiled_steps().items() if k.decode_only][0].as_text()
    bm = llm.llm_engine.block_manager
    return {"tokens": [o.outputs[0].token_ids for o in outs],
            "w_gate_up": shards(weight) if size > 1 else None,
            "kv_cache": shards(runner.kv_cache.k) if size > 1 else None,
            "collectives": sorted(re.findall(r"= \S+ (all-reduce|all-gather|all-to-all)\(",
                                             decode)),
            "pages_free": bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)}


def main() -> None:
    job = json.loads(sys.argv[1])
    assert jax.device_count() == 8, jax.devices()
    print("RESULT " + json.dumps({label: run(path, size, ep, job)
                                  for label, path, size, ep in job["runs"]}), flush=True)


if __name__ == "__main__":
    main()
