"""The Llama-family model as a functional Flax (linen) module over a paged KV cache.

`CausalLM.apply({"params": params}, token_ids, positions, kv_cache, metadata)` runs a ragged batch of
T new tokens from B sequences (prefill chunks and decodes alike) and returns the logits of each
sequence's last new token plus the updated cache. Layers run as one `lax.scan` over the layer index
(LayerStack) with weights stacked on axis 0, or split per layer by `split_layer_weights` so that
every matmul reads its weight in place; the whole `[L, ...]` cache rides in the loop carry, so each
layer reads and writes its pages in place (by layer index) instead of slicing out a per-layer copy.

Shape legend: see jpaged_kernels/reference.py (T, B, N, K, H, P, S, L; D model dim, F MLP dim, V vocab).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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




def rms_norm(x, scale, eps: float, dtype):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * y.astype(dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        return rms_norm(x, self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype),
                        self.eps, self.dtype)


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


def split_layer_weights(params: dict) -> dict:
    """The engine's layout of the layer matmul weights: one array per layer, fused where they share
    an input. attn: `wqkv` L x [D, (N+2K)*H] and `wo` L x [N*H, D]; mlp: `w_gate_up` L x [D, 2F]
    and `w_down` L x [F, D]. Norm scales and biases stay stacked.

    NOTE: why. Under a loop over layers, `W[layer]` of a stacked weight is a dynamic slice, and
    XLA:CPU copies it into a fresh buffer before the matmul: every step copied all layer weights
    (~425 MB for SmolLM2), so batch-1 decode ran at copy bandwidth, not read bandwidth. With one
    buffer per layer, LayerWeights.matmul picks the layer's buffer with a `lax.switch` whose branch
    is the matmul itself, which then reads the weight in place (fusing q/k/v and gate/up halves
    the number of branches to compile). The engine does this once at start (on CPU); the stacked
    form (checkpoints, `jpaged.generate`) still works, with the copies.
    """
    attn, mlp = dict(params["layers"]["attn"]), dict(params["layers"]["mlp"])
    if "wqkv" in attn:
        return params
    wq, wk, wv, wo = (attn.pop(name) for name in ("wq", "wk", "wv", "wo"))
    num_layers, d = wq.shape[:2]
    attn["wqkv"] = _unstack(lambda xp, l: xp.concatenate(
        [wq[l].reshape(d, -1), wk[l].reshape(d, -1), wv[l].reshape(d, -1)], axis=1), wq, num_layers)
    attn["wo"] = _unstack(lambda xp, l: wo[l].reshape(-1, d), wo, num_layers)
    gate, up, down = (mlp.pop(name) for name in ("w_gate", "w_up", "w_down"))
    mlp["w_gate_up"] = _unstack(lambda xp, l: xp.concatenate([gate[l], up[l]], axis=1), gate,
                                num_layers)
    mlp["w_down"] = _unstack(lambda xp, l: down[l], down, num_layers)
    return {**params, "layers": {**params["layers"], "attn": attn, "mlp": mlp}}


def _unstack(make, like, num_layers: int) -> tuple:
    """(make(np, 0), ..., make(np, L-1)); built in NumPy from zero-copy views when `like` is a CPU
    jax array (one device_put per layer, no per-shape compilation), as jax arrays on other devices,
    and left as NumPy when `like` is NumPy (update_params places those)."""
    if isinstance(like, np.ndarray):
        return tuple(make(np, l) for l in range(num_layers))
    if all(device.platform == "cpu" for device in like.devices()):
        return tuple(jax.device_put(np.asarray(make(np, l)), like.sharding)
                     for l in range(num_layers))
    return tuple(make(jnp, l) for l in range(num_layers))


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One layer's view of the layer stack: stacked leaves [L, ...], or split_layer_weights' form."""
    weights: dict      # {"attn": {...}, "mlp": {...}, "attn_norm": {...}, "mlp_norm": {...}}
    layer: jax.Array   # scalar int32

    def get(self, group: str, name: str):
        """A small per-layer leaf (norm scale, bias): a dynamic index into the stacked array."""
        return jax.lax.dynamic_index_in_dim(self.weights[group][name], self.layer, keepdims=False)

    def matmul(self, spec: str, x, group: str, name: str):
        """einsum(spec, x, W[layer]); W[layer] is read in place when the weights are split."""
        w = self.weights[group][name]
        if not isinstance(w, tuple):
            return jnp.einsum(spec, x, jax.lax.dynamic_index_in_dim(w, self.layer, keepdims=False))
        branches = [functools.partial(_einsum_layer, spec, layer=i) for i in range(len(w))]
        return jax.lax.switch(self.layer, branches, x, w)

    @property
    def split(self) -> bool:
        return "wqkv" in self.weights["attn"]


def _einsum_layer(spec, x, weights, *, layer):
    return jnp.einsum(spec, x, weights[layer])


def qkv_projections(w: LayerWeights, x, c: ModelConfig):
    """x [T, D] -> q [T, N, H], k [T, K, H], v [T, K, H]."""
    if not w.split:
        return (w.matmul("TD,DNH->TNH", x, "attn", "wq"), w.matmul("TD,DKH->TKH", x, "attn", "wk"),
                w.matmul("TD,DKH->TKH", x, "attn", "wv"))
    n, k, h = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim
    y = w.matmul("TD,DX->TX", x, "attn", "wqkv")                              # [T, (N+2K)*H]
    return (y[:, :n].reshape(-1, c.num_heads, h), y[:, n:n + k].reshape(-1, c.num_kv_heads, h),
            y[:, n + k:].reshape(-1, c.num_kv_heads, h))


def mlp_block(w: LayerWeights, x, c: ModelConfig):
    """SwiGLU: (silu(x W_gate) * x W_up) W_down, x [T, D] -> [T, D]."""
    if w.split:
        gate_up = w.matmul("TD,DF->TF", x, "mlp", "w_gate_up")                 # [T, 2F]
        gate, up = gate_up[:, :c.intermediate_size], gate_up[:, c.intermediate_size:]
    else:
        gate, up = w.matmul("TD,DF->TF", x, "mlp", "w_gate"), w.matmul("TD,DF->TF", x, "mlp", "w_up")
    return w.matmul("TF,FD->TD", jax.nn.silu(gate) * up, "mlp", "w_down")


def attention_block(w: LayerWeights, x, cos, sin, kv: KVCache, metadata: AttentionMetadata,
                    config: ModelConfig, attention: AttentionFns):
    """x [T, D] -> (attention output [T, D], cache with this layer's new K/V written)."""
    c = config
    q, key, val = qkv_projections(w, x, c)
    if c.qkv_bias:
        q, key, val = q + w.get("attn", "bq"), key + w.get("attn", "bk"), val + w.get("attn", "bv")
    q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
    k_cache, v_cache = write_kv(kv.k, kv.v, key, val, metadata.slot_mapping, layer=w.layer)
    kwargs = dict(layer=w.layer, sliding_window=c.sliding_window)
    if metadata.decode_only:
        o = attention.paged_attention(q, k_cache, v_cache, metadata.block_tables,
                                      metadata.context_lens, **kwargs)
    else:
        o = attention.ragged_paged_attention(q, k_cache, v_cache, metadata.block_tables,
                                             metadata.context_lens, metadata.query_start_loc,
                                             **kwargs)
    # [T, N*H] x [N*H, D]: one contraction dim, so XLA transposes neither operand
    o = o.reshape(-1, c.num_heads * c.head_dim)
    out = w.matmul("TX,XD->TD", o, "attn", "wo") if w.split else jnp.einsum(
        "TX,XD->TD", o, w.get("attn", "wo").reshape(o.shape[1], c.hidden_size))
    if c.o_bias:
        out = out + w.get("attn", "bo")
    return out, KVCache(k_cache, v_cache)


def decoder_layer(w: LayerWeights, x, kv: KVCache, cos, sin, metadata: AttentionMetadata,
                  config: ModelConfig, dtype, attention: AttentionFns):
    """gpt-fast's two lines: h = x + attn(norm(x)); out = h + mlp(norm(h))."""
    eps = config.rms_norm_eps
    a, kv = attention_block(w, rms_norm(x, w.get("attn_norm", "scale"), eps, dtype), cos, sin, kv,
                            metadata, config, attention)
    h = x + a
    return h + mlp_block(w, rms_norm(h, w.get("mlp_norm", "scale"), eps, dtype), config), kv


class _Params(nn.Module):
    """Declares a group of stacked layer params (leading axis L) and returns them as a dict.

    When applying, the given leaves are returned as they are, so split_layer_weights' form (other
    names, tuples of L arrays) passes through; `self.param` would insist on the stacked shapes.
    """
    specs: tuple   # ((name, shape, initializer), ...)
    dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        if self.is_initializing():
            return {name: self.param(name, init, shape, self.dtype) for name, shape, init in self.specs}
        return dict(self.variables["params"])


def layer_param_specs(c: ModelConfig) -> dict[str, tuple]:
    """Names, stacked shapes [L, ...] and initializers of the layer params, by group."""
    L, d, f, n, k, h = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                        c.num_kv_heads, c.head_dim)
    normal, zeros, ones = nn.initializers.normal(0.02), nn.initializers.zeros, nn.initializers.ones
    attn = [("wq", (L, d, n, h), normal), ("wk", (L, d, k, h), normal), ("wv", (L, d, k, h), normal),
            ("wo", (L, n, h, d), normal)]
    if c.qkv_bias:
        attn += [("bq", (L, n, h), zeros), ("bk", (L, k, h), zeros), ("bv", (L, k, h), zeros)]
    if c.o_bias:
        attn += [("bo", (L, d), zeros)]
    return {"attn": tuple(attn), "attn_norm": (("scale", (L, d), ones),),
            "mlp": (("w_gate", (L, d, f), normal), ("w_up", (L, d, f), normal),
                    ("w_down", (L, f, d), normal)),
            "mlp_norm": (("scale", (L, d), ones),)}


class LayerStack(nn.Module):
    """All decoder layers as one loop over the layer index (compile time does not grow with depth).

    Params are stacked on axis 0 (`layers/attn/wq` [L, D, N, H], ...), as nn.scan would lay them
    out; a loop body is traced once. The whole `[L, ...]` cache rides in the loop carry, so each
    layer reads and writes its pages in place (by layer index).
    """
    config: ModelConfig
    dtype: jnp.dtype
    attention: AttentionFns

    @nn.compact
    def __call__(self, x, kv: KVCache, cos, sin, metadata: AttentionMetadata):
        weights = {group: _Params(specs, self.dtype, name=group)()
                   for group, specs in layer_param_specs(self.config).items()}

        def body(carry, layer):
            x, kv = carry
            w = LayerWeights(weights, layer)
            return decoder_layer(w, x, kv, cos, sin, metadata, self.config, self.dtype,
                                 self.attention), None

        (x, kv), _ = jax.lax.scan(body, (x, kv),
                                  jnp.arange(self.config.num_layers, dtype=jnp.int32))
        return x, kv


class CausalLM(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    attention: AttentionFns = dataclasses.field(default_factory=reference_attention)

    @nn.compact
    def __call__(self, token_ids, positions, kv_cache: KVCache, metadata: AttentionMetadata):
        """token_ids, positions [T] -> (logits [B, V] float32 of each sequence's last token, cache).

        Params: stacked layer weights, or the same tree through `split_layer_weights` (faster).
        """
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         name="embed")
        x = embed(token_ids)                                                  # [T, D]
        cos, sin = rope_cos_sin(c, positions, self.dtype)
        x, kv_cache = LayerStack(c, self.dtype, self.attention, name="layers")(
            x, kv_cache, cos, sin, metadata)
        last = jnp.maximum(metadata.query_start_loc[1:] - 1, 0)              # [B]
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x[last])        # [B, D]
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = x @ self.param("lm_head", nn.initializers.normal(0.02),
                                    (c.hidden_size, c.vocab_size), self.dtype)
        return logits.astype(jnp.float32), kv_cache
