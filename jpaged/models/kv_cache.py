"""The paged KV cache and the attention metadata of a step: the contract between the host side
(block tables) and the model (DESIGN.md). Shape legend: jpaged_kernels/reference.py.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jpaged.config import ModelConfig


@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, K, num_pages, S, H]
    v: jax.Array  # [L, K, num_pages, S, H]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @classmethod
    def zeros(cls, config: ModelConfig, num_pages: int, page_size: int, dtype) -> "KVCache":
        shape = (config.num_layers, config.num_kv_heads, num_pages, page_size, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @staticmethod
    def bytes_per_page(config: ModelConfig, page_size: int, dtype) -> int:
        return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim * \
            jnp.dtype(dtype).itemsize


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=[])


@dataclasses.dataclass
class AttentionMetadata:
    block_tables: jax.Array     # [B, P] int32, padding entries -> null page 0
    slot_mapping: jax.Array     # [T] int32, padding tokens -> slots of page 0
    context_lens: jax.Array     # [B] int32, KV length including the new tokens (0 for padding seqs)
    query_start_loc: jax.Array  # [B+1] int32, cumulative new-token counts
    decode_only: bool = False   # static: every sequence brings exactly one token (T == B)


jax.tree_util.register_dataclass(
    AttentionMetadata,
    data_fields=["block_tables", "slot_mapping", "context_lens", "query_start_loc"],
    meta_fields=["decode_only"])


def slot_mapping(block_tables, rows, positions, page_size: int):
    """The cache slot of the token at `positions` of sequence `rows` (DESIGN.md's formula):
    `block_tables[row, pos // S] * S + pos % S`. NumPy or jax arrays alike."""
    return block_tables[rows, positions // page_size] * page_size + positions % page_size


@dataclasses.dataclass(frozen=True)
class AttentionFns:
    """The attention implementation the model calls (reference, Triton or Mosaic kernels)."""
    paged_attention: Callable      # decode: q [B, N, H] -> [B, N, H]
    ragged_paged_attention: Callable  # ragged: q [T, N, H] -> [T, N, H]


def reference_attention() -> AttentionFns:
    """The pure-jnp attention: the model's default, and the engine's off a GPU."""
    from jpaged_kernels import reference
    return AttentionFns(reference.paged_attention, reference.ragged_paged_attention)
