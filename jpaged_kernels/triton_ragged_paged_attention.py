"""Ragged paged attention on the Pallas Triton backend: prefill chunks and decodes in one launch.

Work items: each sequence's new tokens are cut into query blocks of BQ tokens, so a work item holds
tokens of exactly one sequence. Their count is data-dependent but bounded by W = cdiv(T, BQ) + B,
a static number, so the grid is (W, K) and a jnp prologue maps each work item to its
(sequence, first token, end token); items past the real count are empty and exit at once. A decode
token is thus a work item of its own, like a decode-kernel program, and a long prefill chunk
spreads over many programs.

One program takes the BQ tokens x G query heads of one KV head as R = BQ * Gp rows (G padded to a
power of two Gp, and so that R >= 16: every `dot` dimension is >= 16), walks the sequence's pages
up to its last token in steps of BK tokens with a causal (and optional sliding-window) mask and an
online softmax in float32, and writes the normalised rows. Padding tokens (past
query_start_loc[B]) belong to no work item: the output starts as zeros (aliased in), so they stay 0.

Shapes: q [T, N, H]; pages [K, num_pages, S, H] (or [L, K, num_pages, S, H] with `layer`);
block_tables [B, P]; context_lens [B]; query_start_loc [B+1]. Legend in `reference.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jpaged_kernels import triton_common as tc

# Rows of the [3, W] work-item table.
WORK_SEQ, WORK_FIRST, WORK_END = range(3)


def ragged_paged_attention_kernel(
    layer_ref,    # [1] int32
    window_ref,   # [1] int32 (read when windowed)
    sinks_ref,    # [N] float32 (read when has_sinks)
    work_ref,     # [3, W] int32: sequence, first token, end token (exclusive) of each work item
    q_ref,        # [T, N, H]
    k_ref,        # [L, K, num_pages, S, H]
    v_ref,        # [L, K, num_pages, S, H]
    k_scale_ref,  # [L, K, num_pages, S] (read when quantized)
    v_scale_ref,  # [L, K, num_pages, S] (read when quantized)
    table_ref,    # [B, P] int32
    lens_ref,     # [B] int32
    qsl_ref,      # [B+1] int32
    _,            # [T, N, H] zeros, aliased to o_ref
    o_ref,        # [T, N, H]
    *, group, head_dim, block_q, pages_per_block, scale, soft_cap, windowed, has_sinks,
    quantized, fp8_dtype,
):
    item, kv_head = pl.program_id(0), pl.program_id(1)
    num_tokens = q_ref.shape[0]
    group_rows = rows_per_token(group, block_q)
    padded_dim = tc.padded_head_dim(head_dim)
    block_tokens = pages_per_block * k_ref.shape[3]
    seq, first, end = (work_ref[WORK_SEQ, item], work_ref[WORK_FIRST, item],
                       work_ref[WORK_END, item])
    q_len = qsl_ref[seq + 1] - qsl_ref[seq]
    first_pos = lens_ref[seq] - q_len + first - qsl_ref[seq]      # position of token `first`

    row = jnp.arange(block_q * group_rows, dtype=jnp.int32)
    lane = jnp.arange(padded_dim, dtype=jnp.int32)
    token = first + row // group_rows                               # unique, may pass T: stores
    g = row % group_rows
    row_ok = (token < end) & (g < group)
    head = kv_head * group + g
    q_token = jnp.minimum(token, num_tokens - 1)                    # clamped copies: loads
    q_head = kv_head * group + jnp.minimum(g, group - 1)
    mask = row_ok[:, None] & (lane[None, :] < head_dim)
    q_lane = tc.clamp_lane(lane, head_dim)[None, :]
    q = tc.load(q_ref.at[q_token[:, None], q_head[:, None], q_lane], mask=mask, other=0)

    row_pos = first_pos + row // group_rows
    kv_end = first_pos + (end - first)                              # one past the last position
    window = window_ref[0] if windowed else None
    kv_start = tc.window_start(first_pos, window)
    block_lo = kv_start // block_tokens
    block_hi = jnp.where(end > first, pl.cdiv(kv_end, block_tokens), block_lo)
    init_m = tc.load(sinks_ref.at[q_head], mask=row_ok, other=0) if has_sinks else None
    acc, _, l = tc.attend_pages(
        q, row_pos, row_ok, k_ref, v_ref, table_ref, seq, layer_ref[0], kv_head, block_lo,
        block_hi, kv_start, kv_end, pages_per_block=pages_per_block, scale=scale,
        soft_cap=soft_cap, sliding_window=window, head_dim=head_dim, init_m=init_m,
        k_scale_ref=k_scale_ref if quantized else None,
        v_scale_ref=v_scale_ref if quantized else None, fp8_dtype=fp8_dtype)
    out = acc / jnp.maximum(l, 1e-30)[:, None]
    tc.store(o_ref.at[token[:, None], head[:, None], lane[None, :]], out.astype(o_ref.dtype),
             mask=mask)


def work_items(query_start_loc, num_tokens, block_q):
    """[3, W] int32 rows (sequence, first token, end token) cutting each sequence into BQ blocks.

    W = cdiv(T, BQ) + B bounds sum_i cdiv(q_len_i, BQ); unused items are empty (end == first).
    """
    num_seqs = query_start_loc.shape[0] - 1
    num_items = pl.cdiv(num_tokens, block_q) + num_seqs
    q_lens = query_start_loc[1:] - query_start_loc[:-1]                             # [B]
    blocks = (jnp.maximum(q_lens, 0) + block_q - 1) // block_q                      # [B]
    ends = jnp.cumsum(blocks)                                                       # [B]
    item = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, item, side="right"), num_seqs - 1).astype(jnp.int32)
    first = query_start_loc[seq] + (item - (ends[seq] - blocks[seq])) * block_q
    end = jnp.where(item < ends[-1], jnp.minimum(first + block_q, query_start_loc[seq + 1]), first)
    return jnp.stack([seq, first, end]).astype(jnp.int32)


def _launch(q, k_pages, v_pages, k_scale, v_scale, layer, window, sinks, block_tables,
            context_lens, query_start_loc, *, scale, soft_cap, windowed, has_sinks, quantized,
            fp8_dtype, block_q, pages_per_block, num_warps, num_stages, interpret):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[1]
    work = work_items(query_start_loc, num_tokens, block_q)
    kernel = functools.partial(
        ragged_paged_attention_kernel, group=num_heads // num_kv_heads, head_dim=head_dim,
        block_q=block_q, pages_per_block=pages_per_block, scale=scale, soft_cap=soft_cap,
        windowed=windowed, has_sinks=has_sinks, quantized=quantized, fp8_dtype=fp8_dtype)
    whole = pl.BlockSpec()
    inputs = dict(layer=layer, window=window, sinks=sinks, work=work, q=q, k_pages=k_pages,
                  v_pages=v_pages, k_scale=k_scale, v_scale=v_scale,
                  block_tables=block_tables, context_lens=context_lens,
                  query_start_loc=query_start_loc, out_init=jnp.zeros_like(q))
    return pl.pallas_call(
        kernel,
        grid=(work.shape[1], num_kv_heads),
        in_specs=[whole] * len(inputs),
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        input_output_aliases={list(inputs).index("out_init"): 0},   # padding tokens stay 0
        compiler_params=tc.compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"jpaged_ragged_paged_attention_BQ{block_q}_ppb{pages_per_block}",
    )(*inputs.values())


def default_block_q(group):
    """Query tokens per program: 64 rows of BQ tokens x next_pow2(G) heads (at least one token)."""
    return max(1, 64 // tc.next_pow2(group))


def rows_per_token(group, block_q):
    """G padded to a power of two, and further so that R = BQ * rows >= 16 (dot dims >= 16)."""
    return max(tc.next_pow2(group), 16 // block_q)


@functools.partial(jax.jit, static_argnames=(
    "scale", "soft_cap", "fp8_dtype", "block_q", "pages_per_block", "num_warps", "num_stages",
    "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *,
                           scale=None, layer=None, sliding_window=None, soft_cap=None, sinks=None,
                           k_scale=None, v_scale=None, fp8_dtype=None, block_q=None,
                           pages_per_block=None, num_warps=4, num_stages=2, interpret=False):
    """Ragged prefill + decode attention; same contract as `reference.ragged_paged_attention`.

    q [T, N, H]; pages [K, num_pages, S, H], or [L, K, num_pages, S, H] with `layer` (read in
    place); block_tables [B, P]; context_lens [B] (KV length including the new tokens);
    query_start_loc [B+1] cumulative new-token counts. Tokens past query_start_loc[B] are padding
    and produce 0. `sliding_window` (int or traced scalar) and `sinks` [N] as in reference.py;
    a quantized cache (int8/float8 pages) passes k_scale/v_scale, the pages' shape without H
    (float8 pages may be uint8 bit patterns of `fp8_dtype`).
    Returns [T, N, H] in q's dtype. `block_q` and `pages_per_block` (powers of two) default to a
    heuristic.
    """
    tc.check_common(q, k_pages, v_pages, block_tables, context_lens, layer)
    if query_start_loc.shape != (block_tables.shape[0] + 1,):
        raise ValueError(f"query_start_loc must be [B+1] for block_tables [B, P] = "
                         f"{block_tables.shape}; got {query_start_loc.shape}")
    num_heads, head_dim = q.shape[1:]
    page_size, num_kv_heads = k_pages.shape[-2], k_pages.shape[-4]
    group = num_heads // num_kv_heads
    block_q = default_block_q(group) if block_q is None else block_q
    if not tc.is_pow2(block_q):
        raise ValueError(f"block_q ({block_q}) must be a power of two; q {q.shape}")
    if pages_per_block is None:
        pages_per_block = tc.default_pages_per_block(page_size, head_dim)
    if not tc.is_pow2(pages_per_block) or pages_per_block * page_size < 16:
        raise ValueError(f"pages_per_block ({pages_per_block}) must be a power of two with "
                         f"pages_per_block * page_size >= 16; pages {k_pages.shape}")
    scale = head_dim ** -0.5 if scale is None else scale

    quantized, k_scale, v_scale = tc.scales_input(k_scale, v_scale, k_pages, layer)
    k_pages, v_pages, layer = tc.layered(k_pages, v_pages, layer)
    windowed, window = tc.window_input(sliding_window)
    has_sinks, sinks = tc.sinks_input(sinks, num_heads)
    return _launch(
        q, k_pages, v_pages, k_scale, v_scale, layer, window, sinks,
        block_tables.astype(jnp.int32), context_lens.astype(jnp.int32),
        query_start_loc.astype(jnp.int32), scale=scale, soft_cap=soft_cap, windowed=windowed,
        has_sinks=has_sinks, quantized=quantized, fp8_dtype=fp8_dtype, block_q=block_q,
        pages_per_block=pages_per_block, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret)
