"""Pure-jnp paged attention: the definition every kernel is tested against.

Shape legend (used throughout jpaged):
  T tokens in the batch    B sequences        N query heads     K KV heads
  G query heads per KV head (N // K)          H head dim        P pages per sequence (block table width)
  S page size              L layers           C context positions (a multiple of S)
  W windows (runs of up to Q new tokens of one sequence)       R query rows per KV head in a window

Cache layout (DESIGN.md): one layer's pages are `[K, num_pages, S, H]`; the engine keeps all layers in
one `[L, K, num_pages, S, H]` array and passes `layer=` so no per-layer copy of the cache is made.
Slot of token t of a sequence: `block_tables[t // S] * S + t % S`. Page 0 is the null page that padding
entries point at; it is never read for a valid position because every read is masked by position.

Per-layer attention options, the same in every implementation (the kernels and the dense oracle):
  scale           softmax scale (default H ** -0.5)
  sliding_window  a query at position p sees positions in (p - window, p]; None: all of [0, p].
                  A Python int, or a traced int32 scalar (one scan over layers of different
                  windows passes each layer's own; a global layer passes a window past any length)
  soft_cap        scores -> soft_cap * tanh(scores / soft_cap), after scaling (Gemma 2)
  sinks           [N] float32, one learned logit per query head that joins the softmax's
                  denominator and carries no value (gpt-oss's attention sinks):
                  out = sum_j e^(s_j - m) v_j / (sum_j e^(s_j - m) + e^(sink - m))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Finite "minus infinity": fully masked rows (padding tokens) then give exp(...) == 0, never NaN.
_MASK_VALUE = -1e30
# Upper bound on elements of one gathered K (or V) chunk [W, K, C, H] and of its scores [W, K, R, C].
_CHUNK_ELEMENTS = 1 << 23
# Largest window of new tokens of one sequence that attends as one matrix product (ragged path).
_MAX_WINDOW = 128
# Windows with at most this many query rows per KV head (decode: the G heads of a group) attend by
# broadcast multiply and sum instead of matrix products (see _attend's NOTE).
_ELEMENTWISE_ROWS = 8


def paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, layer=None,
                    sliding_window=None, soft_cap=None, sinks=None, k_scale=None, v_scale=None,
                    fp8_dtype=None, interpret=False):
    """Decode attention: one new token per sequence.

    q [B, N, H]; k_pages/v_pages [K, num_pages, S, H] (or [L, K, num_pages, S, H] with `layer`);
    block_tables [B, P] int32; context_lens [B] int32 (tokens to attend to, the current one included;
    0 for a padding slot, whose output is 0). Returns [B, N, H]. A quantized cache (int8 or fp8
    pages) comes with k_scale/v_scale [K, num_pages, S] (or [L, ...]): a token's K is
    k_pages * k_scale for its KV head (write_kv). `fp8_dtype`: the pages are uint8 holding the bit
    patterns of this float8 type (as the engine stores them: see as_bits). `interpret` is accepted
    for signature parity
    with the Pallas kernels.
    """
    del interpret
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
        k_scale, v_scale = _lead(k_scale), _lead(v_scale)
    block_tables, context_lens = jnp.asarray(block_tables), jnp.asarray(context_lens)
    _check_shapes(q, k_pages, block_tables, context_lens, None)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[1]
    group = num_heads // num_kv_heads
    # One window per sequence; its rows are the G query heads that share a KV head.
    qw = q.reshape(num_seqs, num_kv_heads, group, head_dim)                         # [B, K, G, H]
    row_pos = jnp.broadcast_to((context_lens - 1)[:, None], (num_seqs, group))      # [B, G]
    row_valid = jnp.broadcast_to((context_lens > 0)[:, None], (num_seqs, group))    # [B, G]
    out = _attend(qw, (k_pages, k_scale, fp8_dtype), (v_pages, v_scale, fp8_dtype), layer,
                  block_tables, row_pos,
                  row_valid, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  sinks=_row_sinks(sinks, num_kv_heads, group, 1))                 # [B, K, G, H]
    return out.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)


def ragged_paged_attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *,
                           scale=None, layer=None, sliding_window=None, soft_cap=None, sinks=None,
                           k_scale=None, v_scale=None, fp8_dtype=None, interpret=False):
    """Attention for a ragged batch of prefill chunks and decode tokens.

    q [T, N, H]; block_tables [B, P]; context_lens [B] (KV length including the new tokens);
    query_start_loc [B+1] (cumulative new-token counts). New token j of sequence i sits at position
    `context_lens[i] - q_len_i + j` and attends causally to positions <= its own. Tokens past
    `query_start_loc[B]` are padding: their output is 0. Returns [T, N, H] in q's dtype.

    NOTE: windows. Each sequence's new tokens are cut into windows of Q consecutive tokens (Q static,
    _window_size); a window gathers its sequence's pages once and attends with matrix products
    [Q*G, H] x [H, C]. So K/V traffic grows with windows x context (about T/Q + B windows), not
    with tokens x context as a per-token gather would.
    A quantized cache: as in paged_attention.
    """
    del interpret
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
        k_scale, v_scale = _lead(k_scale), _lead(v_scale)
    block_tables, context_lens, query_start_loc = map(jnp.asarray, (block_tables, context_lens,
                                                                    query_start_loc))
    _check_shapes(q, k_pages, block_tables, context_lens, query_start_loc)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = block_tables.shape[0], k_pages.shape[1]
    group = num_heads // num_kv_heads
    win = _windows(num_tokens, num_seqs, context_lens, query_start_loc)
    q_win = q[win.row_token]                                                        # [W, Q, N, H]
    num_win, rows = win.row_token.shape
    qw = q_win.reshape(num_win, rows, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qw = qw.reshape(num_win, num_kv_heads, rows * group, head_dim)                  # [W, K, Q*G, H]
    out = _attend(qw, (k_pages, k_scale, fp8_dtype), (v_pages, v_scale, fp8_dtype), layer,
                  block_tables[win.seq],
                  jnp.repeat(win.row_pos, group, axis=1), jnp.repeat(win.row_valid, group, axis=1),
                  scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  sinks=_row_sinks(sinks, num_kv_heads, group, rows))
    out = out.reshape(num_win, num_kv_heads, rows, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(num_win * rows, num_heads, head_dim)                          # [W*Q, N, H]
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    valid = token < query_start_loc[num_seqs]                                       # [T]
    return jnp.where(valid[:, None, None], out[win.token_row], 0).astype(q.dtype)


class _Windows(NamedTuple):
    seq: jax.Array        # [W] sequence of each window (padding windows: any, all rows invalid)
    row_token: jax.Array  # [W, Q] token index of each row (clipped into [0, T))
    row_pos: jax.Array    # [W, Q] position of each row's token in its sequence
    row_valid: jax.Array  # [W, Q] the row is a real new token
    token_row: jax.Array  # [T] flat row (window * Q + row) holding each token's output


def _windows(num_tokens, num_seqs, context_lens, query_start_loc) -> _Windows:
    """Cut each sequence's new tokens into windows of Q tokens (static shapes: W = ceil(T/Q) + B)."""
    size = _window_size(num_tokens, num_seqs)
    num_win = -(-num_tokens // size) + num_seqs
    q_lens = query_start_loc[1:] - query_start_loc[:-1]                             # [B]
    per_seq = (q_lens + size - 1) // size                                           # [B]
    win_end = jnp.cumsum(per_seq)
    win_start = win_end - per_seq                                                   # [B]
    w = jnp.arange(num_win, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(win_end, w, side="right", method="compare_all"),
                      num_seqs - 1).astype(jnp.int32)                               # [W]
    offset = (w - win_start[seq])[:, None] * size + jnp.arange(size, dtype=jnp.int32)  # [W, Q]
    row_valid = (offset < q_lens[seq][:, None]) & (w < win_end[-1])[:, None]
    row_token = jnp.clip(query_start_loc[seq][:, None] + offset, 0, num_tokens - 1)
    row_pos = context_lens[seq][:, None] - q_lens[seq][:, None] + offset
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    tok_seq = jnp.clip(jnp.searchsorted(query_start_loc, token, side="right",
                                        method="compare_all") - 1, 0, num_seqs - 1)
    j = token - query_start_loc[tok_seq]
    token_row = jnp.clip((win_start[tok_seq] + j // size) * size + j % size, 0, num_win * size - 1)
    return _Windows(seq, row_token, row_pos, row_valid, token_row)


def _window_size(num_tokens, num_seqs) -> int:
    """Q: a power of two near the mean new tokens per sequence, in [1, _MAX_WINDOW] (static)."""
    mean = max(1, num_tokens // max(1, num_seqs))
    return min(_MAX_WINDOW, 1 << (mean - 1).bit_length())


def _row_sinks(sinks, num_kv_heads, group, rows_per_head):
    """sinks [N] -> [K, R] float32 for rows r = token * G + g of KV head k (query head k*G + g)."""
    if sinks is None:
        return None
    per_head = jnp.asarray(sinks, jnp.float32).reshape(num_kv_heads, group)
    return jnp.tile(per_head, (1, rows_per_head))


def _attend(qw, k_pages, v_pages, layer, tables, row_pos, row_valid, *, scale, sliding_window,
            soft_cap, sinks=None):
    """Each window w attends, row by row, to positions <= row_pos[w, r] of the pages in tables[w].

    qw [W, K, R, H] (R query rows per KV head); k_pages, v_pages: (pages [L, K, num_pages, S, H],
    their scales [L, K, num_pages, S] or None, fp8_dtype or None); tables [W, P];
    row_pos, row_valid [W, R]; sinks [K, R] or None. Returns [W, K, R, H] float32 (invalid rows:
    0). Online softmax over chunks of pages, so neither the gathered K/V nor the scores exceed
    _CHUNK_ELEMENTS; a sink starts each row's running max and sum (m = sink, l = 1).
    """
    num_win, num_kv_heads, rows, head_dim = qw.shape
    page_size = k_pages[0].shape[3]
    pages_per_seq = tables.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    qw = qw.astype(jnp.float32) * scale
    pages_per_chunk = _pages_per_chunk(num_win * num_kv_heads * page_size * max(head_dim, rows),
                                       pages_per_seq)
    chunk_len = pages_per_chunk * page_size

    # NOTE: few rows (decode). A [R, H] x [H, C] product per (window, KV head) is too small for a
    # matrix kernel; as a broadcast multiply and sum over H (and over C for p x V), XLA fuses the
    # page gather into the reduction, so K and V are read from the pages once, never copied.
    elementwise = rows <= _ELEMENTWISE_ROWS

    def qk(k):
        if elementwise:
            return (qw[:, :, :, None, :] * k[:, :, None, :, :].astype(jnp.float32)).sum(-1)
        return jnp.einsum("WKRH,WKCH->WKRC", qw, k.astype(jnp.float32))

    def pv(p, v):
        if elementwise:
            return (p[..., None] * v[:, :, None, :, :].astype(jnp.float32)).sum(3)
        return jnp.einsum("WKRC,WKCH->WKRH", p, v.astype(jnp.float32))

    def scores(chunk):
        """Masked scores of every row against one chunk of its window's pages, and that chunk's V."""
        pages = jax.lax.dynamic_slice_in_dim(tables, chunk * pages_per_chunk, pages_per_chunk,
                                             axis=1)                                 # [W, ppc]
        k = _gather_pages(k_pages, layer, pages)                                   # [W, K, C, H]
        s = qk(k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = chunk * chunk_len + jnp.arange(chunk_len, dtype=jnp.int32)        # [C]
        mask = (kv_pos[None, None, :] <= row_pos[:, :, None]) & row_valid[:, :, None]  # [W, R, C]
        if sliding_window is not None:
            mask &= kv_pos[None, None, :] > row_pos[:, :, None] - sliding_window
        mask = mask[:, None]
        return jnp.where(mask, s, _MASK_VALUE), _gather_pages(v_pages, layer, pages), mask

    def attend_chunk(carry, chunk):
        """Online softmax: fold one chunk into the running max m, sum l and output acc."""
        m, l, acc = carry                                # [W, K, R], [W, K, R], [W, K, R, H]
        s, v, mask = scores(chunk)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + pv(p, v)
        return (m_new, l, acc), None

    num_chunks = pages_per_seq // pages_per_chunk
    shape = (num_win, num_kv_heads, rows)
    if num_chunks == 1:   # the common case: a plain masked softmax, no running max to carry
        s, v, mask = scores(0)
        m = s.max(axis=-1) if sinks is None else jnp.maximum(s.max(axis=-1), sinks)
        p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
        l = p.sum(axis=-1) + (0.0 if sinks is None else jnp.exp(sinks - m))
        acc = pv(p, v)
    else:
        init = (jnp.full(shape, _MASK_VALUE, jnp.float32) if sinks is None
                else jnp.broadcast_to(sinks, shape),
                jnp.full(shape, 0.0 if sinks is None else 1.0, jnp.float32),
                jnp.zeros((*shape, head_dim), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(attend_chunk, init, jnp.arange(num_chunks))
    return acc / jnp.maximum(l, 1e-30)[..., None]


def write_kv(k_cache, v_cache, k, v, slot_mapping, *, layer=None, k_scale=None, v_scale=None,
             fp8_dtype=None):
    """Write new tokens' K/V into their pages (an XLA scatter; in place when the cache is donated).

    k_cache/v_cache [K, num_pages, S, H] (or [L, K, num_pages, S, H] with `layer`); k, v [T, K, H];
    slot_mapping [T] int32. Padding tokens carry slots inside the null page 0. A quantized cache
    (int8 or float8 pages) passes its scales [K, num_pages, S] (or [L, ...]): each token's K (and
    V) of each KV head is stored as q = k / scale with scale = max|k| / (the type's largest value),
    and (k_cache, v_cache, k_scale, v_scale) come back. `fp8_dtype`: uint8 pages holding that
    float8 type's bit patterns (as_bits).
    """
    page_size = k_cache.shape[-2]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    caches = [(k_cache, k, k_scale), (v_cache, v, v_scale)]
    out = []
    for cache, new, scales in caches:
        if scales is not None:
            new, factor = quantize_kv(new, fp8_dtype or cache.dtype, scales.dtype)  # [T, K, H], [T, K]
        new = as_bits(new) if fp8_dtype is not None else new.astype(cache.dtype)
        if layer is None:
            cache = cache.at[:, page, offset].set(jnp.swapaxes(new, 0, 1))
            if scales is not None:
                scales = scales.at[:, page, offset].set(factor.T.astype(scales.dtype))
        else:  # advanced indices split by a slice: the indexed result is laid out [T, K, H]
            cache = cache.at[layer, :, page, offset].set(new)
            if scales is not None:
                scales = scales.at[layer, :, page, offset].set(factor.astype(scales.dtype))
        out.append((cache, scales))
    (k_cache, k_scale), (v_cache, v_scale) = out
    return (k_cache, v_cache) if k_scale is None else (k_cache, v_cache, k_scale, v_scale)


def quantize_kv(x, dtype, scale_dtype=jnp.float16):
    """x [..., H] float -> (q [..., H] in `dtype` (int8 or a float8), scale [...] in scale_dtype)
    with x ~ q * scale: per vector (one token's K or V of one KV head), max |x| maps to the type's
    largest finite value (the scale rounded to its own type first, so q matches it exactly)."""
    top = float(jnp.iinfo(dtype).max if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).max)
    x = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(x), axis=-1) / top).astype(scale_dtype).astype(jnp.float32)
    scale = jnp.where(scale == 0, 1.0, scale)
    q = x / scale[..., None]
    if jnp.issubdtype(dtype, jnp.integer):
        q = jnp.clip(jnp.round(q), -top, top)
    return q.astype(dtype), scale.astype(scale_dtype)


def as_bits(x):
    """A float8 array as uint8 bit patterns: how the engine stores a float8 KV cache.

    NOTE: XLA:CPU has no float8 scatter or gather: around one it converts the whole operand to
    float16 and back (measured: 0.8 s per step for a 1 GiB cache), and a bitcast of the whole
    cache is a copy too. So the pages stay uint8, and only the gathered tiles are bitcast."""
    return lax.bitcast_convert_type(x, jnp.uint8)


def _gather_pages(pages_and_scales, layer, page_ids):
    """(pages [L, K, num_pages, S, H], scales [L, K, num_pages, S] or None, fp8_dtype or None),
    page_ids [W, ppc] ->
    [W, K, ppc * S, H] in one gather (float32, dequantized when there are scales).

    All indices are advanced and adjacent, so the gather lands directly in [W, K, ppc, S, H]: the
    einsums that follow then have their batch dims (W, K) leading and need no transpose copy.
    """
    pages, scales, fp8_dtype = pages_and_scales
    num_kv_heads = pages.shape[1]
    kv_head = jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :, None]               # [1, K, 1]
    g = pages[layer, kv_head, page_ids[:, None, :]]                                    # [W, K, ppc, S, H]
    if fp8_dtype is not None:
        g = lax.bitcast_convert_type(g, fp8_dtype)
    if scales is not None:
        g = g.astype(jnp.float32) * scales[layer, kv_head, page_ids[:, None, :]][..., None].astype(
            jnp.float32)
    t, k, ppc, s, h = g.shape
    return g.reshape(t, k, ppc * s, h)


def _lead(scales):
    return None if scales is None else scales[None]


def _pages_per_chunk(per_page, pages_per_seq):
    """Largest divisor of P whose chunk (per_page elements per page) stays under _CHUNK_ELEMENTS."""
    per_page = max(1, per_page)
    best = 1
    for d in range(1, pages_per_seq + 1):
        if pages_per_seq % d == 0 and d * per_page <= _CHUNK_ELEMENTS:
            best = d
    return best


def _check_shapes(q, k_pages, block_tables, context_lens, query_start_loc):
    num_heads = q.shape[1]
    num_kv_heads = k_pages.shape[1]
    if q.ndim != 3 or k_pages.ndim != 5 or q.shape[2] != k_pages.shape[4]:
        raise ValueError(f"q must be [T, N, H] and pages [K, num_pages, S, H] with the same H; "
                         f"got q {q.shape}, pages {k_pages.shape[1:]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_tables.ndim != 2 or context_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"block_tables must be [B, P] and context_lens [B]; got "
                         f"{block_tables.shape} and {context_lens.shape}")
    if query_start_loc is not None and query_start_loc.shape != (block_tables.shape[0] + 1,):
        raise ValueError(f"query_start_loc must be [B+1] = [{block_tables.shape[0] + 1}]; "
                         f"got {query_start_loc.shape}")
