"""The Llama-family model as a functional Flax (linen) module over a paged KV cache.

`CausalLM.apply({"params": params}, token_ids, positions, kv_cache, metadata)` runs a ragged batch of
T new tokens from B sequences (prefill chunks and decodes alike) and returns the logits of each
sequence's last new token plus the updated cache. Layers run under `nn.scan` over stacked weights, and
the whole `[L, ...]` cache rides in the scan carry, so each layer reads and writes its pages in place
(by layer index) instead of slicing out a per-layer copy.

Shape legend: see jpaged_kernels/reference.py (T, B, N, K, H, P, S, L; D model dim, F MLP dim, V vocab).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpaged.config import ModelConfig
from jpaged_kernels import write_kv


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


@dataclasses.dataclass(frozen=True)
class AttentionFns:
    """The attention implementation the model calls (reference, Triton or Mosaic kernels)."""
    paged_attention: Callable      # decode: q [B, N, H] -> [B, N, H]
    ragged_paged_attention: Callable  # ragged: q [T, N, H] -> [T, N, H]


def reference_attention() -> AttentionFns:
    """The pure-jnp attention: the model's default, and the engine's off a GPU."""
    from jpaged_kernels import reference
    return AttentionFns(reference.paged_attention, reference.ragged_paged_attention)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * y.astype(self.dtype)


def apply_rope(x, cos, sin):
    """x [T, N, H]; cos/sin [T, H] (the HF rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def rope_cos_sin(config: ModelConfig, positions, dtype):
    inv_freq = jnp.asarray(config.rope_inv_freq())                       # [H/2]
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                       # [T, H]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    attention: AttentionFns

    @nn.compact
    def __call__(self, x, cos, sin, kv: KVCache, layer, metadata: AttentionMetadata):
        c, init = self.config, nn.initializers.normal(0.02)
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        q = jnp.einsum("TD,DNH->TNH", x, self.param("wq", init, (d, n, h), self.dtype))
        key = jnp.einsum("TD,DKH->TKH", x, self.param("wk", init, (d, k, h), self.dtype))
        val = jnp.einsum("TD,DKH->TKH", x, self.param("wv", init, (d, k, h), self.dtype))
        if c.qkv_bias:
            q = q + self.param("bq", nn.initializers.zeros, (n, h), self.dtype)
            key = key + self.param("bk", nn.initializers.zeros, (k, h), self.dtype)
            val = val + self.param("bv", nn.initializers.zeros, (k, h), self.dtype)
        q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        k_cache, v_cache = write_kv(kv.k, kv.v, key, val, metadata.slot_mapping, layer=layer)
        kwargs = dict(layer=layer, sliding_window=c.sliding_window)
        if metadata.decode_only:
            o = self.attention.paged_attention(q, k_cache, v_cache, metadata.block_tables,
                                               metadata.context_lens, **kwargs)
        else:
            o = self.attention.ragged_paged_attention(q, k_cache, v_cache, metadata.block_tables,
                                                      metadata.context_lens,
                                                      metadata.query_start_loc, **kwargs)
        out = jnp.einsum("TNH,NHD->TD", o, self.param("wo", init, (n, h, d), self.dtype))
        if c.o_bias:
            out = out + self.param("bo", nn.initializers.zeros, (d,), self.dtype)
        return out, KVCache(k_cache, v_cache)


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        d, f, init = self.config.hidden_size, self.config.intermediate_size, nn.initializers.normal(0.02)
        gate = x @ self.param("w_gate", init, (d, f), self.dtype)
        up = x @ self.param("w_up", init, (d, f), self.dtype)
        return (jax.nn.silu(gate) * up) @ self.param("w_down", init, (f, d), self.dtype)


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    attention: AttentionFns

    @nn.compact
    def __call__(self, carry, layer, cos, sin, metadata):
        x, kv = carry
        eps = self.config.rms_norm_eps
        a, kv = Attention(self.config, self.dtype, self.attention, name="attn")(
            RMSNorm(eps, self.dtype, name="attn_norm")(x), cos, sin, kv, layer, metadata)
        h = x + a
        out = h + MLP(self.config, self.dtype, name="mlp")(RMSNorm(eps, self.dtype, name="mlp_norm")(h))
        return (out, kv), None


class CausalLM(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    attention: AttentionFns = dataclasses.field(default_factory=reference_attention)

    @nn.compact
    def __call__(self, token_ids, positions, kv_cache: KVCache, metadata: AttentionMetadata):
        """token_ids, positions [T] -> (logits [B, V] float32 of each sequence's last token, cache)."""
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         name="embed")
        x = embed(token_ids)                                                  # [T, D]
        cos, sin = rope_cos_sin(c, positions, self.dtype)
        layers = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers)
        (x, kv_cache), _ = layers(c, self.dtype, self.attention, name="layers")(
            (x, kv_cache), jnp.arange(c.num_layers, dtype=jnp.int32), cos, sin, metadata)
        last = jnp.maximum(metadata.query_start_loc[1:] - 1, 0)              # [B]
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x[last])        # [B, D]
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = x @ self.param("lm_head", nn.initializers.normal(0.02),
                                    (c.hidden_size, c.vocab_size), self.dtype)
        return logits.astype(jnp.float32), kv_cache
