"""Paged decode attention on the Pallas Triton backend (flash-decoding).

Grid (B, K, num_splits): one program takes one sequence, all G query heads of one KV head (padded to
R = max(16, next_pow2(G)) rows so every `dot` dimension is >= 16), and one contiguous split of the
block table. It walks its split in steps of `pages_per_block` pages (BK tokens), gathering pages
through the block table, with an online softmax in float32, and writes its unnormalised partial
output plus running max and sum. A jnp log-sum-exp step then merges the splits. Splitting long
contexts across programs keeps the GPU busy when B * K alone is too few programs.

Shapes: q [B, N, H]; pages [K, num_pages, S, H] (or [L, K, num_pages, S, H] with `layer`);
block_tables [B, P]; context_lens [B]. The legend is in `reference.py` and `triton_common.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jpaged_kernels import triton_common as tc


def paged_attention_kernel(
    layer_ref,    # [1] int32
    window_ref,   # [1] int32 (read when windowed)
    q_ref,        # [B, N, H]
    k_ref,        # [L, K, num_pages, S, H]
    v_ref,        # [L, K, num_pages, S, H]
    k_scale_ref,  # [L, K, num_pages, S] (read when quantized)
    v_scale_ref,  # [L, K, num_pages, S] (read when quantized)
    table_ref,    # [B, P] int32
    lens_ref,     # [B] int32
    acc_ref,      # [R, Hp] f32 block of [B, K, num_splits, R, Hp]
    m_ref,        # [R] f32 block of [B, K, num_splits, R]
    l_ref,        # [R] f32 block of [B, K, num_splits, R]
    *, group, head_dim, blocks_per_split, pages_per_block, scale, soft_cap, windowed, quantized,
    fp8_dtype,
):
    seq, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_rows, padded_dim = acc_ref.shape
    block_tokens = pages_per_block * k_ref.shape[3]
    length = lens_ref[seq]

    row = jnp.arange(num_rows, dtype=jnp.int32)
    lane = jnp.arange(padded_dim, dtype=jnp.int32)
    row_ok = row < group
    heads = kv_head * group + jnp.minimum(row, group - 1)
    q_mask = row_ok[:, None] & (lane[None, :] < head_dim)
    q = tc.load(q_ref.at[seq, heads[:, None], tc.clamp_lane(lane, head_dim)[None, :]],
                mask=q_mask, other=0)                                               # [R, Hp]

    window = window_ref[0] if windowed else None
    kv_start = tc.window_start(length - 1, window)
    block_lo = jnp.maximum(split * blocks_per_split, kv_start // block_tokens)
    block_hi = jnp.minimum((split + 1) * blocks_per_split, pl.cdiv(length, block_tokens))
    row_pos = jnp.full((num_rows,), length - 1, jnp.int32)
    acc, m, l = tc.attend_pages(
        q, row_pos, row_ok, k_ref, v_ref, table_ref, seq, layer_ref[0], kv_head, block_lo,
        block_hi, kv_start, length, pages_per_block=pages_per_block, scale=scale,
        soft_cap=soft_cap, sliding_window=window, head_dim=head_dim,
        k_scale_ref=k_scale_ref if quantized else None,
        v_scale_ref=v_scale_ref if quantized else None, fp8_dtype=fp8_dtype)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _launch(q, k_pages, v_pages, k_scale, v_scale, layer, window, block_tables, context_lens, *,
            scale, soft_cap, windowed, quantized, fp8_dtype, pages_per_block, num_splits,
            num_warps, num_stages, interpret):
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[1]
    group = num_heads // num_kv_heads
    num_rows, padded_dim = tc.next_pow2(group, 16), tc.padded_head_dim(head_dim)
    num_blocks = pl.cdiv(block_tables.shape[1], pages_per_block)
    blocks_per_split = pl.cdiv(num_blocks, num_splits)

    kernel = functools.partial(
        paged_attention_kernel, group=group, head_dim=head_dim, blocks_per_split=blocks_per_split,
        pages_per_block=pages_per_block, scale=scale, soft_cap=soft_cap, windowed=windowed,
        quantized=quantized, fp8_dtype=fp8_dtype)
    whole = pl.BlockSpec()
    partial_shape = (num_seqs, num_kv_heads, num_splits, num_rows)
    return pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_splits),
        in_specs=[whole] * 9,
        out_specs=[
            pl.BlockSpec((None, None, None, num_rows, padded_dim), lambda b, k, s: (b, k, s, 0, 0)),
            pl.BlockSpec((None, None, None, num_rows), lambda b, k, s: (b, k, s, 0)),
            pl.BlockSpec((None, None, None, num_rows), lambda b, k, s: (b, k, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, padded_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=tc.compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"jpaged_paged_attention_R{num_rows}_H{padded_dim}_ppb{pages_per_block}",
    )(layer, window, q, k_pages, v_pages, k_scale, v_scale, block_tables, context_lens)


def combine_splits(acc, m, l, *, group, head_dim, sinks=None):
    """Log-sum-exp merge: acc [B, K, splits, R, Hp], m/l [B, K, splits, R] -> [B, K * G, H] f32.
    sinks [N] join the merge as one more term of the denominator (e^(sink - m), no value)."""
    m_max = m.max(axis=2, keepdims=True)
    extra = 0.0
    if sinks is not None:
        num_kv_heads, num_rows = m.shape[1], m.shape[3]
        rows = jnp.full((num_kv_heads, num_rows), tc.MASK_VALUE, jnp.float32)
        rows = rows.at[:, :group].set(sinks.reshape(num_kv_heads, group))        # [K, R]
        m_max = jnp.maximum(m_max, rows[None, :, None, :])
        extra = jnp.exp(rows[None] - m_max[:, :, 0])                             # [B, K, R]
    weight = jnp.exp(m - m_max)                                     # empty splits weigh 0
    total = (l * weight).sum(axis=2) + extra
    out = (acc * weight[..., None]).sum(axis=2) / jnp.maximum(total, 1e-30)[..., None]
    num_seqs, num_kv_heads = out.shape[:2]
    return out[:, :, :group, :head_dim].reshape(num_seqs, num_kv_heads * group, head_dim)


def default_num_splits(num_seqs, num_kv_heads, num_blocks, target_programs=512):
    """Enough splits that B * K * splits reaches ~target_programs, never more than the blocks."""
    return max(1, min(num_blocks, pl.cdiv(target_programs, num_seqs * num_kv_heads)))


@functools.partial(jax.jit, static_argnames=(
    "scale", "soft_cap", "fp8_dtype", "pages_per_block", "num_splits", "num_warps", "num_stages",
    "interpret"))
def paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, layer=None,
                    sliding_window=None, soft_cap=None, sinks=None, k_scale=None, v_scale=None,
                    fp8_dtype=None, pages_per_block=None, num_splits=None, num_warps=4,
                    num_stages=2, interpret=False):
    """Decode attention over a paged KV cache; same contract as `reference.paged_attention`.

    q [B, N, H]; k_pages/v_pages [K, num_pages, S, H], or [L, K, num_pages, S, H] with `layer`
    (a scalar, may be traced: the kernel reads that layer in place); block_tables [B, P] int32;
    context_lens [B] int32 in 1..P*S. `sliding_window` (int or traced scalar) and `sinks` [N] as
    in reference.py; a quantized cache (int8/float8 pages) passes k_scale/v_scale, the pages'
    shape without H (float8 pages may be uint8 bit patterns of `fp8_dtype`). Returns [B, N, H] in
    q's dtype. `pages_per_block` (power of two) and `num_splits` default to a heuristic;
    `interpret=True` runs on CPU.
    """
    tc.check_common(q, k_pages, v_pages, block_tables, context_lens, layer)
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"q [B, N, H] and block_tables [B, P] disagree on B: q {q.shape}, "
                         f"block_tables {block_tables.shape}")
    num_seqs, num_heads, head_dim = q.shape
    page_size = k_pages.shape[-2]
    num_kv_heads = k_pages.shape[-4]
    if pages_per_block is None:
        pages_per_block = tc.default_pages_per_block(page_size, head_dim)
    if not tc.is_pow2(pages_per_block) or pages_per_block * page_size < 16:
        raise ValueError(f"pages_per_block ({pages_per_block}) must be a power of two with "
                         f"pages_per_block * page_size >= 16; pages {k_pages.shape}")
    num_blocks = pl.cdiv(block_tables.shape[1], pages_per_block)
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, num_blocks)
    num_splits = max(1, min(num_splits, num_blocks))
    scale = head_dim ** -0.5 if scale is None else scale

    quantized, k_scale, v_scale = tc.scales_input(k_scale, v_scale, k_pages, layer)
    k_pages, v_pages, layer = tc.layered(k_pages, v_pages, layer)
    windowed, window = tc.window_input(sliding_window)
    has_sinks, sinks = tc.sinks_input(sinks, num_heads)
    acc, m, l = _launch(
        q, k_pages, v_pages, k_scale, v_scale, layer, window, block_tables.astype(jnp.int32),
        context_lens.astype(jnp.int32), scale=scale, soft_cap=soft_cap, windowed=windowed,
        quantized=quantized, fp8_dtype=fp8_dtype, pages_per_block=pages_per_block,
        num_splits=num_splits, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    out = combine_splits(acc, m, l, group=num_heads // num_kv_heads, head_dim=head_dim,
                         sinks=sinks if has_sinks else None)
    return out.astype(q.dtype)
