"""Memory sharing on the real SmolLM2-135M-Instruct (float32): parallel sampling through forks,
beam search against HF, prefix caching on and off, a 3x oversubscribed pool with recompute and
with swap, and no recompilation through a long run with penalties and min_tokens."""

from __future__ import annotations

import pytest

from jpaged import LLM, BeamSearchParams, SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
             "Explain recursion to a five-year-old.", "List three uses of baking soda.",
             "Why do cats purr?", "What is 17 times 23? Think step by step."]
ENGINE = dict(dtype="float32", page_size=16, max_model_len=256, max_num_seqs=8,
              max_num_batched_tokens=128)


def assert_all_pages_free(llm):
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)
    assert bm.all_free() and llm.stats()["kv_pages_used"] == 0


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), num_pages=128, **ENGINE)


@pytest.fixture(scope="module")
def no_cache(smollm2_path):
    """The same engine with prefix caching off: the peer of the sharing tests."""
    return LLM(str(smollm2_path), num_pages=128, enable_prefix_caching=False, **ENGINE)


@pytest.fixture(scope="module")
def prompts(llm):
    tokenizer = llm.get_tokenizer()
    return [{"prompt_token_ids": tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
        return_dict=False)} for q in QUESTIONS]


@pytest.fixture(scope="module")
def greedy(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_parallel_sampling_forks_is_reproducible_and_equals_prefix_caching_off(llm, prompts,
                                                                               no_cache):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=11, max_tokens=24,
                            ignore_eos=True)
    first = llm.generate(prompts[:2], params, use_tqdm=False)
    again = llm.generate(prompts[:2], params, use_tqdm=False)
    for a, b in zip(first, again):
        samples = [o.token_ids for o in a.outputs]
        assert samples == [o.token_ids for o in b.outputs]
        assert len({tuple(s) for s in samples}) == 4             # the samples differ
    off = no_cache.generate(prompts[:2], params, use_tqdm=False)
    assert [[o.token_ids for o in r.outputs] for r in off] == \
        [[o.token_ids for o in r.outputs] for r in first]
    assert_all_pages_free(llm)
    assert_all_pages_free(no_cache)


def test_prefix_caching_on_and_off_give_identical_greedy_outputs(llm, prompts, greedy, no_cache):
    system = "You are a concise assistant. Answer in at most two sentences. " * 3
    tokenizer = llm.get_tokenizer()
    shared = [{"prompt_token_ids": tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": q}],
        add_generation_prompt=True, tokenize=True, return_dict=False)} for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    hits_before = llm.stats()["prefix_cache_hits"]
    on = llm.generate(shared, params, use_tqdm=False)
    assert llm.stats()["prefix_cache_hits"] > hits_before         # the system prompt was shared
    off = no_cache.generate(shared, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    assert_all_pages_free(llm)
    assert_all_pages_free(no_cache)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_3x_oversubscribed_pool_gives_the_unconstrained_greedy_output(smollm2_path, prompts,
                                                                        greedy, mode):
    # 6 sequences of ~35 prompt + 48 output tokens want ~36 pages of 16; the pool has 12.
    small = LLM(str(smollm2_path), num_pages=13, preemption_mode=mode, swap_space=0.05,
                **{**ENGINE, "max_model_len": 192})
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outputs = small.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == greedy
    stats = small.stats()
    assert stats[f"preemptions_{mode}"] > 0
    if mode == "swap":
        assert stats["swapped_out_pages"] == stats["swapped_in_pages"] > 0
        assert stats["host_pages_used"] == 0
    assert_all_pages_free(small)


@pytest.mark.parametrize("width", [2, 4])
def test_beam_search_equals_hf(llm, prompts, smollm2_hf, width):
    import torch

    hf_model, _ = smollm2_hf
    params = BeamSearchParams(beam_width=width, max_tokens=16)
    outputs = llm.beam_search(prompts[:2], params)
    for prompt, out in zip(prompts[:2], outputs):
        ids = torch.tensor([prompt["prompt_token_ids"]])
        with torch.no_grad():
            hf = hf_model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width,
                                   do_sample=False, early_stopping=True, max_new_tokens=16,
                                   length_penalty=1.0)
        best = hf[0, ids.shape[1]:].tolist()
        best = best[:best.index(2) + 1] if 2 in best else best       # 2 is <|im_end|> (EOS)
        assert out.sequences[0].tokens[ids.shape[1]:] == best
        assert [s.score for s in out.sequences] == sorted((s.score for s in out.sequences),
                                                          reverse=True)
    assert_all_pages_free(llm)


def test_the_sampler_does_not_recompile_as_outputs_grow(llm, prompts, backend_compiles):
    """Penalties and min_tokens bans have fixed shapes: a run whose outputs grow far past the
    warm-up's compiles no sampler at all (longer contexts may still need new step buckets)."""
    def run(max_tokens):
        params = [SamplingParams(temperature=t, seed=i, max_tokens=max_tokens, min_tokens=m,
                                 repetition_penalty=r, presence_penalty=0.3, frequency_penalty=f,
                                 ignore_eos=True)
                  for i, (t, m, r, f) in enumerate([(0, 8, 1.2, 0.0), (0.8, 0, 1.0, 0.5),
                                                    (0, 16, 1.1, 0.2), (1.0, 4, 1.3, 0.0)])]
        return llm.generate(prompts[:4], params, use_tqdm=False)

    run(20)                                    # warm: output lengths up to 20
    before = len(backend_compiles.names)
    long = run(100)                            # output lengths up to 100
    assert [len(o.outputs[0].token_ids) for o in long] == [100] * 4
    new = backend_compiles.names[before:]
    assert not [name for name in new if "sample" in name], new
    assert_all_pages_free(llm)
