"""The decoder as a functional Flax (linen) module over a paged KV cache: Llama, Mistral, Qwen2/3,
Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE and SmolLM2 differ by config flags (jpaged/config.py) and
small pluggable parts (the norm's offset, the MLP's activation, a dense MLP or a sparse MoE block,
per-layer attention options), not by code.

`CausalLM.apply({"params": params}, token_ids, positions, kv_cache, metadata)` runs a ragged batch of
T new tokens from B sequences (prefill chunks and decodes alike) and returns the logits of each
sequence's last new token plus the updated cache. Layers run as one `lax.scan` over the layer index;
each layer reads its weights through `LayerWeights` (jpaged/models/weights.py: the layout and its
two placements), and the whole `[L, ...]` cache rides in the loop carry, so each layer reads and
writes its pages in place (by layer index) instead of slicing out a per-layer copy.

Shape legend: see jpaged_kernels/reference.py (T, B, N, K, G, H, P, S, L; D model dim, F MLP dim,
V vocab; E experts, Fe an expert's MLP dim, Hr the rotated dims of a head).

NOTE: heterogeneous layers under one scan. Layers that differ (Gemma's sliding and global layers
with their own RoPE bases, MoE on some layers only) stay in the one `lax.scan`: what differs is a
small constant array indexed by the layer (the window, which RoPE table), and an MLP that is dense
on some layers and MoE on others is a `lax.cond` on the layer whose branches read stacks over
their own layers (`LayerWeights` at the index within that subset). Compile time stays flat in
depth; a stack that is uniform passes Python constants, so it compiles exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpaged.config import SLIDING, ModelConfig
from jpaged.models.kv_cache import AttentionFns, AttentionMetadata, KVCache, reference_attention
from jpaged.models.moe import GROUPED_IMPLS, combine, dispatch, route
from jpaged.models.weights import LayerWeights, embedding_rows, project
from jpaged.sampling_params import MAX_LOGPROBS


# A global layer's window when windows differ per layer: past any sequence length.
NO_WINDOW = 1 << 30
MOE_IMPLS = GROUPED_IMPLS + ("dense",)


def rms_norm(x, scale, eps: float, dtype, offset: float = 0.0):
    """RMSNorm over the last axis; `offset` 1 is Gemma's (1 + w), computed in float32 as HF does."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (y * (offset + scale.astype(jnp.float32))).astype(dtype)
    return scale * y.astype(dtype)


def apply_rope(x, cos, sin):
    """x [T, N, H]; cos/sin [T, Hr] (the HF rotate-half layout on the first Hr <= H dims)."""
    rot = cos.shape[-1]
    xr, half = x[..., :rot], rot // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = (xr * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)
    return out if rot == x.shape[-1] else jnp.concatenate([out, x[..., rot:]], axis=-1)


def rope_cos_sin(config: ModelConfig, positions, dtype, local: bool = False):
    """cos, sin [T, Hr] (times LongRoPE's attention factor); `local`: the SLIDING layers' base."""
    inv_freq = jnp.asarray(config.rope_inv_freq(local))                   # [Hr/2]
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [T, Hr/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                       # [T, Hr]
    factor = config.rope_attention_factor()
    return (jnp.cos(emb) * factor).astype(dtype), (jnp.sin(emb) * factor).astype(dtype)


def rope_tables(config: ModelConfig, positions, dtype):
    """(cos, sin) [R, T, Hr]: table 0 the global RoPE, table 1 (only when some SLIDING layer has
    its own base, Gemma 3) the local one; layer_rope picks a layer's."""
    tables = [rope_cos_sin(config, positions, dtype)]
    if any(_uses_local_rope(config)):
        tables.append(rope_cos_sin(config, positions, dtype, local=True))
    return tuple(jnp.stack(parts) for parts in zip(*tables))


def _uses_local_rope(c: ModelConfig) -> tuple[bool, ...]:
    windows = c.layer_windows()
    return tuple(c.local_rope_theta is not None and w is not None for w in windows)


def layer_rope(c: ModelConfig, rope, layer):
    """This layer's (cos, sin) [T, Hr] out of rope_tables'."""
    cos, sin = rope
    if cos.shape[0] == 1:
        return cos[0], sin[0]
    which = jnp.asarray(_uses_local_rope(c), jnp.int32)[layer]
    return cos[which], sin[which]


def layer_window(c: ModelConfig, layer):
    """This layer's sliding window: a Python constant (None or the int) when every layer has
    the same, else a traced int32 (NO_WINDOW on the global layers)."""
    windows = c.layer_windows()
    if len(set(windows)) == 1:
        return windows[0]
    return jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)[layer]


def attention_block(w: LayerWeights, x, rope, kv: KVCache, metadata: AttentionMetadata,
                    c: ModelConfig, attention: AttentionFns, dtype):
    """x [T, D] -> (attention output [T, D], cache with this layer's new K/V written)."""
    group = c.num_heads // c.num_kv_heads
    qkv = w.matmul("TD,DKXH->TKXH", x, "attn", "wqkv")                     # [T, K, G+2, H]
    if w.has("attn", "bqkv"):
        qkv = qkv + w.get("attn", "bqkv")
    q = qkv[:, :, :group].reshape(-1, c.num_heads, c.head_dim)              # [T, N, H]
    key, val = qkv[:, :, group], qkv[:, :, group + 1]                       # [T, K, H]
    if c.qk_norm:
        q = rms_norm(q, w.get("attn", "q_norm"), c.rms_norm_eps, dtype, c.norm_offset)
        key = rms_norm(key, w.get("attn", "k_norm"), c.rms_norm_eps, dtype, c.norm_offset)
    cos, sin = layer_rope(c, rope, w.layer)
    q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
    kv = kv.write(key, val, metadata.slot_mapping, layer=w.layer)
    kwargs = dict(layer=w.layer, sliding_window=layer_window(c, w.layer), **kv.attention_kwargs())
    kwargs.update({k: v for k, v in (("scale", c.attn_scale), ("soft_cap", c.attn_soft_cap))
                   if v is not None})
    if metadata.decode_only:
        o = attention.paged_attention(q, kv.k, kv.v, metadata.block_tables,
                                      metadata.context_lens, **kwargs)
    else:
        o = attention.ragged_paged_attention(q, kv.k, kv.v, metadata.block_tables,
                                             metadata.context_lens, metadata.query_start_loc,
                                             **kwargs)
    # [T, N*H] x [N*H, D]: one contraction dim, so XLA transposes neither operand
    out = w.matmul("TX,XD->TD", o.reshape(-1, c.num_heads * c.head_dim), "attn", "wo")
    if w.has("attn", "bo"):
        out = out + w.get("attn", "bo")
    return out, kv


def activation(name: str):
    """The MLP's gate activation: SwiGLU's silu or GeGLU's tanh-approximated gelu."""
    return {"silu": jax.nn.silu,
            "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}[name]


def mlp_block(w: LayerWeights, x, c: ModelConfig):
    """SwiGLU / GeGLU: (act(x W_gate) * x W_up) W_down, x [T, D] -> [T, D]."""
    gate_up = w.matmul("TD,DXF->TXF", x, "mlp", "w_gate_up")                # [T, 2, F]
    hidden = activation(c.hidden_act)(gate_up[:, 0]) * gate_up[:, 1]
    return w.matmul("TF,FD->TD", hidden, "mlp", "w_down")


def moe_block(w: LayerWeights, x, c: ModelConfig, *, impl: str = "auto",
              num_local_experts: int | None = None, first_expert=0):
    """Sparse MoE, x [T, D] -> [T, D]: each token through its top-k experts only, their outputs
    summed with the routing weights (jpaged/models/moe.py). Under expert parallelism this runs
    per device on its `num_local_experts` experts from `first_expert`, giving partial sums.
    `impl="dense"`: every token through every expert (the baseline of benchmarks/moe.py)."""
    act = activation(c.hidden_act)
    weights, experts = route(w.matmul("TD,DE->TE", x, "moe", "router"), c.num_experts_per_tok,
                             c.norm_topk_prob)                              # [T, k] each
    if impl == "dense":
        mix = jnp.zeros((x.shape[0], c.num_experts), jnp.float32).at[
            jnp.arange(x.shape[0])[:, None], experts].set(weights)          # [T, E]
        gate_up = w.matmul("TD,EDXF->TEXF", x, "moe", "w_gate_up")           # [T, E, 2, Fe]
        y = w.matmul("TEF,EFD->TED", act(gate_up[:, :, 0]) * gate_up[:, :, 1], "moe", "w_down")
        return jnp.einsum("TED,TE->TD", y, mix.astype(y.dtype))
    d = dispatch(weights, experts, num_local_experts or c.num_experts, first_expert)
    gate_up = w.expert_matmul(x[d.token], d.group_sizes, "moe", "w_gate_up", impl)  # [M, 2, Fe]
    y = w.expert_matmul(act(gate_up[:, 0]) * gate_up[:, 1], d.group_sizes, "moe", "w_down", impl)
    return combine(y, d, x.shape[0])                                          # [T, D]


def feed_forward(layers, layer, x, c: ModelConfig, moe, lora=None):
    """The layer's MLP: dense, MoE, or (MoE on some layers only) a lax.cond between the two,
    each reading its stack at the layer's index within its own layers (see the NOTE above).
    `lora` (a LoRABatch) applies to dense models only."""
    moe_ids, dense_ids = c.moe_layer_ids(), c.dense_layer_ids()
    if not moe_ids:
        return mlp_block(LayerWeights(layers, layer, lora), x, c)
    if not dense_ids:
        return moe(LayerWeights(layers, layer), x, c)
    index = jnp.asarray([moe_ids.index(i) if i in moe_ids else dense_ids.index(i)
                         for i in range(c.num_layers)], jnp.int32)[layer]
    is_moe = jnp.asarray([i in moe_ids for i in range(c.num_layers)])[layer]
    return jax.lax.cond(is_moe, lambda x: moe(LayerWeights(layers, index), x, c),
                        lambda x: mlp_block(LayerWeights(layers, index), x, c), x)


def decoder_layer(layers, layer, x, kv: KVCache, rope, metadata: AttentionMetadata,
                  c: ModelConfig, dtype, attention: AttentionFns, moe, lora=None):
    """gpt-fast's two lines: h = x + attn(norm(x)); out = h + mlp(norm(h)); Gemma also norms
    each branch's output (post_norms) before adding it. `lora`: a LoRABatch or None."""
    w = LayerWeights(layers, layer, lora)

    def norm(h, group):
        return rms_norm(h, w.get(group, "scale"), c.rms_norm_eps, dtype, c.norm_offset)
    a, kv = attention_block(w, norm(x, "attn_norm"), rope, kv, metadata, c, attention, dtype)
    h = x + (norm(a, "post_attn_norm") if c.post_norms else a)
    m = feed_forward(layers, layer, norm(h, "mlp_norm"), c, moe, lora)
    return h + (norm(m, "post_mlp_norm") if c.post_norms else m), kv


def soft_capped(head, cap: float | None):
    """The LM head with Gemma 2's final logit soft cap, cap * tanh(logits / cap) (None: as is)."""
    if cap is None:
        return head
    return lambda h: cap * jnp.tanh(head(h) / cap)


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
    unit = zeros if c.norm_offset else ones           # a norm scale that multiplies by 1
    attn = {"wqkv": ((L, d, k, g + 2, h), normal), "wo": ((L, n * h, d), normal)}
    if c.qkv_bias:
        attn["bqkv"] = ((L, k, g + 2, h), zeros)
    if c.o_bias:
        attn["bo"] = ((L, d), zeros)
    if c.qk_norm:
        attn["q_norm"], attn["k_norm"] = ((L, h), unit), ((L, h), unit)
    specs = {"attn": attn, "attn_norm": {"scale": ((L, d), unit)},
             "mlp_norm": {"scale": ((L, d), unit)}}
    if c.post_norms:
        specs["post_attn_norm"] = specs["post_mlp_norm"] = {"scale": ((L, d), unit)}
    num_dense, num_moe = len(c.dense_layer_ids()), len(c.moe_layer_ids())
    if num_dense:
        specs["mlp"] = {"w_gate_up": ((num_dense, d, 2, f), normal),
                        "w_down": ((num_dense, f, d), normal)}
    if num_moe:
        e, fe = c.num_experts, c.moe_intermediate_size
        specs["moe"] = {"router": ((num_moe, d, e), normal),
                        "w_gate_up": ((num_moe, e, d, 2, fe), normal),
                        "w_down": ((num_moe, e, fe, d), normal)}
    return specs


class CausalLM(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    attention: AttentionFns = dataclasses.field(default_factory=reference_attention)
    # the MoE block: None is moe_block with `moe_impl` ("auto": the grouped matmul for the
    # platform; "dense" for benchmarks); tensor parallelism passes its expert-parallel wrapper
    moe: Callable | None = None
    moe_impl: str = "auto"

    @nn.compact
    def __call__(self, token_ids, positions, kv_cache: KVCache, metadata: AttentionMetadata,
                 logprob_targets=None, lora=None, logits_indices=None):
        """token_ids, positions [T] -> (logits [B, V] float32 of each sequence's last token, cache).

        Params: the layout of jpaged/models/weights.py, the layer stack in either placement.
        `logprob_targets` [T] int32 (prompt log-probabilities): for each new token, the token that
        follows it (-1: none wanted); a third result, TokenLogprobs, then holds their log-probs.
        `lora`: a LoRABatch (jpaged/models/lora.py), each token's adapter delta on every
        projection. `logits_indices` [R] int32 (speculative decoding): the logits are those of
        these tokens, [R, V], instead of each sequence's last.
        """
        c = self.config
        # NOTE: the embedding table, the LM head and the layer stack are variables, not Flax
        # params: at init they are drawn with their float shapes; at apply they are taken as
        # given, quantized (QuantizedWeight) and the layer stack stacked or per layer.
        embedding = self.variable("params", "embed", lambda: {"embedding": self._normal(
            (c.vocab_size, c.hidden_size))}).value["embedding"]
        layers = self.variable("params", "layers", self._init_layers).value
        x = embedding_rows(embedding, token_ids, self.dtype)                  # [T, D]
        if c.embed_scale is not None:                                        # Gemma: sqrt(D)
            x = x * jnp.asarray(c.embed_scale, self.dtype)
        rope = rope_tables(c, positions, self.dtype)
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        moe = self.moe or functools.partial(moe_block, impl=self.moe_impl)

        def body(carry, layer):
            x, kv = carry
            return decoder_layer(layers, layer, x, kv, rope, metadata, c, self.dtype,
                                 self.attention, moe, lora), None

        (x, kv_cache), _ = jax.lax.scan(body, (x, kv_cache),
                                        jnp.arange(c.num_layers, dtype=jnp.int32))
        last = jnp.maximum(metadata.query_start_loc[1:] - 1, 0) \
            if logits_indices is None else logits_indices                    # [B] or [R]
        scale = self.param("norm", lambda key: {"scale": jnp.ones((c.hidden_size,), self.dtype)})
        if c.tie_word_embeddings:
            head = lambda h: project(h, embedding, transposed=True)          # noqa: E731
        else:
            lm_head = self.variable("params", "lm_head", lambda: self._normal(
                (c.hidden_size, c.vocab_size))).value
            head = lambda h: project(h, lm_head)                              # noqa: E731
        head = soft_capped(head, c.final_soft_cap)
        norm = lambda h: rms_norm(h, scale["scale"], c.rms_norm_eps, self.dtype,  # noqa: E731
                                  c.norm_offset)
        logits = head(norm(x[last])).astype(jnp.float32)                     # [B, V]
        if logprob_targets is None:
            return logits, kv_cache
        return logits, kv_cache, token_logprobs(norm(x), logprob_targets, head)

    def _normal(self, shape):
        return nn.initializers.normal(0.02)(self.make_rng("params"), shape, self.dtype)

    def _init_layers(self) -> dict:
        key = self.make_rng("params")
        specs = layer_param_specs(self.config)
        keys = iter(jax.random.split(key, sum(map(len, specs.values()))))
        return {group: {name: init(next(keys), shape, self.dtype)
                        for name, (shape, init) in leaves.items()}
                for group, leaves in specs.items()}
