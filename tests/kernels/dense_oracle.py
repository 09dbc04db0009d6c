"""An independent, obviously-correct paged attention: NumPy float64, every sequence's K and V copied
out of its pages into one dense array, a plain masked softmax per query token.

It shares no code with jpaged_kernels (neither the windows and online softmax of reference.py
nor the kernels' tiling), so the reference and the kernels are both checked against it.
"""

from __future__ import annotations

import numpy as np


def dense_attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc=None, *,
                    scale=None, sliding_window=None, soft_cap=None, sinks=None,
                    layer=None) -> np.ndarray:
    """q [T, N, H]; pages [K, num_pages, S, H] (or [L, ...] with `layer`); block_tables [B, P];
    context_lens [B]; query_start_loc [B+1] (None: one query token per sequence, decode). Query j
    of sequence i sits at position context_lens[i] - q_len_i + j and sees positions p with
    p <= its own and p > its own - sliding_window. sinks [N]: one extra logit per query head in
    the softmax's denominator, with no value. Rows of no sequence (padding) give 0.
    Returns [T, N, H] float64."""
    q = np.asarray(q, np.float64)
    k_pages, v_pages = np.asarray(k_pages, np.float64), np.asarray(v_pages, np.float64)
    if layer is not None:
        k_pages, v_pages = k_pages[int(layer)], v_pages[int(layer)]
    tables, lens = np.asarray(block_tables), np.asarray(context_lens)
    starts = np.arange(len(lens) + 1) if query_start_loc is None else np.asarray(query_start_loc)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = np.zeros_like(q)
    for i, length in enumerate(lens):
        first, end = int(starts[i]), int(starts[i + 1])
        if end == first or length == 0:
            continue
        pages = tables[i, :-(-int(length) // page_size)]
        keys = k_pages[:, pages].reshape(num_kv_heads, -1, head_dim)[:, :length]   # [K, C, H]
        values = v_pages[:, pages].reshape(num_kv_heads, -1, head_dim)[:, :length]
        for j, token in enumerate(range(first, end)):
            pos = length - (end - first) + j
            visible = np.arange(length) <= pos
            if sliding_window is not None:
                visible &= np.arange(length) > pos - sliding_window
            for h in range(num_heads):
                scores = keys[h // group] @ q[token, h] * scale                     # [C]
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                scores = np.where(visible, scores, -np.inf)
                sink = -np.inf if sinks is None else float(sinks[h])
                top = max(scores.max(), sink)
                weights = np.exp(scores - top)
                out[token, h] = weights / (weights.sum() + np.exp(sink - top)) @ values[h // group]
    return out


def dequantized_pages(pages, scales) -> np.ndarray:
    """A quantized cache's pages [..., S, H] with their scales [..., S] as float64."""
    return np.asarray(pages, np.float64) * np.asarray(scales, np.float64)[..., None]
