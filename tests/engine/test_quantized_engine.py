"""Quantized weights and a quantized KV cache through the engine, on the tiny random Llama (the
real model's quality is measured by benchmarks/quantization.py):

  - each weight quantization gives the greedy tokens and prompt log-probabilities of a float
    engine over the same weights dequantized (jpaged.models.weights.dequantize_params);
  - int8 / W8A8 weights and an int8 / fp8 KV cache stay within their rounding of float32's
    log-probabilities; a quantized cache holds ~4x the tokens in the
    same memory (llm.stats()), and parallel sampling (copy-on-write), prefix caching and swap
    work on its pages as on float ones;
  - every engine ends with every page free.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.checkpoint.loader import load_checkpoint
from jpaged.models.weights import dequantize_params

ENGINE = dict(page_size=8, max_model_len=128, max_num_seqs=8,
              max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def assert_all_pages_free(llm):
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)
    assert llm.stats().kv_pages_used == 0


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(17)
    return [{"prompt_token_ids": rng.integers(2, 512, size=n).tolist()}
            for n in (3, 9, 17, 26, 40, 55)]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def float_llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_pages=64, **ENGINE)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quantized_weights_equal_the_float_model_of_their_dequantized_weights(
        tiny_llama_dir, prompts, kind):
    """The quantized matmuls (fused matrix-vector for decodes, dequantized tiles for prefills),
    embedding and LM head against plain float32 over the same values: same greedy tokens, prompt
    log-probabilities within 1e-4."""
    checkpoint = load_checkpoint(tiny_llama_dir, quantization=kind, progress=False)
    quantized = LLM.from_checkpoint(checkpoint, num_pages=64, **ENGINE)
    dequantized = LLM.from_checkpoint(
        dataclasses.replace(checkpoint, quantization=None,
                            params=dequantize_params(checkpoint.params)), num_pages=64, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=1)
    got = quantized.generate(prompts, params, use_tqdm=False)
    want = dequantized.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(want)
    for g, w in zip(got, want):
        for g_pos, w_pos in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert g_pos.keys() == w_pos.keys()
            for token in g_pos:
                assert abs(g_pos[token].logprob - w_pos[token].logprob) < 1e-4
    assert_all_pages_free(quantized)
    assert_all_pages_free(dequantized)


SCORED = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0, logprobs=0)


def scored(llm, prompts):
    """Per prompt: the log-probabilities of its prompt tokens (prefill, read through the pages)
    and of its greedy tokens (decode steps)."""
    out = []
    for o in llm.generate(prompts, SCORED, use_tqdm=False):
        prompt = [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]
        sample = o.outputs[0]
        out.append((np.array(prompt), sample.token_ids,
                    np.array([d[t].logprob for d, t in zip(sample.logprobs, sample.token_ids)])))
    return out


def assert_close_to_float(got, want, tolerance):
    """Prompt log-probs within `tolerance`; generated ones too, up to where greedy tokens part
    (the tiny random model's logits are nearly flat: its argmax flips under any rounding)."""
    for (g_prompt, g_ids, g_lp), (w_prompt, w_ids, w_lp) in zip(got, want):
        assert np.abs(g_prompt - w_prompt).max() < tolerance
        same = next((i for i, (a, b) in enumerate(zip(g_ids, w_ids)) if a != b), len(g_ids))
        assert np.abs(g_lp[:same] - w_lp[:same]).max(initial=0) < tolerance


@pytest.fixture(scope="module")
def float_scores(float_llm, prompts):
    return scored(float_llm, prompts)


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.2), ("w8a8", 0.2)])
def test_int8_and_w8a8_weights_stay_close_to_float(tiny_llama_dir, prompts, float_scores, kind,
                                                   tolerance):
    """W8A8 quantizes activations too, so it has no float twin: its log-probabilities against
    float32's (measured here: max error 0.055 and 0.081 on this model's large random weights,
    N(0, 0.3); scales dropped or misplaced would be off by whole units)."""
    llm = LLM(str(tiny_llama_dir), quantization=kind, num_pages=64, **ENGINE)
    assert_close_to_float(scored(llm, prompts), float_scores, tolerance)
    assert_all_pages_free(llm)


@pytest.fixture(scope="module")
def int8_kv(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), kv_cache_dtype="int8", num_pages=64, **ENGINE)


@pytest.mark.parametrize("kv_cache_dtype, tolerance",
                         [("int8", 0.02), ("fp8", 0.15), ("fp8_e5m2", 0.3)])
def test_quantized_kv_cache_stays_close_to_float(tiny_llama_dir, prompts, float_scores, int8_kv,
                                                 kv_cache_dtype, tolerance):
    """Pages written quantized (a scale per token and KV head) and read back in prefills and
    decodes: log-probabilities within the format's rounding of float32's (measured: max error
    0.005 int8, 0.04 fp8 e4m3, 0.09 e5m2). Float8 pages are stored as their uint8 bit
    patterns (see jpaged/models/kv_cache.py)."""
    llm = int8_kv if kv_cache_dtype == "int8" else LLM(
        str(tiny_llama_dir), kv_cache_dtype=kv_cache_dtype, num_pages=64, **ENGINE)
    cache = llm.llm_engine.runner.kv_cache
    assert cache.quantized and cache.k.dtype.name == ("int8" if kv_cache_dtype == "int8" else "uint8")
    assert getattr(cache.fp8_dtype, "name", None) == {"int8": None, "fp8": "float8_e4m3fn",
                               "fp8_e5m2": "float8_e5m2"}[kv_cache_dtype]
    assert_close_to_float(scored(llm, prompts), float_scores, tolerance)
    assert_all_pages_free(llm)


def test_an_int8_cache_holds_about_4x_the_tokens_of_a_float32_one(smollm2_path):
    """Same KV memory budget, SmolLM2's shapes (H = 64): int8 pages plus a float16 scale per token
    and KV head hold 4 * 64 / 66 = 3.88x the tokens of float32 pages (1.94x of bfloat16 ones)."""
    tokens = {}
    for dtype, kv_cache_dtype in [("float32", "auto"), ("float32", "int8"),
                                  ("bfloat16", "auto"), ("bfloat16", "fp8")]:
        llm = LLM(str(smollm2_path), dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                  cpu_kv_cache_space_gib=0.25, max_model_len=2048, max_num_seqs=16)
        stats = llm.stats()
        tokens[dtype, kv_cache_dtype] = stats.kv_cache_tokens
        assert stats.kv_cache_bytes <= 0.25 * 2**30
        del llm
    assert tokens["float32", "int8"] / tokens["float32", "auto"] > 3.85
    assert tokens["bfloat16", "fp8"] / tokens["bfloat16", "auto"] > 1.9


def test_sharing_prefix_caching_and_swap_work_on_quantized_pages(tiny_llama_dir, prompts, int8_kv):
    """Forked samples (copy-on-write of a shared last page) are reproducible and equal those of an
    engine without prefix caching; a cached prefix gives the tokens of a computed one; a 3x
    oversubscribed pool swapping int8 pages and their scales out and in gives the unconstrained
    tokens."""
    no_cache = LLM(str(tiny_llama_dir), kv_cache_dtype="int8", num_pages=64,
                   enable_prefix_caching=False, **ENGINE)
    sampled = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    first = int8_kv.generate(prompts[:2], sampled, use_tqdm=False)
    again = int8_kv.generate(prompts[:2], sampled, use_tqdm=False)
    off = no_cache.generate(prompts[:2], sampled, use_tqdm=False)
    samples = [[o.token_ids for o in r.outputs] for r in first]
    assert samples == [[o.token_ids for o in r.outputs] for r in again]
    assert samples == [[o.token_ids for o in r.outputs] for r in off]
    assert all(len({tuple(s) for s in r}) > 1 for r in samples)

    shared = [{"prompt_token_ids": list(range(100, 140)) + p["prompt_token_ids"]} for p in prompts]
    hits = int8_kv.stats().prefix_cache_hits
    on = token_ids(int8_kv.generate(shared, GREEDY, use_tqdm=False))
    assert int8_kv.stats().prefix_cache_hits > hits
    assert on == token_ids(no_cache.generate(shared, GREEDY, use_tqdm=False))

    small = LLM(str(tiny_llama_dir), kv_cache_dtype="int8", num_pages=14, preemption_mode="swap",
                swap_space=0.01, **{**ENGINE, "max_model_len": 104})
    long = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    want = token_ids(int8_kv.generate(prompts, long, use_tqdm=False))
    assert token_ids(small.generate(prompts, long, use_tqdm=False)) == want
    stats = small.stats()
    assert stats.preemptions_swap > 0 and stats.swapped_out_pages == stats.swapped_in_pages > 0
    for llm in (int8_kv, no_cache, small):
        assert_all_pages_free(llm)
