"""The decoder as a functional Flax (linen) module over a paged KV cache: Llama, Mistral, Qwen2 and
SmolLM2 differ by config flags, not by code.

`CausalLM.apply({"params": params}, token_ids, positions, kv_cache, metadata)` runs a ragged batch of
T new tokens from B sequences (prefill chunks and decodes alike) and returns the logits of each
sequence's last new token plus the updated cache. Layers run as one `lax.scan` over the layer index;
each layer reads its weights through `LayerWeights` (jpaged/models/weights.py: the layout and its
two placements), and the whole `[L, ...]` cache rides in the loop carry, so each layer reads and
writes its pages in place (by layer index) instead of slicing out a per-layer copy.

Shape legend: see jpaged_kernels/reference.py (T, B, N, K, G, H, P, S, L; D model dim, F MLP dim,
V vocab).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpaged.config import ModelConfig
from jpaged.models.kv_cache import AttentionFns, AttentionMetadata, KVCache, reference_attention
from jpaged.models.weights import LayerWeights
from jpaged.sampling_params import MAX_LOGPROBS
from jpaged_kernels import write_kv


def rms_norm(x, scale, eps: float, dtype):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * y.astype(dtype)


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


def attention_block(w: LayerWeights, x, cos, sin, kv: KVCache, metadata: AttentionMetadata,
                    c: ModelConfig, attention: AttentionFns):
    """x [T, D] -> (attention output [T, D], cache with this layer's new K/V written)."""
    group = c.num_heads // c.num_kv_heads
    qkv = w.matmul("TD,DKXH->TKXH", x, "attn", "wqkv")                     # [T, K, G+2, H]
    if w.has("attn", "bqkv"):
        qkv = qkv + w.get("attn", "bqkv")
    q = qkv[:, :, :group].reshape(-1, c.num_heads, c.head_dim)              # [T, N, H]
    key, val = qkv[:, :, group], qkv[:, :, group + 1]                       # [T, K, H]
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
    out = w.matmul("TX,XD->TD", o.reshape(-1, c.num_heads * c.head_dim), "attn", "wo")
    if w.has("attn", "bo"):
        out = out + w.get("attn", "bo")
    return out, KVCache(k_cache, v_cache)


def mlp_block(w: LayerWeights, x):
    """SwiGLU: (silu(x W_gate) * x W_up) W_down, x [T, D] -> [T, D]."""
    gate_up = w.matmul("TD,DXF->TXF", x, "mlp", "w_gate_up")                # [T, 2, F]
    return w.matmul("TF,FD->TD", jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], "mlp", "w_down")


def decoder_layer(w: LayerWeights, x, kv: KVCache, cos, sin, metadata: AttentionMetadata,
                  c: ModelConfig, dtype, attention: AttentionFns):
    """gpt-fast's two lines: h = x + attn(norm(x)); out = h + mlp(norm(h))."""
    eps = c.rms_norm_eps
    a, kv = attention_block(w, rms_norm(x, w.get("attn_norm", "scale"), eps, dtype), cos, sin,
                            kv, metadata, c, attention)
    h = x + a
    return h + mlp_block(w, rms_norm(h, w.get("mlp_norm", "scale"), eps, dtype)), kv


@dataclasses.dataclass
class TokenLogprobs:
    """Per token t of a step: the log-prob of logprob_targets[t] under the logits at t, its rank
    (1 = the most likely), and the top K (K = MAX_LOGPROBS) tokens and their log-probs."""
    logprobs: jax.Array        # [T] float32
    ranks: jax.Array           # [T] int32
    top_ids: jax.Array         # [T, K] int32
    top_logprobs: jax.Array    # [T, K] float32


jax.tree_util.register_dataclass(TokenLogprobs, data_fields=["logprobs", "ranks", "top_ids",
                                                             "top_logprobs"], meta_fields=[])


def token_logprobs(x, targets, head, chunk: int = 128, top_k: int = MAX_LOGPROBS) -> TokenLogprobs:
    """x [T, D] (final-normed hidden states), targets [T] -> TokenLogprobs, the [chunk, V] logits
    made and reduced a chunk of tokens at a time (never all [T, V] at once)."""
    num_tokens = x.shape[0]
    size = min(chunk, num_tokens)
    pad = -num_tokens % size
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, size, x.shape[1])
    ts = jnp.pad(targets, (0, pad), constant_values=-1).reshape(-1, size)

    def one(args):
        h, t = args
        lp = jax.nn.log_softmax(head(h).astype(jnp.float32), axis=-1)            # [C, V]
        target = jnp.take_along_axis(lp, jnp.maximum(t, 0)[:, None], axis=-1)[:, 0]
        rank = 1 + jnp.sum(lp > target[:, None], axis=-1).astype(jnp.int32)
        top_lp, top_ids = jax.lax.top_k(lp, top_k)
        return target, rank, top_ids.astype(jnp.int32), top_lp

    out = jax.lax.map(one, (xs, ts))
    return TokenLogprobs(*(a.reshape(-1, *a.shape[2:])[:num_tokens] for a in out))


def layer_param_specs(c: ModelConfig) -> dict[str, dict[str, tuple]]:
    """The layer stack's leaves, by group: name -> (stacked shape [L, ...], initializer)."""
    L, d, f, n, k, h = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                        c.num_kv_heads, c.head_dim)
    g = n // k
    normal, zeros, ones = nn.initializers.normal(0.02), nn.initializers.zeros, nn.initializers.ones
    attn = {"wqkv": ((L, d, k, g + 2, h), normal), "wo": ((L, n * h, d), normal)}
    if c.qkv_bias:
        attn["bqkv"] = ((L, k, g + 2, h), zeros)
    if c.o_bias:
        attn["bo"] = ((L, d), zeros)
    return {"attn": attn, "attn_norm": {"scale": ((L, d), ones)},
            "mlp": {"w_gate_up": ((L, d, 2, f), normal), "w_down": ((L, f, d), normal)},
            "mlp_norm": {"scale": ((L, d), ones)}}


class CausalLM(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    attention: AttentionFns = dataclasses.field(default_factory=reference_attention)

    @nn.compact
    def __call__(self, token_ids, positions, kv_cache: KVCache, metadata: AttentionMetadata,
                 logprob_targets=None):
        """token_ids, positions [T] -> (logits [B, V] float32 of each sequence's last token, cache).

        Params: the layout of jpaged/models/weights.py, the layer stack in either placement.
        `logprob_targets` [T] int32 (prompt log-probabilities): for each new token, the token that
        follows it (-1: none wanted); a third result, TokenLogprobs, then holds their log-probs.
        """
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         name="embed")
        # NOTE: the layer stack is one variable holding a dict of groups: at init it is drawn with
        # the stacked shapes; at apply it is taken as given, stacked or per layer (a Flax param
        # would insist on the stacked shapes).
        layers = self.variable("params", "layers", self._init_layers).value
        x = embed(token_ids)                                                  # [T, D]
        cos, sin = rope_cos_sin(c, positions, self.dtype)

        def body(carry, layer):
            x, kv = carry
            return decoder_layer(LayerWeights(layers, layer), x, kv, cos, sin, metadata, c,
                                 self.dtype, self.attention), None

        (x, kv_cache), _ = jax.lax.scan(body, (x, kv_cache),
                                        jnp.arange(c.num_layers, dtype=jnp.int32))
        last = jnp.maximum(metadata.query_start_loc[1:] - 1, 0)              # [B]
        scale = self.param("norm", lambda key: {"scale": jnp.ones((c.hidden_size,), self.dtype)})
        if c.tie_word_embeddings:
            head = embed.attend
        else:
            lm_head = self.param("lm_head", nn.initializers.normal(0.02),
                                 (c.hidden_size, c.vocab_size), self.dtype)
            head = lambda h: h @ lm_head                                      # noqa: E731
        norm = lambda h: rms_norm(h, scale["scale"], c.rms_norm_eps, self.dtype)  # noqa: E731
        logits = head(norm(x[last])).astype(jnp.float32)                     # [B, V]
        if logprob_targets is None:
            return logits, kv_cache
        return logits, kv_cache, token_logprobs(norm(x), logprob_targets, head)

    def _init_layers(self) -> dict:
        key = self.make_rng("params")
        specs = layer_param_specs(self.config)
        keys = iter(jax.random.split(key, sum(map(len, specs.values()))))
        return {group: {name: init(next(keys), shape, self.dtype)
                        for name, (shape, init) in leaves.items()}
                for group, leaves in specs.items()}
