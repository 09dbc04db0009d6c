"""Qwen3, Gemma 2, Gemma 3, Phi-3, Mixtral and Qwen3-MoE against HF transformers (torch, float32),
each a tiny random model from the shapes of a real published config (tiny_archs.py):

  - logits of a ragged prefill of 3 sequences and 4 decode steps (the engine's input builder, the
    stacked placement) within 1e-4 relative of HF's full forward;
  - 32 greedy tokens through `LLM.generate` (the per-layer placement, chunked prefill, preemption
    by recompute, every page free after), and through the jitted `jpaged.generate`, equal to HF's;
  - Gemma 3 with its real 1024-token window crossed by a 1040-token prompt, Phi-3 in both LongRoPE
    regimes, MoE batches whose sequences route to different experts.
One converted model per architecture for the module; one engine config for every architecture.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jpaged  # noqa: E402
from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.checkpoint.loader import load_checkpoint  # noqa: E402
from jpaged.generation import generate  # noqa: E402
from test_llama_parity import Batch, run_hf, run_jpaged  # noqa: E402
from tiny_archs import (ARCHS, FULL, PHI3_ORIGINAL_CONTEXT, SLIDING, VOCAB, build_hf,  # noqa: E402
                        build_hf_model)

REL_TOLERANCE = 1e-4
MAX_NEW = 32
# 2 running sequences of up to 30 + 32 tokens need 4 pages of 32; the pool has 3: preemption.
# Prompts longer than 16 tokens are prefilled in chunks. (Few shape buckets: few compilations.)
ENGINE = dict(page_size=32, num_pages=4, max_model_len=64, max_num_seqs=2,
              max_num_batched_tokens=16, enable_prefix_caching=False)
PROMPT_LENS = (21, 9, 30)
GEN = jax.jit(generate, static_argnames=("model", "max_new_tokens", "page_size"))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """HF's tiny models on one torch thread: with two, on this shared 2-core machine, torch's
    threads spin against XLA's (measured: 32 greedy steps of a tiny MoE 16 s -> 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Case:
    name: str
    hf: object                 # the HF model
    checkpoint: object         # jpaged's LoadedCheckpoint of the same directory
    path: object


def to_published_gemma3_config(path) -> None:
    """Rewrite transformers 5's Gemma 3 config.json (rope_parameters per layer type, layer_types)
    in the style of the published google/gemma-3 configs: rope_theta, rope_local_base_freq,
    rope_scaling, sliding_window_pattern."""
    config_path = path / "config.json"
    hf = json.loads(config_path.read_text())
    rope = hf.pop("rope_parameters")
    assert hf.pop("layer_types") == [SLIDING] * 5 + [FULL]
    full = dict(rope[FULL])
    hf.update(rope_theta=full.pop("rope_theta"), rope_local_base_freq=rope[SLIDING]["rope_theta"],
              rope_scaling=full, sliding_window_pattern=6)
    config_path.write_text(json.dumps(hf))


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request, tmp_path_factory) -> Case:
    name = request.param
    path = tmp_path_factory.mktemp(name)
    model = build_hf_model(name, path)
    if name == "gemma3":
        to_published_gemma3_config(path)
    return Case(name, model, load_checkpoint(path, progress=False), path)


def prompts(seed: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def expected_tokens(case, hf_greedy_batch) -> list[list[int]]:
    """HF's greedy continuations (one left-padded `generate` of the 3 prompts, EOS ignored)."""
    return hf_greedy_batch(case.hf, prompts(), MAX_NEW)


def relative_errors(expected, actual) -> list[float]:
    return [float(np.abs(want - got).max() / np.abs(want).max())
            for want, got in zip(expected, actual)]


def with_max_model_len(checkpoint, max_model_len: int):
    """The checkpoint with its config run for `max_model_len` (LongRoPE's choice, vLLM's rule)."""
    return dataclasses.replace(checkpoint, config=dataclasses.replace(
        checkpoint.config, max_model_len=max_model_len))


def test_config_reads_the_published_settings(case):
    c = case.checkpoint.config
    assert c.architecture == case.name
    flags = {"qwen3": lambda: c.qk_norm and not c.is_moe,
             "gemma2": lambda: (c.attn_soft_cap, c.final_soft_cap, c.attn_scale,
                                c.layer_types[:2], c.norm_offset) == (
                 50.0, 30.0, 256 ** -0.5, (SLIDING, FULL), 1.0),
             "gemma3": lambda: (c.layer_windows(), c.local_rope_theta, c.rope_theta,
                                c.rope_scaling, c.qk_norm, c.tie_word_embeddings) == (
                 (16,) * 5 + (None,), 1e4, 1e6, {"rope_type": "linear", "factor": 8.0}, True,
                 True),
             "phi3": lambda: c.rope_scaling["rope_type"] == "longrope" and c.rope_scaling[
                 "original_max_position_embeddings"] == PHI3_ORIGINAL_CONTEXT,
             "mixtral": lambda: (c.num_experts, c.num_experts_per_tok, c.moe_layer_ids()) == (
                 8, 2, (0, 1)),
             "qwen3_moe": lambda: (c.num_experts, c.num_experts_per_tok, c.moe_layer_ids(),
                                   c.dense_layer_ids(), c.norm_topk_prob) == (
                 16, 4, (0, 2), (1,), True)}
    assert flags[case.name](), c


def test_logits_match_hf(case):
    rng = np.random.default_rng(1)
    lens, steps = (7, 2, 12), 4
    batch = Batch([rng.integers(3, VOCAB, n + steps).tolist() for n in lens], lens, steps)
    checkpoint = with_max_model_len(case.checkpoint, ENGINE["max_model_len"])
    expected, actual = run_hf(case.hf, batch), run_jpaged(checkpoint, batch)
    errors = relative_errors(expected, actual)
    assert max(errors) <= REL_TOLERANCE, f"{case.name}: relative logit error per step {errors}"
    assert np.abs(expected[0]).max() > 1.0


def test_engine_greedy_matches_hf_with_chunked_prefill_and_preemption(case, expected_tokens):
    llm = LLM.from_checkpoint(case.checkpoint, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected_tokens
    assert llm.stats().num_preemptions > 0
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)


def test_jitted_generate_matches_hf(case, expected_tokens):
    model, params, _ = jpaged.load(case.path)
    width = max(PROMPT_LENS)
    tokens = np.zeros((len(PROMPT_LENS), width), np.int32)
    for i, p in enumerate(prompts()):
        tokens[i, :len(p)] = p
    out = GEN(model, params, tokens, np.asarray(PROMPT_LENS, np.int32), max_new_tokens=MAX_NEW,
              rng=jax.random.key(0), page_size=16)
    assert out.tokens.tolist() == expected_tokens


def test_moe_sequences_route_to_different_experts(case):
    """The batches above mix sequences whose tokens pick different experts (per HF's router)."""
    if not case.checkpoint.config.is_moe:
        pytest.skip("dense architecture")
    top_k = case.checkpoint.config.num_experts_per_tok
    picks = set()
    with torch.no_grad():
        for p in prompts():
            router = case.hf(torch.tensor([p]), output_router_logits=True).router_logits[0]
            picks.add(tuple(sorted(router[-1].topk(top_k).indices.tolist())))
    assert len(picks) > 1, picks


def test_gemma3_real_window_crossed_by_a_long_prompt(tmp_path):
    """Gemma 3 with its published 1024-token window: a 1040-token prompt, then decodes."""
    hf = build_hf_model("gemma3", tmp_path, seed=3, sliding_window=1024)
    checkpoint = load_checkpoint(tmp_path, progress=False)
    assert checkpoint.config.layer_windows() == (1024,) * 5 + (None,)
    sequence = np.random.default_rng(2).integers(3, VOCAB, 1043).tolist()
    batch = Batch([sequence], (1040,), 3, page_size=16, pages_per_seq=66, num_pages=67)
    errors = relative_errors(run_hf(hf, batch), run_jpaged(checkpoint, batch))
    assert max(errors) <= REL_TOLERANCE, errors


@pytest.mark.parametrize("max_model_len", [PHI3_ORIGINAL_CONTEXT, 2 * PHI3_ORIGINAL_CONTEXT])
def test_phi3_longrope_factors_follow_max_model_len(tmp_path, max_model_len):
    """vLLM's rule: the long factors when max_model_len exceeds the original context, for every
    position. HF picks per forward pass by its length, so the two agree on sequences on the same
    side of the original context: short ones here with the short factors, long with the long."""
    hf = build_hf_model("phi3", tmp_path, seed=5)
    checkpoint = with_max_model_len(load_checkpoint(tmp_path, progress=False), max_model_len)
    rng = np.random.default_rng(4)
    lens = (40, 50) if max_model_len <= PHI3_ORIGINAL_CONTEXT else (70, 100)
    batch = Batch([rng.integers(3, VOCAB, n + 2).tolist() for n in lens], lens, 2,
                  page_size=16, pages_per_seq=7, num_pages=15)
    errors = relative_errors(run_hf(hf, batch), run_jpaged(checkpoint, batch))
    assert max(errors) <= REL_TOLERANCE, errors
    other = with_max_model_len(checkpoint, 3 * PHI3_ORIGINAL_CONTEXT - max_model_len)
    assert max(relative_errors(run_hf(hf, batch), run_jpaged(other, batch))) > 1e-2


def test_mistral_style_window_releases_the_pages_behind_it(tmp_path, hf_greedy_batch):
    """Every layer windowed (Mistral, window 8): the engine releases the pages behind the window,
    so two 50-token prompts with 32 new tokens each (22 pages of 8) run in 12 pages without a
    preemption, with HF's greedy tokens, and every page is free after."""
    hf = build_hf("MistralConfig", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, sliding_window=8,
        max_position_embeddings=4096), tmp_path, seed=9)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, VOCAB, 50).tolist() for _ in range(2)]
    llm = LLM(str(tmp_path), dtype="float32", page_size=8, num_pages=13, max_model_len=96,
              max_num_seqs=2, max_num_batched_tokens=16, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy_batch(hf, prompts, MAX_NEW)
    assert llm.stats().num_preemptions == 0
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)
