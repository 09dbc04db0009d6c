"""The model's weights: one layout, two placements of the layer stack, one accessor.

Layout (what `jpaged convert` stores, `jpaged.load` returns and the engine holds; shape legend in
jpaged_kernels/reference.py, G = N // K query heads per KV head):

  embed/embedding [V, D]      norm/scale [D]      lm_head [D, V] (untied models)
  layers/attn_norm/scale, layers/mlp_norm/scale       [L, D]
  layers/attn/wqkv  [L, D, K, G+2, H]   q, k, v fused by KV head: [..., k, :G, :] are the G query
                                        heads of KV head k, [..., k, G, :] its key, [..., k, G+1, :]
                                        its value
  layers/attn/bqkv  [L, K, G+2, H]      (qkv_bias) the same grouping
  layers/attn/wo    [L, N*H, D]         layers/attn/bo [L, D] (o_bias)
  layers/mlp/w_gate_up [L, D, 2, F]     [..., 0, :] gate, [..., 1, :] up
  layers/mlp/w_down    [L, F, D]
Optional leaves, by architecture (ModelConfig flags; sharding rules in jpaged/parallel.py):
  layers/attn/q_norm, layers/attn/k_norm [L, H]       (qk_norm: Qwen3, Gemma 3) RMSNorm scales
                                        applied to every q / k head before RoPE; replicated
  layers/post_attn_norm/scale, layers/post_mlp_norm/scale [L, D]   (post_norms: Gemma 2/3) the
                                        norms of the attention and MLP outputs; replicated
  Mixture of experts (num_experts E > 0), stacked over the Lm MoE layers (config.moe_layer_ids;
  usually all L), Fe = moe_intermediate_size:
  layers/moe/router    [Lm, D, E]       router logits = x @ router; replicated
  layers/moe/w_gate_up [Lm, E, D, 2, Fe]  each expert's fused gate and up, as w_gate_up
  layers/moe/w_down    [Lm, E, Fe, D]   each expert's down projection
                                        expert parallel: both split by E; tensor parallel: by Fe
  and then layers/mlp/* stack over the Ld = L - Lm dense layers only (absent when Ld = 0).
  A model reads a stack over a subset of layers through a LayerWeights whose `layer` is the
  index within that subset (decoder.py).

NOTE: why fused and grouped by KV head. q, k, v (and gate, up) share their input, so one matmul
reads x once; and tensor parallelism splits wqkv along K (w_gate_up along F), so every device holds
whole query groups with their own KV head and nothing is resharded (jpaged/parallel.py).

Placement of the layer stack, chosen once per params tree by `arrange_layers` (at load, and for
`update_params`):
  stacked    every layer leaf is one [L, ...] array, read by a dynamic index inside the layer loop
             (GPU, TPU, any sharded params);
  per layer  each matmul weight is a tuple of L arrays (one CPU device).
NOTE: why per layer on CPU. Under a loop over layers, `W[layer]` of a stacked weight is a dynamic
slice that XLA:CPU copies into a fresh buffer before the matmul: every step copied all layer
weights (~425 MB for SmolLM2), so batch-1 decode ran at copy bandwidth, not read bandwidth. With
one buffer per layer, the matmul picks its buffer with a `lax.switch` whose branches are the
matmul itself, which then reads the weight in place.

The model reads every layer weight through `LayerWeights` (`matmul`, `get`), the one place that
knows the placement; quantized weights plug in there too.

Quantized weights (`quantize_params`; jpaged_kernels/quantization.py): the matmul weights (wqkv,
wo, w_gate_up, w_down, lm_head, and the embedding table) become `QuantizedWeight`s, which store
each weight with its input axis last: wqkv [L, K, G+2, H, D], wo [L, D, N*H], w_gate_up
[L, 2, F, D], w_down [L, D, F], lm_head [V, D], embedding [V, D] (unchanged), plus scales (and
mins) per group of input values. Norm scales and biases stay float.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpaged_kernels.quantization import (QuantizedWeight, dequantize, quantize, quantized_matmul,
                                         widened)

LAYER_MATMULS = ("wqkv", "wo", "w_gate_up", "w_down")   # split per layer on one CPU device
# The input (contraction) axis of each matmul weight in its float layout (weights.py's docstring),
# counted without the stacked layer axis.
INPUT_AXIS = {("attn", "wqkv"): 0, ("attn", "wo"): 0, ("mlp", "w_gate_up"): 0,
              ("mlp", "w_down"): 0, ("lm_head",): 0, ("embed", "embedding"): 1}


def _is_leaf(x) -> bool:
    return isinstance(x, (tuple, QuantizedWeight))


def reads_in_place(params) -> bool:
    """Whether `params` live on one CPU device (then the matmul weights go per layer)."""
    leaves = jax.tree.leaves(params)
    return bool(leaves) and all(
        isinstance(leaf, jax.Array) and len(leaf.devices()) == 1
        and next(iter(leaf.devices())).platform == "cpu" for leaf in leaves)


def is_per_layer(params) -> bool:
    return any(isinstance(leaf, tuple) for leaf in _layer_leaves(params).values())


def arrange_layers(params, per_layer: bool | None = None) -> dict:
    """`params` with the layer stack placed stacked or per layer (see the module docstring);
    `per_layer=None` chooses by where the params live (`reads_in_place`). Idempotent.

    On a CPU device each layer's buffer is made from a zero-copy NumPy view of the stacked array
    (one device_put per layer, no per-shape compilation); NumPy leaves stay NumPy (update_params
    places them)."""
    if per_layer is None:
        per_layer = reads_in_place(params)
    layers = {group: dict(leaves) for group, leaves in params["layers"].items()}
    for group, leaves in layers.items():
        for name, leaf in leaves.items():
            if per_layer and name in LAYER_MATMULS and not isinstance(leaf, tuple):
                leaves[name] = _unstack(leaf)
            elif not per_layer and isinstance(leaf, tuple):
                leaves[name] = _stack(leaf)
    return {**params, "layers": layers}


def _stack(layers: tuple):
    """L per-layer leaves (arrays or QuantizedWeights) -> one stacked leaf."""
    def stack(*parts):
        return jnp.stack(parts) if isinstance(parts[0], jax.Array) else np.stack(parts)
    return jax.tree.map(stack, *layers)


def stacked_shapes(params):
    """`params` as ShapeDtypeStructs in the stacked placement (a per-layer tuple of L arrays
    [...] is described as one [L, ...] leaf), whichever placement it has; nothing is copied."""
    def shape(leaf, num_layers=None):
        lead = () if num_layers is None else (num_layers,)
        return jax.ShapeDtypeStruct((*lead, *np.shape(leaf)), leaf.dtype)

    def describe(leaf):
        if isinstance(leaf, tuple):
            return jax.tree.map(lambda x: shape(x, len(leaf)), leaf[0])
        return jax.tree.map(shape, leaf)
    return jax.tree.map(describe, params, is_leaf=_is_leaf)


def _is_tuple_of_arrays(x) -> bool:
    return isinstance(x, tuple)


def _layer_leaves(params) -> dict:
    return {(group, name): leaf for group, leaves in params.get("layers", {}).items()
            for name, leaf in leaves.items()}


def _unstack(leaf) -> tuple:
    if isinstance(leaf, QuantizedWeight):
        fields = jax.tree.map(_unstack, leaf)             # the same, field by field
        return tuple(jax.tree.map(lambda f, i=i: f[i], fields, is_leaf=_is_tuple_of_arrays)
                     for i in range(leaf.values.shape[0]))
    num_layers = leaf.shape[0]
    if isinstance(leaf, np.ndarray):
        return tuple(leaf[i] for i in range(num_layers))
    if all(device.platform == "cpu" for device in leaf.devices()):
        host = np.asarray(leaf)
        return tuple(jax.device_put(host[i], leaf.sharding) for i in range(num_layers))
    return tuple(leaf[i] for i in range(num_layers))


def _expert_product(rows, expert, experts, *, layer):
    """rows @ experts[layer][expert], the expert's [In, *out] weight seen as [In, Out]."""
    w = jax.lax.dynamic_index_in_dim(experts[layer], expert, keepdims=False)
    return rows @ w.reshape(w.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One layer's view of the layer stack, whichever placement it has."""
    weights: dict      # {"attn": {...}, "mlp": {...}, "attn_norm": {...}, "mlp_norm": {...}}
    layer: jax.Array   # scalar int32
    lora: Any = None   # a LoRABatch (jpaged/models/lora.py): its delta joins each matmul's output

    def expert_matmul(self, x, group_sizes, group: str, name: str, impl: str = "auto"):
        """The grouped matmul of jpaged/models/moe.py: x [M, In] rows sorted by expert (the
        first group_sizes[0] rows are expert 0's, ...), W[layer] [E, In, *out] -> [M, *out], each
        row through its own expert only. Per layer, each block's product picks its layer's
        buffer with a `lax.switch` whose branches are the product, reading it in place."""
        from jpaged.models.moe import grouped_matmul
        w = self.weights[group][name]
        if isinstance(w, tuple):
            branches = [functools.partial(_expert_product, layer=i) for i in range(len(w))]
            shape = w[0].shape

            def product(rows, expert):
                return jax.lax.switch(self.layer, branches, rows, expert, w)
        else:
            shape = w.shape[1:]

            def product(rows, expert):
                return rows @ w[self.layer, expert].reshape(shape[1], -1)

        def layer_weight():
            weight = self.get(group, name)
            return weight.reshape(*weight.shape[:2], -1)
        return grouped_matmul(x, group_sizes, product, layer_weight, out_shape=shape[2:],
                              impl=impl)

    def has(self, group: str, name: str) -> bool:
        return name in self.weights[group]

    def get(self, group: str, name: str):
        """The layer's slice of a leaf (a norm scale, a bias, or a weight)."""
        w = self.weights[group][name]
        if isinstance(w, tuple):
            return jax.lax.switch(self.layer, [functools.partial(_pick, i) for i in range(len(w))],
                                  w)
        return jax.lax.dynamic_index_in_dim(w, self.layer, keepdims=False)

    def matmul(self, spec: str, x, group: str, name: str):
        """einsum(spec, x, W[layer]) for x [T, D_in] and the float W [D_in, *out] (or its
        QuantizedWeight), reading W[layer] in place when the stack is per layer; plus the LoRA
        delta of each token's adapter when the step has adapters (jpaged/models/lora.py)."""
        w = self.weights[group][name]
        if not isinstance(w, tuple):
            y = _matmul(spec, x, jax.tree.map(
                lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, keepdims=False), w))
        else:
            branches = [functools.partial(_matmul_layer, spec, layer=i) for i in range(len(w))]
            y = jax.lax.switch(self.layer, branches, x, w)
        delta = None if self.lora is None else self.lora.delta(self.layer, group, name, x)
        return y if delta is None else y + delta.astype(y.dtype)


def _pick(i, leaves):
    return leaves[i]


def _matmul_layer(spec, x, weights, *, layer):
    return _matmul(spec, x, weights[layer])


def _matmul(spec, x, w):
    if isinstance(w, QuantizedWeight):
        return quantized_matmul(x, w).astype(x.dtype)
    return jnp.einsum(spec, x, w)


def embedding_rows(table, token_ids, dtype):
    """The embedding rows of `token_ids`: table [V, D] float, or its QuantizedWeight."""
    if isinstance(table, QuantizedWeight):
        return dequantize(table[token_ids], dtype)
    return jnp.take(table, token_ids, axis=0).astype(dtype)


def project(x, w, transposed: bool = False):
    """x [T, D] @ w [D, V] (or @ w.T for w [V, D], `transposed`: the tied embedding); a
    QuantizedWeight stores [V, D] either way."""
    if isinstance(w, QuantizedWeight):
        return quantized_matmul(x, w).astype(x.dtype)
    return x @ (w.T if transposed else w).astype(x.dtype)


def held_for_platform(params, platform: str | None = None):
    """`params` as the platform runs them fastest: on CPU, quantized weights `widened` (4-bit
    values as int8, float32 scales; see jpaged_kernels/quantization.py); elsewhere unchanged."""
    if (platform or jax.default_backend()) != "cpu":
        return params
    return jax.tree.map(lambda leaf: widened(leaf) if isinstance(leaf, QuantizedWeight) else leaf,
                        params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


# ---- quantization of a params tree ------------------------------------------------------------
def quantize_params(params, kind: str, group_size: int | None = None) -> dict:
    """`params` (this layout, stacked) with every matmul weight quantized as `kind` (jpaged's
    `jpaged.quantize`; see jpaged_kernels/quantization.py for the kinds). Pure: jit it, or run it
    leaf by leaf on the host (NumPy leaves are quantized with NumPy)."""
    def visit(path, leaf):
        key = _matmul_key(path)
        if key is None or isinstance(leaf, QuantizedWeight):
            return leaf
        lead = 1 if key[0] in ("attn", "mlp") else 0
        xp = np if isinstance(leaf, np.ndarray) else jnp
        return quantize(xp.moveaxis(leaf, lead + INPUT_AXIS[key], -1),
                        table_kind(key, kind), group_size)
    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_leaf)


def table_kind(key: tuple[str, ...], kind: str) -> str:
    """The vocabulary tables (embedding, LM head) take int8 where the layers take int4: every
    token's row enters the residual stream or the logits directly, and 4 bits there cost most of
    int4's error (measured on SmolLM2: max logit error 0.55 with an int8 table, 5.2 with int4)."""
    return "int8" if kind == "int4" and key in (("embed", "embedding"), ("lm_head",)) else kind


def dequantize_params(params, dtype=jnp.float32) -> dict:
    """The float layout back from quantize_params' (stacked), e.g. to compare or fine-tune."""
    def visit(path, leaf):
        if not isinstance(leaf, QuantizedWeight):
            return leaf
        key = _matmul_key(path)
        lead = 1 if key[0] in ("attn", "mlp") else 0
        return jnp.moveaxis(dequantize(leaf, dtype), -1, lead + INPUT_AXIS[key])
    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_leaf)


def _matmul_key(path) -> tuple[str, ...] | None:
    names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for key in INPUT_AXIS:
        if names[-len(key):] == key:
            return key
    return None
