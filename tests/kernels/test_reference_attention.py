"""The pure-jnp reference attention (the engine's CPU path and the kernels' comparison) against the
dense NumPy oracle, over the kernel test grid plus what only the reference has: its elementwise
decode path and matrix-product path, windows of several sizes, and the chunked online softmax."""

import jax.numpy as jnp
import numpy as np
import pytest

from dense_oracle import dense_attention
from jpaged_kernels import reference
from paged_cases import assert_close, random_cache, random_q, random_sinks, random_tables
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
