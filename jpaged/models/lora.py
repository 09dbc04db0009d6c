"""LoRA deltas for a whole ragged batch in one jitted step, each token through its own adapter.

Device layout ("slotted"): the adapter layout of jpaged/lora/__init__.py with a slot axis S next
to the rank axis R, so S adapters sit side by side:

  qkv_a [L, D, 3, S, R]   q_b [L, S, R, K, G, H]   k_b, v_b [L, S, R, K, H]
  o_a [L, N*H, S, R]      o_b [L, S, R, D]
  gate_up_a [L, D, 2, S, R]   gate_b, up_b [L, S, R, F]
  down_a [L, F, S, R]     down_b [L, S, R, D]

(on one CPU device each leaf is a tuple of L per-layer arrays, read in place like the base
weights: jpaged/models/weights.py). `token_slots [T]` picks each token's adapter: 0 = none, s =
slot s - 1 of the arrays (the "no adapter" slot 0 has no storage: it is the all-zero mask).

NOTE: the batched product (BGMV/SGMV's job). x @ A for all slots at once is one matmul
[T, In] x [In, S*R]; the [T, S, R] result is masked to each token's own slot (one-hot), and
that times B [S*R, Out] is one more matmul: each token gets exactly x @ A_s @ B_s, and the
whole mixed batch is two dense products per target whose width is S*R (S*16 = 64 for 4 adapters
of rank 16), beside the base matmul's In x Out. Which adapter sits in which slot is data, so
loading, evicting or updating adapters never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class LoRABatch:
    weights: dict              # the slotted layout (module docstring), stacked or per layer
    token_slots: jax.Array     # [T] int32, 0 = no adapter, s = slot s - 1

    def delta(self, layer, group: str, name: str, x):
        """The LoRA delta of base matmul (group, name) for x [T, In], shaped like its output;
        None for a matmul without LoRA (MoE experts, routers). Per layer, one `lax.switch` over
        the layers runs the whole delta with that layer's buffers, read in place."""
        fn = _DELTAS.get((group, name))
        if fn is None:
            return None
        num_slots = _num_slots(self.weights)
        mask = (self.token_slots[:, None] == jnp.arange(1, num_slots + 1)).astype(x.dtype)
        leaves = {leaf: self.weights[leaf] for leaf in _LEAVES[(group, name)]}
        if not isinstance(leaves[next(iter(leaves))], tuple):
            return fn(_einsum({k: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
                               for k, w in leaves.items()}), x, mask)
        num_layers = len(leaves[next(iter(leaves))])
        branches = [functools.partial(_delta_at, fn, i) for i in range(num_layers)]
        return jax.lax.switch(layer, branches, x, mask, leaves)


def _delta_at(fn, layer: int, x, mask, leaves):
    return fn(_einsum({k: w[layer] for k, w in leaves.items()}), x, mask)


def _einsum(weights: dict):
    """mm(spec, h, leaf) = einsum(spec, h, weights[leaf])."""
    return lambda spec, h, leaf: jnp.einsum(spec, h, weights[leaf])


jax.tree_util.register_dataclass(LoRABatch, data_fields=["weights", "token_slots"],
                                 meta_fields=[])


def _qkv(mm, x, mask):
    h = mm("TD,DXSR->TXSR", x, "qkv_a") * mask[:, None, :, None]
    dq = mm("TSR,SRKGH->TKGH", h[:, 0], "q_b")
    dk = mm("TSR,SRKH->TKH", h[:, 1], "k_b")
    dv = mm("TSR,SRKH->TKH", h[:, 2], "v_b")
    return jnp.concatenate([dq, dk[:, :, None], dv[:, :, None]], axis=2)     # [T, K, G+2, H]


def _gate_up(mm, x, mask):
    h = mm("TD,DXSR->TXSR", x, "gate_up_a") * mask[:, None, :, None]
    return jnp.stack([mm("TSR,SRF->TF", h[:, 0], "gate_b"),
                      mm("TSR,SRF->TF", h[:, 1], "up_b")], axis=1)          # [T, 2, F]


def _single(a: str, b: str):
    def delta(mm, x, mask):
        h = mm("TX,XSR->TSR", x, a) * mask[:, :, None]
        return mm("TSR,SRD->TD", h, b)
    return delta


_DELTAS = {("attn", "wqkv"): _qkv, ("attn", "wo"): _single("o_a", "o_b"),
           ("mlp", "w_gate_up"): _gate_up, ("mlp", "w_down"): _single("down_a", "down_b")}
_LEAVES = {("attn", "wqkv"): ("qkv_a", "q_b", "k_b", "v_b"), ("attn", "wo"): ("o_a", "o_b"),
           ("mlp", "w_gate_up"): ("gate_up_a", "gate_b", "up_b"),
           ("mlp", "w_down"): ("down_a", "down_b")}


def _num_slots(weights) -> int:
    b = weights["o_b"]
    return (b[0] if isinstance(b, tuple) else b[0]).shape[0]


def slot_axis(name: str, ndim: int, per_layer: bool) -> int:
    """The slot axis of a slotted leaf of `ndim` dims (per layer: without the L axis)."""
    if name.endswith("_a"):
        return ndim - 2
    return 0 if per_layer else 1


def slotted(adapter: dict) -> dict:
    """One adapter (jpaged/lora's layout, [L, ...]) as a slotted layout with S = 1."""
    return {name: jnp.expand_dims(jnp.asarray(w), slot_axis(name, np.ndim(w) + 1, False))
            for name, w in adapter.items()}


def stack_adapters(adapters: list[dict]) -> dict:
    """Several adapters (jpaged/lora's layout, same rank) as one slotted layout, adapter i in
    slot i (token slot i + 1)."""
    return {name: jnp.stack([jnp.asarray(a[name]) for a in adapters],
                            axis=slot_axis(name, np.ndim(adapters[0][name]) + 1, False))
            for name in adapters[0]}


def zeros_slotted(shapes: dict[str, tuple], num_slots: int, dtype, per_layer: bool,
                  device=None) -> dict:
    """Empty device slots: `shapes` are the adapter layout's ([L, ...], lora_shapes), each leaf
    stacked with S = num_slots, or split into a tuple of L per-layer arrays."""
    out = {}
    for name, shape in shapes.items():
        full = list(shape)
        full.insert(slot_axis(name, len(shape) + 1, False), num_slots)
        if per_layer:
            out[name] = tuple(jax.device_put(np.zeros(full[1:], dtype), device)
                              for _ in range(shape[0]))
        else:
            out[name] = jax.device_put(np.zeros(full, dtype), device)
    return out


def write_slot(weights: dict, adapter: dict, index) -> dict:
    """`weights` (slotted) with slot `index` (0-based, traced) replaced by `adapter` ([L, ...])."""
    out = {}
    for name, w in weights.items():
        a = adapter[name].astype(_dtype(w))
        if isinstance(w, tuple):
            axis = slot_axis(name, w[0].ndim, True)
            out[name] = tuple(jax.lax.dynamic_update_index_in_dim(w_l, a[i], index, axis)
                              for i, w_l in enumerate(w))
        else:
            out[name] = jax.lax.dynamic_update_index_in_dim(
                w, a, index, slot_axis(name, w.ndim, False))
    return out


def _dtype(w):
    return (w[0] if isinstance(w, tuple) else w).dtype
