"""Speculative decoding (#20): n-gram prompt lookup and layer-skip self-speculation inside the
engine's continuous batching; greedy tokens identical to the plain engine's, rejection sampling's
output distribution equal to plain sampling's (chi-square), pages rolled back and all free."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.core.block_manager import BlockManager
from jpaged.core.sequence import Sequence
from jpaged.core.speculative import NgramProposer, SpeculativeConfig
from jpaged.engine.sampler import SamplerFlags, build_sampling_tensors
from jpaged.engine.speculative import position_rows, verify
from jpaged.core.step import ScheduledSeq

SMOL = dict(page_size=16, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=256)
GROUNDED = [
    "Copy this sentence exactly, twice: The old lighthouse keeper climbed the spiral stairs "
    "every evening to light the lamp.",
    "List the colours in: red apples, green pears, yellow bananas, red cherries, green limes.",
    "Hello",
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the",
]


def ngram(k: int) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
            "prompt_lookup_min": 1}


def assert_all_pages_free(llm: LLM):
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    assert bm.refcounts == [0] * bm.num_pages
    assert not llm.llm_engine.scheduler.running and not llm.llm_engine.scheduler.waiting


def token_ids(outputs) -> list[list[int]]:
    return [list(c.token_ids) for o in outputs for c in o.outputs]


# ---- host side -------------------------------------------------------------------------------
@pytest.mark.parametrize("config, key", [
    ({"method": "medusa", "num_speculative_tokens": 3}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 6}, "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 3, "num_layers": 4}, "num_layers"),
    ({"method": "layer_skip", "num_speculative_tokens": 3}, "num_layers"),
    ({"method": "draft_model", "num_speculative_tokens": 3}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 3, "model": "x", "num_layers": 2},
     "num_layers"),
])
def test_invalid_configs_name_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        SpeculativeConfig.from_dict(config)


def test_layer_skip_needs_fewer_layers_than_the_model():
    with pytest.raises(ValueError, match=r"num_layers.*\[1, 29\].*30"):
        SpeculativeConfig.from_dict({"method": "layer_skip", "num_speculative_tokens": 2,
                                     "num_layers": 30}, num_model_layers=30)


def test_ngram_proposer_takes_the_longest_latest_match():
    p = NgramProposer(SpeculativeConfig.from_dict(ngram(3)))
    assert p.propose([5, 6, 7, 8, 9, 5, 6, 7], 3) == (8, 9, 5)        # 3-gram 5 6 7
    assert p.propose([1, 2, 3, 1, 2, 4, 1, 2], 2) == (4, 1)           # latest "1 2"
    assert p.propose([1, 2, 3, 4, 3], 3) == (4, 3)                    # 1-gram, runs to the end
    assert p.propose([1, 2, 3, 4], 3) == ()                           # nothing repeats
    p2 = NgramProposer(SpeculativeConfig.from_dict(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}))
    assert p2.propose([1, 2, 3, 4, 3], 3) == ()                       # 1-grams are too short


def test_trim_releases_the_rejected_pages():
    bm = BlockManager(num_pages=8, page_size=4)
    seq = Sequence("r", 0, list(range(6)), SamplingParams(), 0, 16)
    assert bm.allocate(seq, 13)                                       # 6 tokens + proposals
    assert seq.block_table == [1, 2, 3, 4]
    bm.trim(seq, 8)                                                   # two pages' worth kept
    assert seq.block_table == [1, 2]
    assert bm.refcounts[:5] == [0, 1, 1, 0, 0]
    assert list(bm.free_pages) == [5, 6, 7, 4, 3]                     # last page first
    bm.free(seq)
    assert bm.all_free()


# ---- the verifier: exact distribution ---------------------------------------------------------
def _row(params, seed, num_output, spec=()):
    prompt = [0, 1, 2]
    ids = prompt + [3] * num_output
    return ScheduledSeq(seq_id=seed, request_id=str(seed), num_computed_tokens=len(ids) - 1,
                        num_new_tokens=1 + len(spec), token_ids=ids, num_prompt_tokens=3,
                        block_table=(1,), params=params, seed=seed, num_spec_tokens=len(spec),
                        spec_token_ids=tuple(spec))


def test_rejection_sampling_matches_the_target_distribution():
    """Position 0 of 4,000 rows, each proposing token 2 (p = 0.3) or token 5 (p = 0.02): the
    kept token's frequencies equal p (chi-square, fixed seeds); so do 4,000 plain samples."""
    from scipy.stats import chisquare
    vocab, width, rows = 8, 3, 4000
    p = np.array([0.05, 0.1, 0.3, 0.15, 0.2, 0.02, 0.08, 0.1])
    logits = np.tile(np.log(p), (rows * width, 1)).astype(np.float32)
    params = SamplingParams(temperature=1.0, max_tokens=64)
    fn = jax.jit(verify, static_argnames=("flags", "width"))
    for proposal in (2, 5):
        batch = [_row(params, seed, 4, spec=(proposal, 1)) for seed in range(rows)]
        t, flags = build_sampling_tensors(position_rows(batch, width), rows * width, vocab, 64, ())
        draft = np.array([r.spec_token_ids for r in batch], np.int32)
        out, num, *_ = fn(logits, t, draft, np.full(rows, 2, np.int32), flags=flags, width=width)
        first = np.asarray(out)[:, 0]
        counts = np.bincount(first, minlength=vocab)
        assert chisquare(counts, p * rows).pvalue > 1e-3, (proposal, counts)
        accepted = np.asarray(num) > 1
        assert abs(accepted.mean() - p[proposal]) < 0.03            # accepted with prob p(x)
        # the position after an accepted proposal is again distributed as p
        second = np.asarray(out)[accepted, 1]
        if accepted.sum() > 500:
            counts2 = np.bincount(second, minlength=vocab)
            assert chisquare(counts2, p * accepted.sum()).pvalue > 1e-3


def test_greedy_verification_accepts_while_equal_to_the_argmax():
    vocab, width = 6, 4
    logits = np.full((2 * width, vocab), -5.0, np.float32)
    for i, best in enumerate([1, 2, 3, 4, 0, 0, 0, 0]):
        logits[i, best] = 5.0
    params = SamplingParams(temperature=0.0, max_tokens=64)
    batch = [_row(params, 0, 1, spec=(1, 2, 5)), _row(params, 1, 1)]
    t, flags = build_sampling_tensors(position_rows(batch, width), 2 * width, vocab, 64, ())
    draft = np.array([[1, 2, 5], [0, 0, 0]], np.int32)
    out, num, *_ = verify(logits, t, draft, np.array([3, 0], np.int32), flags=flags, width=width)
    assert np.asarray(num).tolist() == [3, 1]
    assert np.asarray(out)[0, :3].tolist() == [1, 2, 3] and int(out[1, 0]) == 0


# ---- SmolLM2: greedy identical, in mixed batches, under preemption ---------------------------
@pytest.fixture(scope="module")
def smol_plain(smollm2_path):
    llm = LLM(str(smollm2_path), **SMOL, num_pages=160)
    return llm, llm.generate(GROUNDED, SamplingParams(temperature=0, max_tokens=32),
                             use_tqdm=False)


def layer_skip(k: int) -> dict:
    return {"method": "layer_skip", "num_speculative_tokens": k, "num_layers": 24}


@pytest.mark.parametrize("spec, prompts", [
    (ngram(1), [3, 0, 2]), (ngram(3), [0, 1, 2, 3]), (ngram(5), [3, 2]),
    (layer_skip(1), [1, 2]), (layer_skip(3), [0, 1, 2, 3]), (layer_skip(5), [3, 2]),
    ("draft_model", [0, 1, 2])],
    ids=["ngram1", "ngram3", "ngram5", "layer_skip1", "layer_skip3", "layer_skip5",
         "draft_model3"])
def test_smollm2_greedy_identical(smollm2_path, smol_plain, spec, prompts):
    """Every method and k: the same tokens as without speculation, with prompts whose proposals
    are accepted, rejected or missing in the same steps as plain decodes (the last request's
    last tokens leave no room for proposals) and prefill chunks; all pages free."""
    if spec == "draft_model":    # SmolLM2 drafts for itself: every proposal must be accepted,
        spec = {"method": "draft_model", "model": str(smollm2_path),   # so its mirrored KV is
                "num_speculative_tokens": 3}                            # exactly the target's
    llm = LLM(str(smollm2_path), **SMOL, num_pages=160, speculative_config=spec)
    steps = _record_steps(llm)
    params = [SamplingParams(temperature=0, max_tokens=20)] * (len(prompts) - 1) + \
        [SamplingParams(temperature=0, max_tokens=2)]
    out = llm.generate([GROUNDED[i] for i in prompts], params, use_tqdm=False)
    want = [token_ids(smol_plain[1])[i] for i in prompts]
    assert token_ids(out) == [w[:20] for w in want[:-1]] + [want[-1][:2]]
    stats = llm.stats()
    assert stats.spec_decode_num_draft_tokens > 0
    assert 0 < stats.spec_decode_num_accepted_tokens <= stats.spec_decode_num_draft_tokens
    assert any(mixed for mixed in steps), "no step mixed proposals with plain rows"
    if spec["method"] == "draft_model":
        assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens
    assert_all_pages_free(llm)


def _record_steps(llm: LLM) -> list[bool]:
    """Per step: did it hold rows with proposals beside rows without any."""
    runner, seen = llm.llm_engine.runner, []
    execute = runner.execute

    def recording(out):
        spec = [r.num_spec_tokens > 0 for r in out.scheduled]
        seen.append(any(spec) and not all(spec))
        return execute(out)
    runner.execute = recording
    return seen


def test_smollm2_preemption_stop_strings_logprobs(smollm2_path, smol_plain):
    """Few pages (sequences preempted and recomputed mid-speculation), stop strings, min_tokens
    and logprobs of the accepted tokens: the same as the plain engine's."""
    plain, texts = smol_plain[0], [o.outputs[0].text for o in smol_plain[1]]
    stop = " " + texts[1].split()[len(texts[1].split()) // 2]       # mid-answer
    llm = LLM(str(smollm2_path), **{**SMOL, "max_num_seqs": 4, "max_model_len": 160}, num_pages=11,
              speculative_config=ngram(3))
    params = [SamplingParams(temperature=0, max_tokens=48, logprobs=2),
              SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
              SamplingParams(temperature=0, max_tokens=24, min_tokens=20),
              SamplingParams(temperature=0, max_tokens=48)]
    out = llm.generate(GROUNDED, params, use_tqdm=False)
    ref = plain.generate(GROUNDED, params, use_tqdm=False)
    assert token_ids(out) == token_ids(ref)
    assert [o.outputs[0].text for o in out] == [o.outputs[0].text for o in ref]
    assert out[1].outputs[0].finish_reason == ref[1].outputs[0].finish_reason == "stop"
    for got, want in zip(out[0].outputs[0].logprobs, ref[0].outputs[0].logprobs):
        assert got.keys() == want.keys()
        for tok in got:
            assert got[tok].logprob == pytest.approx(want[tok].logprob, abs=2e-4)
    stats = llm.stats()
    assert stats.num_preemptions > 0 and stats.spec_decode_num_accepted_tokens > 0
    assert_all_pages_free(llm)


# ---- sampling through the engine: seeds and the distribution ---------------------------------
TINY_VOCAB = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=16,
                  hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=15,
                  bos_token_id=0, rope_theta=10000.0)


@pytest.fixture(scope="module")
def tiny_vocab_checkpoint():
    from jpaged.models.random_weights import random_checkpoint
    checkpoint = random_checkpoint(TINY_VOCAB, dtype="float32", seed=1)
    return dataclasses.replace(checkpoint, params=jax.tree.map(lambda x: x * 40,
                                                               checkpoint.params))


def test_engine_sampling_distribution_and_seeds(tiny_vocab_checkpoint):
    """1,200 seeded samples of 3 tokens after a repetitive prompt (so n-grams propose): each
    output position's token frequencies under speculation match plain sampling's (chi-square
    test of homogeneity); the same seeds give the same tokens again; n > 1 works."""
    from scipy.stats import chi2_contingency
    engine = dict(page_size=8, num_pages=600, max_model_len=64, max_num_seqs=128,
                  max_num_batched_tokens=1024)
    spec = LLM.from_checkpoint(tiny_vocab_checkpoint, **engine, speculative_config=ngram(3))
    plain = LLM.from_checkpoint(tiny_vocab_checkpoint, **engine)
    # the model's own greedy continuation, so n-gram proposals are often the likely tokens
    greedy = plain.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    prompt = {"prompt_token_ids": [3, 4, 5, *greedy]}
    params = [SamplingParams(temperature=1.0, max_tokens=3, min_tokens=3, ignore_eos=True,
                             seed=s, n=2) for s in range(600)]
    got = np.array(token_ids(spec.generate([prompt] * 600, params, use_tqdm=False)))
    want = np.array(token_ids(plain.generate([prompt] * 600, params, use_tqdm=False)))
    assert spec.stats().spec_decode_num_accepted_tokens > 200, spec.stats()
    for j in range(3):
        table = np.stack([np.bincount(got[:, j], minlength=16), np.bincount(want[:, j],
                                                                           minlength=16)])
        table = table[:, table.sum(axis=0) > 0]
        assert chi2_contingency(table).pvalue > 1e-3, (j, table)
    again = np.array(token_ids(spec.generate([prompt] * 50, params[:50], use_tqdm=False)))
    assert (again == got[:100]).all()
    assert_all_pages_free(spec)
    assert_all_pages_free(plain)


# ---- the server's flag and metrics -----------------------------------------------------------
def test_serve_flag_and_metrics():
    import argparse
    from jpaged.core.stats import Stats
    from jpaged.entrypoints.openai.metrics import ServerMetrics
    from jpaged.entrypoints.openai.run import _speculative_config
    assert _speculative_config('{"method": "ngram", "num_speculative_tokens": 2}')["method"] \
        == "ngram"
    with pytest.raises(argparse.ArgumentTypeError, match="num_speculative_tokens"):
        _speculative_config('{"method": "ngram", "num_speculative_tokens": 99}')
    with pytest.raises(argparse.ArgumentTypeError, match="not JSON"):
        _speculative_config("{method: ngram}")
    metrics = ServerMetrics("m")
    metrics.on_stats(Stats(spec_decode_num_drafts=4, spec_decode_num_draft_tokens=12,
                           spec_decode_num_accepted_tokens=7,
                           spec_decode_num_accepted_tokens_per_pos=(4, 2, 1)))
    metrics.on_stats(Stats(spec_decode_num_drafts=5, spec_decode_num_draft_tokens=15,
                           spec_decode_num_accepted_tokens=8,
                           spec_decode_num_accepted_tokens_per_pos=(5, 2, 1)))
    text = metrics.render().decode()
    assert 'jpaged:spec_decode_num_drafts_total{model_name="m"} 5.0' in text
    assert 'jpaged:spec_decode_num_draft_tokens_total{model_name="m"} 15.0' in text
    assert 'jpaged:spec_decode_num_accepted_tokens_total{model_name="m"} 8.0' in text
    assert 'jpaged:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"} 5.0' \
        in text


# ---- swaps, copy-on-write and the prefix cache with a mirrored draft pool (tiny model) --------
def test_draft_model_pool_follows_swaps_forks_and_prefix_cache(tiny_llama_dir):
    """The tiny Llama drafting for itself (20 pages of 4): every proposal is accepted only if the draft's own
    pages follow the target's through swap-out/in, n > 1 forks (copy-on-write) and prefix-cache
    hits; the tokens equal the plain engine's; every page free."""
    engine = dict(page_size=4, max_model_len=72, max_num_seqs=4, max_num_batched_tokens=128)
    spec = {"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 3}
    llm = LLM(str(tiny_llama_dir), num_pages=20, preemption_mode="swap", swap_space=0.01,
              speculative_config=spec, **engine)
    plain = LLM(str(tiny_llama_dir), num_pages=200, **engine)
    rng = np.random.default_rng(0)
    shared = rng.integers(2, 512, size=12).tolist()
    prompts = [{"prompt_token_ids": shared + rng.integers(2, 512, size=int(n)).tolist()}
               for n in (5, 9, 14, 3)]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=n)
              for n in (1, 2, 1, 1)]
    first = token_ids(llm.generate(prompts[:1], params[:1], use_tqdm=False))  # caches the prefix
    got = token_ids(llm.generate(prompts, params, use_tqdm=False))
    assert got == token_ids(plain.generate(prompts, params, use_tqdm=False))
    assert first == got[:1]
    stats = llm.stats()
    assert stats.preemptions_swap > 0 and stats.swapped_out_pages == stats.swapped_in_pages > 0
    assert stats.prefix_cache_hits > 0
    assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens > 0
    assert_all_pages_free(llm)
    assert_all_pages_free(plain)


def test_warm_up_compiles_the_speculative_buckets(tiny_llama_dir):
    """The server's warm-up plan (auto) holds a speculative decode bucket for every decode B x P
    it compiles, and warm-up compiles them (so a server's first speculative steps find a compiled
    bucket or stand-in of their width); generation runs on after it."""
    llm = LLM(str(tiny_llama_dir), page_size=4, num_pages=64, max_model_len=64, max_num_seqs=2,
              max_num_batched_tokens=64, speculative_config=ngram(3))
    engine = llm.llm_engine
    plan = engine.runner.buckets.warmup_plan("auto")
    decode = {(e.num_seqs, e.num_pages) for e in plan if e.kind == "decode"}
    assert {(e.num_seqs, e.num_pages) for e in plan if e.kind == "speculative"} == decode
    engine.warm_up(plan)
    compiled = {(k.num_seqs, k.num_pages) for k in engine.runner.compiled_steps()
                if k.spec_width == 4}
    assert len(compiled) == len(decode)          # one speculative bucket per decode B x P
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]}
    out = llm.generate([prompt] * 2, SamplingParams(temperature=0, max_tokens=12,
                                                    ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [12, 12]
    assert llm.stats().spec_decode_num_drafts > 0
    assert_all_pages_free(llm)
