"""The one builder of step inputs and the bucket policy, by hand: exact arrays for a decode batch
and for a mixed batch (prefill chunk, decode, a fork that reuses a row, padding)."""

import numpy as np
import pytest

from jpaged.core.step import ScheduledSeq
from jpaged.engine.buckets import BucketPolicy, StepKey, geometric_buckets, pick
from jpaged.engine.step_inputs import build_step_inputs
from jpaged.sampling_params import SamplingParams

PAGE = 4


def row(seq_id, tokens, computed, new, table, prompt=None):
    return ScheduledSeq(seq_id=seq_id, request_id=f"r{seq_id}", num_computed_tokens=computed,
                        num_new_tokens=new, token_ids=tokens, num_prompt_tokens=prompt or computed,
                        block_table=tuple(table), params=SamplingParams(), seed=0)


def arrays(inputs):
    m = inputs.metadata
    return {name: np.asarray(x).tolist() for name, x in (
        ("token_ids", inputs.token_ids), ("positions", inputs.positions),
        ("slot_mapping", m.slot_mapping), ("block_tables", m.block_tables),
        ("context_lens", m.context_lens), ("query_start_loc", m.query_start_loc))}


def test_decode_batch_padded_to_its_bucket():
    rows = [row(0, [10, 11, 12, 13, 14], 4, 1, [3, 7]), row(1, [20, 21], 1, 1, [5])]
    inputs = build_step_inputs(rows, StepKey(3, 3, 2, decode_only=True), PAGE)
    assert inputs.metadata.decode_only
    assert arrays(inputs) == {
        "token_ids": [14, 21, 0], "positions": [4, 1, 0],
        # token 4 of row 0: page 7 (its 2nd), slot 0 -> 28; token 1 of row 1: page 5 -> 21
        "slot_mapping": [28, 21, 0],
        "block_tables": [[3, 7], [5, 0], [0, 0]], "context_lens": [5, 2, 0],
        "query_start_loc": [0, 1, 2, 2]}


def test_mixed_batch_with_a_chunk_a_decode_and_a_fork():
    rows = [row(0, list(range(100, 110)), 3, 6, [2, 4, 6], prompt=10),   # prompt chunk 3..8
            row(1, [7, 8, 9], 2, 1, [9]),                               # a decode at position 2
            row(2, [7, 8, 9], 3, 0, [9])]                               # a fork: no new token
    inputs = build_step_inputs(rows, StepKey(16, 4, 4, decode_only=False), PAGE)
    got = arrays(inputs)
    assert got["token_ids"] == [103, 104, 105, 106, 107, 108, 9] + [0] * 9
    assert got["positions"] == [3, 4, 5, 6, 7, 8, 2] + [0] * 9
    assert got["slot_mapping"] == [11, 16, 17, 18, 19, 24, 38] + [0] * 9
    assert got["block_tables"] == [[2, 4, 6, 0], [9, 0, 0, 0], [9, 0, 0, 0], [0, 0, 0, 0]]
    assert got["context_lens"] == [9, 3, 3, 0]
    # the fork's last token is the row before it: it samples from the decode's logits
    assert got["query_start_loc"] == [0, 6, 7, 7, 7]
    assert not rows[0].samples and rows[1].samples and rows[2].samples


def test_rows_that_do_not_fit_the_bucket_are_refused():
    rows = [row(0, [1, 2, 3], 0, 3, [1])]
    with pytest.raises(ValueError, match="do not fit bucket"):
        build_step_inputs(rows, StepKey(2, 1, 1, decode_only=False), PAGE)


def test_bucket_policy_picks_the_smallest_bucket_and_plans_every_one():
    assert geometric_buckets(1, 12) == [1, 2, 3, 4, 6, 8, 12]
    assert geometric_buckets(16, 64, per_octave=4) == [16, 20, 24, 28, 32, 40, 48, 56, 64]
    assert pick([1, 2, 4], 3) == 4
    policy = BucketPolicy(max_num_seqs=6, max_num_batched_tokens=64, max_model_len=40,
                          page_size=PAGE)
    assert policy.seqs == [1, 2, 3, 4, 6] and policy.pages == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    decodes = [row(i, [1] * 9, 8, 1, [1, 2, 3]) for i in range(5)]
    assert policy.key_for(decodes) == StepKey(6, 6, 3, decode_only=True)
    assert policy.key_for(decodes[:2] + [row(9, [1] * 21, 0, 21, [1] * 6)]) == \
        StepKey(24, 3, 6, decode_only=False)
    plan = policy.warmup_plan()
    assert [(e.num_seqs, e.num_pages) for e in plan if e.kind == "decode"] == [
        (b, p) for p in policy.pages for b in policy.seqs]
    for length in range(2, 40):                     # every lone prompt has its exact bucket
        key = policy.key_for([row(0, [1] * length, 0, length, [1] * -(-length // PAGE))])
        assert any(policy.key_for(e.rows(PAGE, SamplingParams())) == key for e in plan
                   if e.kind == "prefill"), length
    for entry in plan:                              # each fake batch lands in its own bucket
        rows = entry.rows(PAGE, SamplingParams())
        assert sum(r.num_new_tokens for r in rows) == entry.num_tokens
        assert policy.key_for(rows).num_pages == pick(policy.pages, entry.num_pages)
