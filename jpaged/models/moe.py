"""Sparse mixture-of-experts: routing, dispatch sorted by expert, and the grouped matmul that
sends each routed row through its own expert only.

Shape legend: jpaged_kernels/reference.py's, plus E experts (El of them on this device under
expert parallelism), k experts per token (top-k), Fe one expert's MLP dim, M = T * k routed rows.

Routing (Mixtral, Qwen3-MoE, as HF transformers): softmax of the router logits in float32, the k
largest probabilities, renormalised to sum to 1 when `norm_topk_prob`. `dispatch` sorts the T*k
(token, expert) pairs by expert, so each expert's rows are contiguous and `group_sizes [El]`
counts them; rows routed to experts of other devices sort last and are counted by no group.

NOTE: the grouped matmul. `jax.lax.ragged_dot(x [M, D], w [E, D, F], group_sizes)` is the
grouped product XLA runs natively on GPU and TPU. On CPU, XLA expands it into a masked product
with every expert (E times the work of the routed rows), so there `segment_matmul` runs the
sorted rows in blocks of `block` rows that each belong to one expert: a loop over the blocks
that exist (at most M / block + E, dynamic), each a [block, In] x [In, Out] product with its
expert's weight. `impl="auto"` picks ragged_dot off CPU and segments on CPU. The dense
formulation (every token through every expert, `dense_moe` in decoder.py) is kept for
benchmarks/moe.py only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

GROUPED_IMPLS = ("auto", "segment", "ragged_dot")


class Dispatch(NamedTuple):
    """Routed rows sorted by expert (M = T * k rows)."""
    token: jax.Array        # [M] int32, the token each sorted row comes from
    weight: jax.Array       # [M] float32, its routing weight (0 for rows of other devices)
    group_sizes: jax.Array  # [El] int32, rows per local expert, in expert order


def route(router_logits, top_k: int, normalize: bool):
    """router_logits [T, E] -> (weights [T, k] float32, experts [T, k] int32)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def dispatch(weights, experts, num_local_experts: int, first_expert=0) -> Dispatch:
    """Sort the (token, expert) pairs by expert; experts outside [first_expert, first_expert +
    num_local_experts) (another device's, under expert parallelism) go last with weight 0."""
    top_k = experts.shape[1]
    local = experts.reshape(-1) - first_expert                                       # [M]
    mine = (local >= 0) & (local < num_local_experts)
    key = jnp.where(mine, local, num_local_experts)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.zeros(num_local_experts + 1, jnp.int32).at[key].add(1)[:-1]
    weight = jnp.where(mine, weights.reshape(-1), 0.0)[order]
    return Dispatch((order // top_k).astype(jnp.int32), weight, group_sizes)


def combine(y, d: Dispatch, num_tokens: int):
    """Sorted rows y [M, D], each times its routing weight, summed back into their tokens [T, D]."""
    rows = y * d.weight[:, None].astype(y.dtype)
    return jnp.zeros((num_tokens, y.shape[1]), y.dtype).at[d.token].add(rows)


def grouped_matmul(x, group_sizes, expert_product, layer_weight, *, out_shape: tuple,
                   impl: str = "auto"):
    """x [M, In] rows sorted by expert -> [M, *out_shape]: row r of expert e times W[e].

    The weights come through two callables (LayerWeights.expert_matmul makes them, so each
    placement reads its buffers its own way): `expert_product(rows [b, In], e)` = rows @ W[e]
    as [b, prod(out_shape)], and `layer_weight()` = W as [E, In, prod(out_shape)] (ragged_dot's
    operand). Rows past sum(group_sizes) give 0."""
    if impl not in GROUPED_IMPLS:
        raise ValueError(f"grouped matmul impl must be one of {GROUPED_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "segment" if jax.default_backend() == "cpu" else "ragged_dot"
    if impl == "ragged_dot":
        y = jax.lax.ragged_dot(x, layer_weight(), group_sizes)
        y = jnp.where((jnp.arange(x.shape[0]) < group_sizes.sum())[:, None], y, 0)
    else:
        y = segment_matmul(x, group_sizes, expert_product)
    return y.reshape(x.shape[0], *out_shape)


def segment_matmul(x, group_sizes, expert_product, block: int | None = None):
    """x [M, In] sorted by group -> [M, Out], a block of rows at a time (see the module's NOTE):
    `expert_product(rows [block, In], g)` is rows @ W[g]. A block starts inside one group and may
    run past its end into the next group's rows (or the padding): only its own rows are written."""
    num_rows, num_groups = x.shape[0], group_sizes.shape[0]
    block = block or _block_rows(num_rows, num_groups)
    starts = jnp.cumsum(group_sizes) - group_sizes                                 # [G]
    per_group = (group_sizes + block - 1) // block                                 # [G]
    ends = jnp.cumsum(per_group)
    max_blocks = -(-num_rows // block) + num_groups
    b = jnp.arange(max_blocks, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(ends, b, side="right"), num_groups - 1)   # [max_blocks]
    first = starts[group] + (b - (ends[group] - per_group[group])) * block
    stop = starts[group] + group_sizes[group]
    xp = jnp.pad(x, ((0, block), (0, 0)))                    # a block never slices past the end
    out_dim = jax.eval_shape(expert_product, xp[:block], group[0]).shape[1]
    out = jnp.zeros((num_rows + block, out_dim), x.dtype)
    rows = jnp.arange(block, dtype=jnp.int32)

    def one_block(i, out):
        start = first[i]
        y = expert_product(jax.lax.dynamic_slice_in_dim(xp, start, block), group[i])
        old = jax.lax.dynamic_slice_in_dim(out, start, block)
        keep = (start + rows < stop[i])[:, None]
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep, y.astype(out.dtype), old),
                                                   start, 0)

    out = jax.lax.fori_loop(0, ends[-1], one_block, out)
    return out[:num_rows]


def _block_rows(num_rows: int, num_groups: int) -> int:
    """Rows per block: a power of two near the mean group size, in [8, 128]."""
    mean = max(1, -(-num_rows // num_groups))
    return min(128, max(8, 1 << (mean - 1).bit_length()))
