"""Beam search in the engine: the selection rule by hand, then token-for-token against HF
transformers' generate(num_beams=k, do_sample=False, early_stopping=True) on a tiny Llama, with
pages shared between beams and every page free at the end."""

from __future__ import annotations

import numpy as np
import pytest

from jpaged import LLM, BeamSearchParams
from jpaged.core.beam_search import BeamSearch, Candidate, select_beams


def test_select_keeps_the_best_non_ending_candidates_and_scores_finished_ones():
    search = BeamSearch(beam_width=2, max_tokens=10, eos_token_ids=(0,), length_penalty=1.0)
    beams = [((5,), -1.0), ((6,), -2.0)]
    candidates = [[(0, -0.1), (7, -0.5), (8, -3.0), (9, -4.0)],
                  [(7, -0.2), (0, -0.3), (9, -1.0), (8, -5.0)]]
    # ranked: (0 from beam 0: -1.1) (7: -1.5) (7 from 1: -2.2) (0 from 1: -2.3); top 4 kept
    first = select_beams(search, [], beams, candidates)
    assert first.beams == [Candidate(-1.5, 0, 7), Candidate(-2.2, 1, 7)]
    assert [(h.output_tokens, h.score) for h in first.finished] == [((5, 0), -1.1 / 2)]
    assert not first.done                       # EOS from beam 1 ranked 4th: not in the top 2
    beams = [((5, 7), -1.5), ((6, 7), -2.2)]
    candidates = [[(0, -0.1), (3, -2.0)], [(0, -0.1), (3, -0.2)]]
    second = select_beams(search, first.finished, beams, candidates)
    # -1.6 / 3 beats -1.1 / 2: the longer hypothesis ranks first
    assert second.beams == [] and second.done
    assert [h.output_tokens for h in second.finished] == [(5, 7, 0), (5, 0)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), page_size=4, num_pages=96, max_model_len=128, max_num_seqs=8,
               max_num_batched_tokens=64)


def hf_beams(model, prompt, width, max_tokens, length_penalty):
    import torch
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width,
                             num_return_sequences=width, do_sample=False, early_stopping=True,
                             max_new_tokens=max_tokens, length_penalty=length_penalty,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=1)
    scores = getattr(out, "sequences_scores", None)         # width 1 is HF's greedy search
    return [row[len(prompt):].tolist() for row in out.sequences], \
        None if scores is None else scores.tolist()


def strip_padding(tokens, eos=1):
    """HF pads finished beams with the pad/EOS id after their EOS."""
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("width,length_penalty", [(1, 1.0), (2, 1.0), (3, 0.5), (4, 2.0)])
def test_beams_equal_hf(llm, tiny_llama_hf, width, length_penalty):
    rng = np.random.default_rng(width)
    prompts = [rng.integers(2, 512, size=int(n)).tolist() for n in (5, 11, 23)]
    params = BeamSearchParams(beam_width=width, max_tokens=12, length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outputs):
        hf_tokens, hf_scores = hf_beams(tiny_llama_hf, prompt, width, 12, length_penalty)
        got = [s.tokens[len(prompt):] for s in out.sequences]
        assert got == [strip_padding(t) for t in hf_tokens]
        if hf_scores is not None:
            np.testing.assert_allclose([s.score for s in out.sequences], hf_scores, rtol=1e-4)
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)


def test_beams_share_pages_and_dropped_beams_are_freed_in_the_same_step(llm):
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": list(range(2, 22))}           # 20 tokens: 5 full pages
    engine.add_beam_request("share", prompt, BeamSearchParams(beam_width=4, max_tokens=6,
                                                              ignore_eos=True))
    engine.step()
    request = engine.scheduler.requests["share"]
    bm = engine.block_manager
    seen_sharing = False
    while engine.has_unfinished_requests():
        engine.step()
        live = [seq for seq in request.seqs]
        held = sum(len(seq.block_table) for seq in live)
        used = bm.num_usable_pages - bm.num_free_pages
        if len(live) == 4 and all(seq.block_table for seq in live):
            # every prompt page is held by all four beams, and nothing else is allocated
            assert all(bm.refcounts[p] == 4 for p in live[0].block_table[:5])
            assert used < held
            seen_sharing = True
        assert used == len({p for seq in live for p in seq.block_table})
    assert seen_sharing
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)


def test_bad_beam_params_are_named():
    with pytest.raises(ValueError, match="beam_width must be an int in 1..10"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1, got '4'"):
        BeamSearchParams(beam_width=2, max_tokens="4")
