"""The pure-jnp reference attention (the engine's CPU path and the kernels' comparison) against the
dense NumPy oracle, over the kernel test grid plus what only the reference has: its elementwise
decode path and matrix-product path, windows of several sizes, and the chunked online softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_oracle import dense_attention, dequantized_pages
from jpaged_kernels import reference
from paged_cases import (assert_close, quantize_cache, random_cache, random_q, random_sinks,
                         random_tables)
from test_paged_attention import GRID as DECODE_GRID, context_lens_for
from test_ragged_paged_attention import GRID as RAGGED_GRID, mixed_batch

WINDOW_CAP = [(None, None), (5.0, None), (None, 1), (None, 7), (3.0, 12), (None, 100)]


def decode_case(rng, batch, heads, kv_heads, head_dim, page_size, pages_per_seq, dtype, lens,
                **kwargs):
    tables, live = random_tables(rng, lens, page_size, pages_per_seq,
                                 batch * pages_per_seq + 3)
    k, v = random_cache(rng, live, kv_heads, head_dim, dtype)
    q = random_q(rng, batch, heads, head_dim, dtype)
    lens = jnp.asarray(lens, jnp.int32)
    out = reference.paged_attention(q, k, v, tables, lens, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, dense_attention(q, k, v, tables, lens, **kwargs), dtype)


def ragged_case(rng, seqs, heads, kv_heads, head_dim, page_size, pages_per_seq, dtype,
                num_padding=3, layers=None, layer=None, **kwargs):
    q_lens, lens = zip(*seqs)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    tables, live = random_tables(rng, lens, page_size, pages_per_seq,
                                 len(seqs) * pages_per_seq + 3)
    k, v = random_cache(rng, live, kv_heads, head_dim, dtype, num_layers=layers, layer=layer)
    q = random_q(rng, int(sum(q_lens)) + num_padding, heads, head_dim, dtype)
    lens = jnp.asarray(lens, jnp.int32)
    out = reference.ragged_paged_attention(q, k, v, tables, lens, qsl, layer=layer, **kwargs)
    assert_close(out, dense_attention(q, k, v, tables, lens, qsl, layer=layer, **kwargs), dtype)


@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,page_size,pages_per_seq,dtype,_splits",
                         DECODE_GRID)
@pytest.mark.parametrize("soft_cap,sliding_window", WINDOW_CAP[:3])
def test_decode_matches_the_oracle(batch, heads, kv_heads, head_dim, page_size, pages_per_seq,
                                   dtype, _splits, soft_cap, sliding_window):
    """G = 32 query heads per KV head takes the matrix-product path, the others the elementwise."""
    decode_case(np.random.default_rng(0), batch, heads, kv_heads, head_dim, page_size,
                pages_per_seq, dtype, context_lens_for(page_size, pages_per_seq)[:batch],
                soft_cap=soft_cap, sliding_window=sliding_window)


@pytest.mark.parametrize("heads,kv_heads,head_dim,page_size,pages_per_seq,dtype,_block_q",
                         RAGGED_GRID)
@pytest.mark.parametrize("soft_cap,sliding_window", WINDOW_CAP[:3])
def test_ragged_matches_the_oracle(heads, kv_heads, head_dim, page_size, pages_per_seq, dtype,
                                   _block_q, soft_cap, sliding_window):
    ragged_case(np.random.default_rng(1), mixed_batch(page_size, pages_per_seq), heads, kv_heads,
                head_dim, page_size, pages_per_seq, dtype, soft_cap=soft_cap,
                sliding_window=sliding_window)


@pytest.mark.parametrize("soft_cap,sliding_window", WINDOW_CAP)
@pytest.mark.parametrize("seqs", [
    [(1, 1), (40, 40), (3, 19)],                        # windows of 16 rows (mean q_len)
    [(128, 130), (1, 64), (64, 64)],                    # windows of 64; one sequence in 3 windows
    [(2, 2), (1, 5), (1, 9), (1, 30), (2, 31)],         # windows of 1-2 rows: the elementwise path
])
def test_window_sizes_and_options(seqs, soft_cap, sliding_window):
    ragged_case(np.random.default_rng(2), seqs, 8, 2, 32, 8, 17, jnp.float32, layers=2,
                layer=jnp.int32(1), soft_cap=soft_cap, sliding_window=sliding_window)


@pytest.mark.parametrize("seqs", [[(1, 1), (40, 40), (3, 19)], [(2, 2), (1, 5), (1, 30)]])
@pytest.mark.parametrize("soft_cap,sliding_window", [(None, None), (30.0, 7)])
def test_sinks(seqs, soft_cap, sliding_window):
    """Attention sinks in the matrix-product and elementwise paths, ragged and decode."""
    rng = np.random.default_rng(6)
    sinks = random_sinks(rng, 8)
    ragged_case(rng, seqs, 8, 2, 32, 8, 6, jnp.float32, soft_cap=soft_cap,
                sliding_window=sliding_window, sinks=sinks)
    decode_case(rng, 3, 8, 2, 32, 8, 6, jnp.float32, [n for _, n in seqs], sinks=sinks,
                soft_cap=soft_cap, sliding_window=sliding_window)


@pytest.mark.parametrize("sliding_window,sinks", [(None, False), (9, False), (9, True)])
def test_chunked_online_softmax(monkeypatch, sliding_window, sinks):
    """Tables too large for one chunk attend page chunk by page chunk (online softmax)."""
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 4096)
    assert reference._pages_per_chunk(8 * 2 * 4 * 32, 12) < 12
    rng = np.random.default_rng(3)
    extra = dict(sinks=random_sinks(rng, 8)) if sinks else {}
    ragged_case(rng, [(5, 90), (1, 3), (17, 17)], 8, 2, 32, 8, 12, jnp.float32,
                sliding_window=sliding_window, **extra)
    decode_case(rng, 4, 8, 2, 32, 8, 12, jnp.float32, [1, 8, 50, 96],
                sliding_window=sliding_window, **extra)


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("layered", [False, True])
def test_write_kv_quantizes_per_token_and_head(kv_dtype, layered):
    """write_kv into an int8 / float8 cache stores each token's K and V of each KV head as the
    independent NumPy quantization does (paged_cases.quantize_cache), scales included, and
    touches no other slot; the dequantized values are within the type's step of the input."""
    rng = np.random.default_rng(8)
    num_kv_heads, num_pages, page_size, head_dim, num_layers = 2, 6, 4, 32, 3
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    if layered:
        shape = (num_layers, *shape)
    bits = kv_dtype != jnp.int8                       # float8 pages as the engine stores them
    stored = jnp.uint8 if bits else kv_dtype
    k_cache, v_cache = jnp.zeros(shape, stored), jnp.zeros(shape, stored)
    k_scale, v_scale = jnp.ones(shape[:-1], jnp.float16), jnp.ones(shape[:-1], jnp.float16)
    k = rng.standard_normal((5, num_kv_heads, head_dim)).astype(np.float32) * 3
    v = rng.standard_normal((5, num_kv_heads, head_dim)).astype(np.float32)
    k[2, 1] = 0.0                                      # an all-zero vector keeps a finite scale
    slots = np.array([4, 5, 9, 23, 0], np.int32)
    out = reference.write_kv(k_cache, v_cache, jnp.asarray(k), jnp.asarray(v),
                             jnp.asarray(slots), layer=1 if layered else None,
                             k_scale=k_scale, v_scale=v_scale, fp8_dtype=kv_dtype if bits else None)
    for new, pages, scales in [(k, out[0], out[2]), (v, out[1], out[3])]:
        assert pages.dtype == stored
        pages = jax.lax.bitcast_convert_type(pages, kv_dtype) if bits else pages
        pages, scales = (pages[1], scales[1]) if layered else (pages, scales)
        want_q, want_scale = quantize_cache(new, kv_dtype)                # [T, K, H], [T, K]
        got_q = np.asarray(pages[:, slots // page_size, slots % page_size], np.float32)
        got_scale = np.asarray(scales[:, slots // page_size, slots % page_size], np.float32)
        np.testing.assert_array_equal(got_q, np.swapaxes(np.asarray(want_q, np.float32), 0, 1))
        np.testing.assert_array_equal(got_scale, np.asarray(want_scale, np.float32).T)
        step = 1 / 127 if kv_dtype == jnp.int8 else 2.0 ** -(jnp.finfo(kv_dtype).nmant + 1)
        top = np.abs(new).max(axis=-1, keepdims=True)
        back = np.swapaxes(dequantized_pages(got_q, got_scale), 0, 1)
        assert np.all(np.abs(back - new) <= top * step * 0.51 + np.abs(new) * step + 1e-7)
        untouched = np.ones(pages.shape[:-1], bool)
        untouched[:, slots // page_size, slots % page_size] = False
        assert not np.asarray(pages, np.float32)[untouched].any()
