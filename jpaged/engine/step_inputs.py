"""The one builder of a step's device inputs: scheduled rows -> padded NumPy arrays of a bucket.

Padding tokens write into the null page 0 (slot 0 of a table of zeros) and padding sequences have
q_len = context_len = 0, so their rows attend to nothing; their logits are computed and ignored.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jpaged.core.step import ScheduledSeq
from jpaged.engine.buckets import StepKey
from jpaged.models.kv_cache import AttentionMetadata, slot_mapping


@dataclasses.dataclass
class StepInputs:
    token_ids: jax.Array          # [T] int32
    positions: jax.Array          # [T] int32
    metadata: AttentionMetadata


jax.tree_util.register_dataclass(StepInputs, data_fields=["token_ids", "positions", "metadata"],
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
            [r.token_ids[r.num_computed_tokens:r.num_computed_tokens + r.num_new_tokens]
             for r in rows])
    slots = np.zeros(key.num_tokens, np.int32)
    slots[:num_real] = slot_mapping(block_tables, row, positions[:num_real], page_size)
    return StepInputs(token_ids, positions, AttentionMetadata(
        block_tables, slots, context_lens, query_start_loc, decode_only=key.decode_only))
