"""The paged KV cache and the attention metadata of a step: the contract between the host side
(block tables) and the model (DESIGN.md). Shape legend: jpaged_kernels/reference.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jpaged.config import ModelConfig
from jpaged_kernels import write_kv


# vLLM's kv_cache_dtype names -> the pages' dtype (None: the model's dtype)
KV_CACHE_DTYPES = {"auto": None, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn,
                   "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
KV_SCALE_DTYPE = jnp.float16


@dataclasses.dataclass
class KVCache:
    """The pages of every layer. A quantized cache (kv_cache_dtype int8 or fp8) also holds a scale
    per token and KV head: a token's K is k * k_scale (jpaged_kernels.reference.write_kv).
    NOTE: per token, not per page: a page fills a token at a time, and a per-page scale would
    have to be known before its first token. The scales cost 2 bytes per H values (float16), so
    an int8 cache holds 4 H / (H + 2) times the tokens of a float32 one (3.9x at H = 64).
    A float8 cache stores its pages as uint8 bit patterns, `fp8_dtype` naming the type (XLA:CPU
    copies a whole float8 array around every scatter: jpaged_kernels.reference.as_bits)."""
    k: jax.Array                     # [L, K, num_pages, S, H]
    v: jax.Array                     # [L, K, num_pages, S, H]
    k_scale: jax.Array | None = None  # [L, K, num_pages, S] (quantized caches)
    v_scale: jax.Array | None = None
    fp8_dtype: Any = None             # static: the float8 dtype uint8 pages hold, or None

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @classmethod
    def zeros(cls, config: ModelConfig, num_pages: int, page_size: int, dtype,
              kv_cache_dtype: str = "auto") -> "KVCache":
        shape = (config.num_layers, config.num_kv_heads, num_pages, page_size, config.head_dim)
        pages = cache_dtype(kv_cache_dtype, dtype)
        if kv_cache_dtype == "auto":
            return cls(jnp.zeros(shape, pages), jnp.zeros(shape, pages))
        fp8_dtype = float8_pages(kv_cache_dtype)
        stored = jnp.uint8 if fp8_dtype is not None else pages
        return cls(jnp.zeros(shape, stored), jnp.zeros(shape, stored),
                   jnp.ones(shape[:-1], KV_SCALE_DTYPE), jnp.ones(shape[:-1], KV_SCALE_DTYPE),
                   fp8_dtype)

    @staticmethod
    def bytes_per_page(config: ModelConfig, page_size: int, dtype,
                       kv_cache_dtype: str = "auto") -> int:
        per_token = config.head_dim * cache_dtype(kv_cache_dtype, dtype).itemsize
        if kv_cache_dtype != "auto":
            per_token += jnp.dtype(KV_SCALE_DTYPE).itemsize
        return 2 * config.num_layers * config.num_kv_heads * page_size * per_token

    def write(self, key, val, slot_mapping, *, layer) -> "KVCache":
        """This layer's new K/V [T, K, H] written at `slot_mapping` (quantized if the cache is)."""
        if not self.quantized:
            return KVCache(*write_kv(self.k, self.v, key, val, slot_mapping, layer=layer))
        return KVCache(*write_kv(self.k, self.v, key, val, slot_mapping, layer=layer,
                                 k_scale=self.k_scale, v_scale=self.v_scale,
                                 fp8_dtype=self.fp8_dtype), fp8_dtype=self.fp8_dtype)

    def attention_kwargs(self) -> dict:
        """What the attention functions need besides the pages: a quantized cache's scales (and
        the float8 type of uint8 pages)."""
        if not self.quantized:
            return {}
        return dict(k_scale=self.k_scale, v_scale=self.v_scale, fp8_dtype=self.fp8_dtype)


def cache_dtype(kv_cache_dtype: str, dtype) -> jnp.dtype:
    """The pages' dtype for vLLM's kv_cache_dtype name, or a ValueError naming the choices."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of "
                         f"{list(KV_CACHE_DTYPES)}")
    return jnp.dtype(KV_CACHE_DTYPES[kv_cache_dtype] or dtype)


def float8_pages(kv_cache_dtype: str):
    """The float8 dtype whose bit patterns a cache of this kv_cache_dtype stores, or None."""
    name = KV_CACHE_DTYPES.get(kv_cache_dtype)
    return None if name is None or jnp.dtype(name) == jnp.int8 else jnp.dtype(name)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "k_scale", "v_scale"],
                                 meta_fields=["fp8_dtype"])


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
