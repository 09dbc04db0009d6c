"""Shared by the Pallas Triton attention kernels: version shims, page-tile loads, online softmax.

Shape legend as in `reference.py` (T tokens, B sequences, N query heads, K KV heads, G = N // K,
H head dim, P block-table width, S page size, L layers), plus the kernels' own tile letters:
  R  query rows in one program (a power of two >= 16: query heads of one KV head, times tokens)
  Hp H padded up to a power of two (80 -> 128, 96 -> 128)
  BK KV tokens per inner-loop step = pages_per_block * S (a power of two >= 16)

Every kernel takes the whole KV cache as one `[L, K, num_pages, S, H]` ref (one layer is passed as
`[1, ...]`, a free reshape) and reads layer `layer_ref[0]`, so the engine never copies a layer out.
The sliding window comes the same way, as `window_ref[0]` (it may differ per layer, traced), with
the static flag `windowed` saying whether there is one; blocks wholly before the window are never
loaded. Attention sinks ([N] float32, reference.py) start each row's online softmax at m = sink,
l = 1 (the ragged kernel) or join the split merge (the decode kernel). A quantized cache (int8 or
float8 pages, static flag `quantized`) comes with scale refs [L, K, num_pages, S], one per token and
KV head: the tile is converted to q's dtype as loaded and the scales multiply the scores' columns
(K) and the probabilities' columns (V), [R, BK] products instead of [BK, Hp] ones. Float8 pages
may come as uint8 bit patterns with the static `fp8_dtype` (how the engine stores them).

NOTE (indexing rules that both the Triton lowering and interpret mode accept):
  * a ref is indexed once, by scalars and integer arrays only (interpret mode rejects arrays mixed
    with slices; the Triton lowering rejects chained indexers);
  * loads may use clamped (repeated) indices, because masked lanes are never dereferenced on the GPU
    and a gather with repeats is harmless in interpret mode;
  * stores must use unique, unclamped indices: on the GPU the mask guards them; in interpret mode
    the masked store is a read-modify-write scatter, where repeated indices would race and
    out-of-bounds ones are dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Pallas moved these between releases: `TritonCompilerParams` became `CompilerParams`, and `dot`
# moved from `pl` to `plgpu` (`pl.dot` is deprecated from JAX 0.10). Resolve once, at import.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
_dot = getattr(plgpu, "dot", None) or pl.dot
load = plgpu.load
store = plgpu.store

# Finite "minus infinity" (as in the reference): fully masked rows give exp(...) == 0, never NaN.
MASK_VALUE = -1e30


def compiler_params(num_warps: int, num_stages: int):
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def padded_head_dim(head_dim: int) -> int:
    """Hp: H padded to a power of two, at least 16 (a `dot` dimension)."""
    return next_pow2(head_dim, 16)


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def default_pages_per_block(page_size: int, head_dim: int) -> int:
    """Pages per inner-loop step: 128 KV tokens (64 for head dims over 128), at least 16."""
    block_tokens = 128 if padded_head_dim(head_dim) <= 128 else 64
    return max(1, block_tokens // page_size, pl.cdiv(16, page_size))


def dot(a, b, *, trans_b=False):
    """a @ b (or a @ b.T) with float32 accumulation; full float32 (no TF32) for float32 inputs."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return _dot(a, b, trans_b=trans_b, precision=precision)


def clamp_lane(lane, head_dim):
    """Head-dim lanes for a load: past H (padded dims) clamped, else untouched so Triton still
    sees a contiguous range and vectorises the load."""
    return lane if padded_head_dim(head_dim) == head_dim else jnp.minimum(lane, head_dim - 1)


def load_kv_tile(pages_ref, layer, kv_head, page_ids, token_ok, head_dim, fp8_dtype=None):
    """pages_ref [L, K, num_pages, S, H]; page_ids [ppb] (clamped); token_ok [ppb, S] -> [BK, Hp].

    Tokens outside `token_ok` and head-dim lanes past H read as 0 and cost no memory traffic.
    `fp8_dtype`: the pages are uint8 bit patterns of that float8 type (bitcast as loaded).
    """
    num_pages_per_block, page_size = token_ok.shape
    padded_dim = padded_head_dim(head_dim)
    lane = jnp.arange(padded_dim, dtype=jnp.int32)[None, None, :]
    slot = jnp.arange(page_size, dtype=jnp.int32)[None, :, None]
    mask = token_ok[:, :, None] & (lane < head_dim)
    index = (layer, kv_head, page_ids[:, None, None], slot, clamp_lane(lane, head_dim))
    tile = load(pages_ref.at[index], mask=mask, other=jnp.zeros((), pages_ref.dtype))
    if fp8_dtype is not None:
        tile = lax.bitcast_convert_type(tile, fp8_dtype)
    return tile.reshape(num_pages_per_block * page_size, padded_dim)


def load_scale_tile(scale_ref, layer, kv_head, page_ids, token_ok):
    """scale_ref [L, K, num_pages, S]; page_ids [ppb]; token_ok [ppb, S] -> [BK] float32 (0 where
    not token_ok)."""
    num_pages_per_block, page_size = token_ok.shape
    slot = jnp.arange(page_size, dtype=jnp.int32)[None, :]
    tile = load(scale_ref.at[layer, kv_head, page_ids[:, None], slot], mask=token_ok, other=0)
    return tile.astype(jnp.float32).reshape(num_pages_per_block * page_size)


def window_start(first_pos, window):
    """The first position a query at `first_pos` sees under a sliding window (None: 0)."""
    return 0 if window is None else jnp.maximum(first_pos - window + 1, 0)


def window_input(sliding_window):
    """(windowed, [1] int32 window array) for a kernel's window_ref; the array is a dummy 0
    when there is no window."""
    windowed = sliding_window is not None
    return windowed, jnp.asarray(sliding_window if windowed else 0, jnp.int32).reshape(1)


def sinks_input(sinks, num_heads):
    """(has_sinks, [N] float32 sinks array; a dummy when there are none)."""
    if sinks is None:
        return False, jnp.zeros((num_heads,), jnp.float32)
    if jnp.shape(sinks) != (num_heads,):
        raise ValueError(f"sinks must be [N] = [{num_heads}] (one per query head); got "
                         f"{jnp.shape(sinks)}")
    return True, jnp.asarray(sinks, jnp.float32)


def scales_input(k_scale, v_scale, k_pages, layer):
    """(quantized, k_scale, v_scale) as [L, K, num_pages, S] refs (dummy [1, 1, 1, 1] float16
    arrays when the cache is not quantized), checked against the pages (before `layered`)."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale come together (a quantized cache has both); got "
                         f"only {'k_scale' if v_scale is None else 'v_scale'}")
    if k_scale is None:
        dummy = jnp.ones((1, 1, 1, 1), jnp.float16)
        return False, dummy, dummy
    if k_scale.shape != k_pages.shape[:-1] or v_scale.shape != k_pages.shape[:-1]:
        raise ValueError(f"k_scale and v_scale must be the pages' shape without H, "
                         f"{k_pages.shape[:-1]}; got {k_scale.shape} and {v_scale.shape}")
    if layer is None:
        k_scale, v_scale = k_scale[None], v_scale[None]
    return True, k_scale, v_scale


def attend_pages(q, row_pos, row_ok, k_ref, v_ref, table_ref, seq, layer, kv_head, block_lo,
                 block_hi, kv_start, kv_end, *, pages_per_block, scale, soft_cap, sliding_window,
                 head_dim, init_m=None, k_scale_ref=None, v_scale_ref=None, fp8_dtype=None):
    """Online softmax of q rows over KV blocks [block_lo, block_hi) of sequence `seq`.

    q [R, Hp]; row_pos [R] (position of each query row); row_ok [R]; table_ref [B, P].
    KV positions outside [kv_start, kv_end) are not read. Row r attends to positions p with
    p <= row_pos[r] (and p > row_pos[r] - sliding_window, a traced scalar or None).
    `init_m` [R]: attention sinks (the running max starts there and the sum at 1).
    `k_scale_ref`/`v_scale_ref` [L, K, num_pages, S]: a quantized cache's scales; `fp8_dtype`: its
    pages are uint8 bit patterns of that float8 type.
    Returns (acc [R, Hp], m [R], l [R]) f32.
    """
    num_rows, padded_dim = q.shape
    quantized = k_scale_ref is not None
    num_table_pages = table_ref.shape[1]
    num_pages, page_size = k_ref.shape[2], k_ref.shape[3]
    block_tokens = pages_per_block * page_size

    def body(block, carry):
        acc, m, l = carry
        page_idx = block * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32)
        in_table = page_idx < num_table_pages
        page_ids = load(table_ref.at[seq, jnp.minimum(page_idx, num_table_pages - 1)],
                        mask=in_table, other=0)
        page_ids = jnp.clip(page_ids, 0, num_pages - 1)            # padding entries may be garbage
        kv_pos = (page_idx[:, None] * page_size
                  + jnp.arange(page_size, dtype=jnp.int32)[None, :])               # [ppb, S]
        token_ok = (kv_pos >= kv_start) & (kv_pos < kv_end) & in_table[:, None]
        k = load_kv_tile(k_ref, layer, kv_head, page_ids, token_ok, head_dim, fp8_dtype)  # [BK, Hp]
        v = load_kv_tile(v_ref, layer, kv_head, page_ids, token_ok, head_dim, fp8_dtype)
        if quantized:
            k, v = k.astype(q.dtype), v.astype(q.dtype)

        s = dot(q, k, trans_b=True) * scale                                         # [R, BK]
        if quantized:
            s = s * load_scale_tile(k_scale_ref, layer, kv_head, page_ids, token_ok)[None, :]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        pos = block * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)      # [BK]
        mask = (pos[None, :] <= row_pos[:, None]) & row_ok[:, None]
        if sliding_window is not None:
            mask &= pos[None, :] > row_pos[:, None] - sliding_window
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=1)
        if quantized:       # the V scales weigh the probabilities (l keeps the plain sum)
            p = p * load_scale_tile(v_scale_ref, layer, kv_head, page_ids, token_ok)[None, :]
        acc = acc * correction[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_new, l

    init = (jnp.zeros((num_rows, padded_dim), jnp.float32),
            jnp.full((num_rows,), MASK_VALUE, jnp.float32) if init_m is None else init_m,
            jnp.full((num_rows,), 0.0 if init_m is None else 1.0, jnp.float32))
    return lax.fori_loop(block_lo, block_hi, body, init)


def layered(k_pages, v_pages, layer):
    """Normalise to the `[L, K, num_pages, S, H]` layout plus a [1] int32 layer index array."""
    if layer is None:
        return k_pages[None], v_pages[None], jnp.zeros((1,), jnp.int32)
    return k_pages, v_pages, jnp.asarray(layer, jnp.int32).reshape(1)


def check_common(q, k_pages, v_pages, block_tables, context_lens, layer):
    """Shape checks shared by both kernels; raises ValueError naming the offending shapes."""
    want_ndim = 4 if layer is None else 5
    layout = "[K, num_pages, S, H]" if layer is None else "[L, K, num_pages, S, H] (layer given)"
    if k_pages.ndim != want_ndim or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be {layout}; got {k_pages.shape} and "
                         f"{v_pages.shape}")
    if q.ndim != 3 or q.shape[2] != k_pages.shape[-1]:
        raise ValueError(f"q must be [*, N, H] with the pages' H; got q {q.shape}, pages "
                         f"{k_pages.shape}")
    num_heads, num_kv_heads = q.shape[1], k_pages.shape[-4]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}, q {q.shape}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads}, pages {k_pages.shape})")
    if not is_pow2(k_pages.shape[-2]):
        raise ValueError(f"page size must be a power of two; got pages {k_pages.shape}")
    if block_tables.ndim != 2 or context_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"block_tables must be [B, P] and context_lens [B]; got "
                         f"{block_tables.shape} and {context_lens.shape}")
