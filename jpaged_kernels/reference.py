"""Pure-jnp paged attention: the definition every kernel is tested against.

Shape legend (used throughout jpaged):
  T tokens in the batch    B sequences        N query heads     K KV heads
  G query heads per KV head (N // K)          H head dim        P pages per sequence (block table width)
  S page size              L layers           C context positions (a multiple of S)

Cache layout (DESIGN.md): one layer's pages are `[K, num_pages, S, H]`; the engine keeps all layers in
one `[L, K, num_pages, S, H]` array and passes `layer=` so no per-layer copy of the cache is made.
Slot of token t of a sequence: `block_tables[t // S] * S + t % S`. Page 0 is the null page that padding
entries point at; it is never read for a valid position because every read is masked by position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite "minus infinity": fully masked rows (padding tokens) then give exp(...) == 0, never NaN.
_MASK_VALUE = -1e30
# Upper bound on elements of one gathered K (or V) chunk, [T, K, pages_per_chunk * S, H].
_CHUNK_ELEMENTS = 1 << 23


def paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, layer=None,
                    sliding_window=None, soft_cap=None, interpret=False):
    """Decode attention: one new token per sequence.

    q [B, N, H]; k_pages/v_pages [K, num_pages, S, H] (or [L, K, num_pages, S, H] with `layer`);
    block_tables [B, P] int32; context_lens [B] int32 (tokens to attend to, the current one included;
    0 for a padding slot, whose output is 0). Returns [B, N, H]. `interpret` is accepted for
    signature parity with the Pallas kernels.
    """
    del interpret
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    block_tables, context_lens = jnp.asarray(block_tables), jnp.asarray(context_lens)
    _check_shapes(q, k_pages, block_tables, context_lens, None)
    return _attend(q, k_pages, v_pages, layer, block_tables, context_lens - 1, context_lens > 0,
                   scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)


def ragged_paged_attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *,
                           scale=None, layer=None, sliding_window=None, soft_cap=None,
                           interpret=False):
    """Attention for a ragged batch of prefill chunks and decode tokens.

    q [T, N, H]; block_tables [B, P]; context_lens [B] (KV length including the new tokens);
    query_start_loc [B+1] (cumulative new-token counts). New token j of sequence i sits at position
    `context_lens[i] - q_len_i + j` and attends causally to positions <= its own. Tokens past
    `query_start_loc[B]` are padding: their output is 0. Returns [T, N, H] in q's dtype.
    """
    del interpret
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    block_tables, context_lens, query_start_loc = map(jnp.asarray, (block_tables, context_lens,
                                                                    query_start_loc))
    _check_shapes(q, k_pages, block_tables, context_lens, query_start_loc)
    num_tokens, num_seqs = q.shape[0], block_tables.shape[0]
    token = jnp.arange(num_tokens, dtype=jnp.int32)                                   # [T]
    seq = jnp.clip(jnp.searchsorted(query_start_loc, token, side="right", method="compare_all") - 1,
                   0, num_seqs - 1)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]                               # [B]
    position = context_lens[seq] - q_lens[seq] + token - query_start_loc[seq]         # [T]
    valid = token < query_start_loc[num_seqs]                                         # [T]
    return _attend(q, k_pages, v_pages, layer, block_tables[seq], position, valid,
                   scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)


def _attend(q, k_pages, v_pages, layer, token_tables, position, valid, *, scale, sliding_window,
            soft_cap):
    """Each token t attends to logical positions <= position[t] of the pages in token_tables[t].

    q [T, N, H]; pages [L, K, num_pages, S, H]; token_tables [T, P]; position, valid [T].
    Online softmax over chunks of pages, so the gathered K/V never exceed _CHUNK_ELEMENTS.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = k_pages.shape
    pages_per_seq = token_tables.shape[1]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * scale

    pages_per_chunk = _pages_per_chunk(num_tokens, num_kv_heads, page_size, head_dim, pages_per_seq)
    chunk_len = pages_per_chunk * page_size

    def scores(chunk):
        """Masked scores of every token against one chunk of its pages, and that chunk's V."""
        pages = jax.lax.dynamic_slice_in_dim(token_tables, chunk * pages_per_chunk,
                                             pages_per_chunk, axis=1)                # [T, ppc]
        k = _gather_pages(k_pages, layer, pages)                                   # [T, K, C, H]
        s = jnp.einsum("TKGH,TKCH->TKGC", qg, k.astype(jnp.float32))
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = chunk * chunk_len + jnp.arange(chunk_len, dtype=jnp.int32)        # [C]
        mask = (kv_pos[None, :] <= position[:, None]) & valid[:, None]            # [T, C]
        if sliding_window is not None:
            mask &= kv_pos[None, :] > position[:, None] - sliding_window
        mask = mask[:, None, None, :]
        return jnp.where(mask, s, _MASK_VALUE), _gather_pages(v_pages, layer, pages), mask

    def attend_chunk(carry, chunk):
        """Online softmax: fold one chunk into the running max m, sum l and output acc."""
        m, l, acc = carry                                # [T, K, G], [T, K, G], [T, K, G, H]
        s, v, mask = scores(chunk)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("TKGC,TKCH->TKGH", p, v.astype(jnp.float32))
        return (m_new, l, acc), None

    num_chunks = pages_per_seq // pages_per_chunk
    if num_chunks == 1:   # the common case: a plain masked softmax, no running max to carry
        s, v, mask = scores(0)
        p = jnp.where(mask, jnp.exp(s - s.max(axis=-1, keepdims=True)), 0.0)
        l = p.sum(axis=-1)
        acc = jnp.einsum("TKGC,TKCH->TKGH", p, v.astype(jnp.float32))
    else:
        init = (jnp.full((num_tokens, num_kv_heads, group), _MASK_VALUE, jnp.float32),
                jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
                jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(attend_chunk, init, jnp.arange(num_chunks))
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def write_kv(k_cache, v_cache, k, v, slot_mapping, *, layer=None):
    """Write new tokens' K/V into their pages (an XLA scatter; in place when the cache is donated).

    k_cache/v_cache [K, num_pages, S, H] (or [L, K, num_pages, S, H] with `layer`); k, v [T, K, H];
    slot_mapping [T] int32. Padding tokens carry slots inside the null page 0.
    """
    page_size = k_cache.shape[-2]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    if layer is None:
        return (k_cache.at[:, page, offset].set(jnp.swapaxes(k, 0, 1).astype(k_cache.dtype)),
                v_cache.at[:, page, offset].set(jnp.swapaxes(v, 0, 1).astype(v_cache.dtype)))
    # Advanced indices split by a slice: the indexed result is laid out [T, K, H].
    return (k_cache.at[layer, :, page, offset].set(k.astype(k_cache.dtype)),
            v_cache.at[layer, :, page, offset].set(v.astype(v_cache.dtype)))


def _gather_pages(pages, layer, page_ids):
    """pages [L, K, num_pages, S, H], page_ids [T, ppc] -> [T, K, ppc * S, H] in one gather.

    All indices are advanced and adjacent, so the gather lands directly in [T, K, ppc, S, H]: the
    einsums that follow then have their batch dims (T, K) leading and need no transpose copy.
    """
    num_kv_heads = pages.shape[1]
    kv_head = jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :, None]               # [1, K, 1]
    g = pages[layer, kv_head, page_ids[:, None, :]]                                    # [T, K, ppc, S, H]
    t, k, ppc, s, h = g.shape
    return g.reshape(t, k, ppc * s, h)


def _pages_per_chunk(num_tokens, num_kv_heads, page_size, head_dim, pages_per_seq):
    """Largest divisor of P whose gathered chunk stays under _CHUNK_ELEMENTS (a static choice)."""
    per_page = max(1, num_tokens * num_kv_heads * page_size * head_dim)
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
