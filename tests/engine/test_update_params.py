"""`update_params`: new weights without a restart. The engine then gives a fresh engine's tokens on
those weights with no compilation, running requests resume recomputed under the new weights, and
a tree that does not fit raises naming the leaf. Every test ends with all pages free."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.checkpoint.loader import load_checkpoint
from jpaged.engine.engine import EngineConfig, LLMEngine

CONFIG = dict(page_size=8, num_pages=24, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir):
    return load_checkpoint(tiny_llama_dir, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def fresh(checkpoint):
    """A fresh engine built on `new_params`, the reference for the updated one."""
    return LLM.from_checkpoint(dataclasses.replace(checkpoint, params=new_params(checkpoint.params)),
                               **CONFIG)


def new_params(params, seed: int = 1):
    """Other random weights of the same layout (norm scales near 1, the rest N(0, 0.3))."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm = "norm" in jax.tree_util.keystr(path)
        return jnp.asarray(1.0 + 0.2 * noise if is_norm else 0.3 * noise)
    return jax.tree_util.tree_map_with_path(draw, params)


def prompts(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(2, 512, int(rng.integers(3, 16))).tolist()}
            for _ in range(n)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_pages_free(engine: LLMEngine):
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    assert bm.refcounts == [0] * bm.num_pages
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_new_weights_give_a_fresh_engines_tokens_without_compiling(checkpoint, fresh,
                                                                   backend_compiles):
    llm = LLM.from_checkpoint(checkpoint, **CONFIG)
    requests = prompts(4, seed=2)
    old = token_ids(llm.generate(requests, GREEDY, use_tqdm=False))
    params = new_params(checkpoint.params)
    compiles = backend_compiles.count
    llm.update_params(params)
    # The same prompts again: the prefix cache was reset, so they are recomputed (the same shape
    # buckets as the first run, all compiled already) under the new weights.
    updated = token_ids(llm.generate(requests, GREEDY, use_tqdm=False))
    assert backend_compiles.count == compiles
    assert llm.stats().num_cached_tokens == 0
    assert updated == token_ids(fresh.generate(requests, GREEDY, use_tqdm=False))
    assert updated != old
    # NumPy leaves are placed like the engine's; back to the old weights, the old tokens.
    llm.update_params(jax.tree.map(np.asarray, checkpoint.params))
    assert token_ids(llm.generate(requests, GREEDY, use_tqdm=False)) == old
    assert_all_pages_free(llm.llm_engine)
    assert_all_pages_free(fresh.llm_engine)


def test_running_requests_resume_recomputed_under_the_new_weights(checkpoint, fresh):
    engine = LLMEngine(checkpoint, EngineConfig(**{**CONFIG, "max_num_seqs": 2}))
    requests = prompts(3, seed=3)
    for i, prompt in enumerate(requests):
        engine.add_request(f"r{i}", prompt, GREEDY)
    for _ in range(3):                                  # prefill + 2 decodes for r0 and r1
        assert not any(o.finished for o in engine.step())
    partial = {s.request_id: list(s.output_token_ids) for s in engine.scheduler.running}
    assert sorted(partial) == ["r0", "r1"] and all(len(t) == 3 for t in partial.values())
    preemptions = engine.stats().num_preemptions
    params = new_params(checkpoint.params)
    engine.update_params(params)
    assert engine.stats().num_preemptions == preemptions + 2 and not engine.scheduler.running
    assert [s.request_id for s in engine.scheduler.waiting] == ["r0", "r1", "r2"]
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    # The fresh engine on the new weights, continuing each request from where it stood.
    for i, prompt in enumerate(requests):
        done = partial.get(f"r{i}", [])
        rest = fresh.generate({"prompt_token_ids": prompt["prompt_token_ids"] + done},
                              dataclasses.replace(GREEDY, max_tokens=8 - len(done)), use_tqdm=False)
        assert outputs[f"r{i}"] == done + rest[0].outputs[0].token_ids, f"r{i}"
    assert_all_pages_free(engine)
    assert_all_pages_free(fresh.llm_engine)


def test_a_tree_that_does_not_fit_raises_naming_the_leaf(checkpoint):
    engine = LLMEngine(checkpoint, EngineConfig(**CONFIG))
    before = engine.runner.params
    params = new_params(checkpoint.params)
    missing = {k: v for k, v in params.items() if k != "norm"}
    with pytest.raises(ValueError, match=r"params tree differs from the engine's: missing "
                                         r"\[\"\['norm'\]\['scale'\]\"\], unexpected \[\]"):
        engine.update_params(missing)
    narrow = jax.tree.map(lambda x: x, params)
    narrow["layers"]["attn"]["wqkv"] = params["layers"]["attn"]["wqkv"][:, :, :, :2]
    with pytest.raises(ValueError, match=re_escape(
            "params['layers']['attn']['wqkv'] is float32[2, 64, 2, 2, 16] but the engine's is "
            "float32[2, 64, 2, 4, 16]; new weights need the same shapes and dtypes")):
        engine.update_params(narrow)
    half = {**params, "embed": {"embedding": params["embed"]["embedding"].astype(jnp.bfloat16)}}
    with pytest.raises(ValueError, match=re_escape(
            "params['embed']['embedding'] is bfloat16[512, 64] but the engine's is float32[512, 64]"
            "; new weights need the same shapes and dtypes (cast with .astype('float32')")):
        engine.update_params(half)
    assert engine.runner.params is before
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_pages_free(engine)


def re_escape(text: str) -> str:
    import re
    return re.escape(text)
