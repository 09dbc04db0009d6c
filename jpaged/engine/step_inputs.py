"""The one builder of a step's device inputs: scheduled rows -> padded NumPy arrays of a bucket.

Padding tokens write into the null page 0 (slot 0 of a table of zeros) and padding sequences have
q_len = context_len = 0, so their rows attend to nothing; their logits are computed and ignored.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jpaged.core.step import ScheduledSeq
from jpaged.engine.buckets import StepKey, wants_prompt_logprobs
from jpaged.models.kv_cache import AttentionMetadata, slot_mapping


@dataclasses.dataclass
class StepInputs:
    token_ids: jax.Array          # [T] int32
    positions: jax.Array          # [T] int32
    metadata: AttentionMetadata
    logprob_targets: jax.Array | None = None   # [T] int32, the prompt token after each (-1: none)
    # [B * A] int32 (speculative steps, A = key.spec_width): the token index of row b's logits
    # at position j is entry b * A + j (its last k + 1 tokens; the last token repeated past them)
    logits_indices: jax.Array | None = None


jax.tree_util.register_dataclass(StepInputs, data_fields=["token_ids", "positions", "metadata",
                                                          "logprob_targets", "logits_indices"],
                                 meta_fields=[])


def build_step_inputs(rows: list[ScheduledSeq], key: StepKey, page_size: int) -> StepInputs:
    """Inputs for `rows` padded to bucket `key` (which must hold them)."""
    lens = np.array([r.num_new_tokens for r in rows], np.int32)                 # [B real]
    starts = np.array([r.num_computed_tokens for r in rows], np.int32)
    num_real = int(lens.sum())
    if len(rows) > key.num_seqs or num_real > key.num_tokens:
        raise ValueError(f"{len(rows)} sequences with {num_real} new tokens do not fit bucket {key}")
    block_tables = np.zeros((key.num_seqs, key.num_pages), np.int32)
    for i, r in enumerate(rows):
        block_tables[i, :len(r.block_table)] = r.block_table
    query_start_loc = np.zeros(key.num_seqs + 1, np.int32)
    query_start_loc[1:len(rows) + 1] = np.cumsum(lens)
    query_start_loc[len(rows) + 1:] = num_real
    context_lens = np.zeros(key.num_seqs, np.int32)
    context_lens[:len(rows)] = starts + lens
    row = np.repeat(np.arange(len(rows), dtype=np.int32), lens)                 # [T real]
    positions = np.zeros(key.num_tokens, np.int32)
    positions[:num_real] = starts[row] + np.arange(num_real) - query_start_loc[row]
    token_ids = np.zeros(key.num_tokens, np.int32)
    if num_real:
        token_ids[:num_real] = np.concatenate(
            [[*r.token_ids[r.num_computed_tokens:
                           r.num_computed_tokens + r.num_new_tokens - r.num_spec_tokens],
              *r.spec_token_ids] for r in rows])
    slots = np.zeros(key.num_tokens, np.int32)
    slots[:num_real] = slot_mapping(block_tables, row, positions[:num_real], page_size)
    metadata = AttentionMetadata(block_tables, slots, context_lens, query_start_loc,
                                 decode_only=key.decode_only)
    targets = _logprob_targets(rows, key.num_tokens) if key.prompt_logprobs else None
    indices = _logits_indices(rows, query_start_loc, key) if key.spec_width > 1 else None
    return StepInputs(token_ids, positions, metadata, targets, indices)


def _logits_indices(rows: list[ScheduledSeq], query_start_loc: np.ndarray,
                    key: StepKey) -> np.ndarray:
    """[B * A]: row b's last token index at j = num_spec_tokens, its proposals' before it."""
    width = key.spec_width
    last = np.maximum(query_start_loc[1:] - 1, 0)                              # [B]
    spec = np.zeros(key.num_seqs, np.int32)
    spec[:len(rows)] = [r.num_spec_tokens for r in rows]
    j = np.arange(width, dtype=np.int32)[None, :]
    return np.minimum(last[:, None] - spec[:, None] + j, last[:, None]).reshape(-1)


def _logprob_targets(rows: list[ScheduledSeq], num_tokens: int) -> np.ndarray:
    """[T]: for each new prompt token of a row that wants prompt log-probs, the prompt token that
    follows it; -1 elsewhere."""
    targets = np.full(num_tokens, -1, np.int32)
    offset = 0
    for r in rows:
        if wants_prompt_logprobs(r):
            first = r.num_computed_tokens + 1
            end = min(r.num_computed_tokens + r.num_new_tokens + 1, r.num_prompt_tokens)
            targets[offset:offset + end - first] = r.token_ids[first:end]
        offset += r.num_new_tokens
    return targets
