"""Triton ragged (prefill + decode) kernel and the pure-jnp reference, each against the dense NumPy
oracle (dense_oracle.py) and against each other: interpret mode on CPU, compiled on a GPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpaged_kernels import paged_attention, ragged_paged_attention, reference
from jpaged_kernels.triton_ragged_paged_attention import work_items
from jpaged_kernels.reference import as_bits
from jpaged_kernels.triton_common import default_pages_per_block
from dense_oracle import dense_attention
from paged_cases import (MODES, assert_close, masked_loads, quantized_inputs, random_cache, random_q,
                         random_sinks, random_tables, triton_kernel_ir, tt_dots)

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

# (N, K, H, S, P, dtype, block_q): MHA, GQA, MQA and G=3; head dims 64..256; pages 8..128.
GRID = [
    (4, 4, 64, 8, 4, jnp.float32, None),
    (4, 4, 80, 16, 4, jnp.bfloat16, 4),
    (8, 2, 128, 16, 4, jnp.float32, None),
    (8, 2, 64, 32, 4, jnp.bfloat16, 8),
    (8, 1, 80, 8, 4, jnp.float32, 2),
    (8, 1, 128, 8, 4, jnp.bfloat16, None),
    (6, 2, 96, 32, 3, jnp.float32, None),
    (4, 2, 256, 64, 2, jnp.float16, 16),
    (8, 2, 128, 128, 2, jnp.float32, None),
]


def mixed_batch(page_size, pages_per_seq):
    """(q_len, context_len) per sequence: decodes at 1, at a page boundary and at the table
    maximum; a whole prompt; a chunk after a cached prefix; a chunk ending at the table maximum."""
    top = page_size * pages_per_seq
    chunk_end = min(2, pages_per_seq - 1) * page_size + 3
    return [(1, 1), (5, 5), (1, page_size), (7, chunk_end), (1, top), (page_size + 2, top)]


def run_case(rng, seqs, heads, kv_heads, head_dim, page_size, pages_per_seq, dtype, interpret,
             num_padding=3, layers=None, layer=None, padding="arbitrary", sinks=False, kv_dtype=None, fp8_as_bits=True, **kwargs):
    q_lens, lens = zip(*seqs) if seqs else ((), ())
    query_start_loc = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    num_tokens = int(sum(q_lens)) + num_padding
    num_pages = len(seqs) * pages_per_seq + 3
    tables, live = random_tables(rng, lens, page_size, pages_per_seq, num_pages, padding)
    k, v = random_cache(rng, live, kv_heads, head_dim, dtype, num_layers=layers, layer=layer)
    q = random_q(rng, num_tokens, heads, head_dim, dtype)
    lens = jnp.asarray(lens, jnp.int32)
    if sinks:
        kwargs["sinks"] = random_sinks(rng, heads)
    oracle_k, oracle_v = k, v
    if kv_dtype is not None:               # a quantized cache: the oracle sees its exact values
        k, v, oracle_k, oracle_v = quantized_inputs(k, v, kv_dtype, kwargs, fp8_as_bits)
    out = ragged_paged_attention(q, k, v, tables, lens, query_start_loc, layer=layer,
                                 interpret=interpret, **kwargs)
    ref_kwargs = {a: b for a, b in kwargs.items()
                  if a in ("scale", "sliding_window", "soft_cap", "sinks", "k_scale", "v_scale", "fp8_dtype")}
    oracle_kwargs = {a: b for a, b in ref_kwargs.items()
                     if a not in ("k_scale", "v_scale", "fp8_dtype")}
    ref = reference.ragged_paged_attention(q, k, v, tables, lens, query_start_loc, layer=layer,
                                           **ref_kwargs)
    oracle = dense_attention(q, oracle_k, oracle_v, tables, lens, query_start_loc, layer=layer,
                             **oracle_kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(ref, oracle, dtype)
    assert_close(out, oracle, dtype)
    assert_close(out, ref, dtype)
    np.testing.assert_array_equal(np.asarray(out[num_tokens - num_padding:], np.float32), 0.0)
    return out


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,page_size,pages_per_seq,dtype,block_q", GRID)
def test_mixed_prefill_and_decode(heads, kv_heads, head_dim, page_size, pages_per_seq, dtype,
                                  block_q, interpret):
    rng = np.random.default_rng(0)
    run_case(rng, mixed_batch(page_size, pages_per_seq), heads, kv_heads, head_dim, page_size,
             pages_per_seq, dtype, interpret, block_q=block_q)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("soft_cap,sliding_window,sinks", [
    (5.0, None, False), (None, 1, False), (None, 6, False), (3.0, 13, False), (None, None, True),
    (50.0, 6, True)])
def test_soft_cap_sliding_window_and_sinks(soft_cap, sliding_window, sinks, interpret):
    rng = np.random.default_rng(1)
    run_case(rng, mixed_batch(8, 4), 8, 2, 64, 8, 4, jnp.float32, interpret, block_q=4,
             pages_per_block=2, soft_cap=soft_cap, sliding_window=sliding_window, sinks=sinks)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("dtype,head_dim,extra", [
    (jnp.float32, 64, dict(layers=3, layer=jnp.int32(1))),
    (jnp.bfloat16, 80, dict(sliding_window=6, sinks=True))])
def test_quantized_cache(kv_dtype, dtype, head_dim, extra, interpret):
    """int8 / float8 pages with a scale per token and KV head (kv_cache_dtype), one layer of an
    [L, ...] cache read in place (its scales too) or a window with sinks."""
    rng = np.random.default_rng(7)
    run_case(rng, mixed_batch(8, 4), 8, 2, head_dim, 8, 4, dtype, interpret, block_q=4,
             pages_per_block=2, kv_dtype=kv_dtype, **extra)


@pytest.mark.parametrize("interpret", MODES)
def test_traced_window_per_layer_compiles_once(interpret):
    """The [L, ...] cache with a different (traced) window per layer, one compilation."""
    rng = np.random.default_rng(5)
    seqs = mixed_batch(8, 4)
    q_lens, lens = zip(*seqs)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    tables, live = random_tables(rng, lens, 8, 4, len(seqs) * 4 + 3)
    k, v = random_cache(rng, live, 2, 64, jnp.float32, num_layers=2, layer=1)
    q = random_q(rng, int(sum(q_lens)), 8, 64, jnp.float32)
    lens = jnp.asarray(lens, jnp.int32)
    traces = []

    @jax.jit
    def attend(window):
        traces.append(window)
        return ragged_paged_attention(q, k, v, tables, lens, qsl, layer=jnp.int32(1),
                                      sliding_window=window, block_q=4, pages_per_block=2,
                                      interpret=interpret)

    for window in (5, 1 << 30):
        assert_close(attend(jnp.int32(window)), dense_attention(
            q, k, v, tables, lens, qsl, layer=1, sliding_window=window), jnp.float32)
    assert len(traces) == 1


@pytest.mark.parametrize("interpret", MODES)
def test_layer_and_garbage_padding(interpret):
    rng = np.random.default_rng(2)
    run_case(rng, mixed_batch(16, 3), 8, 2, 64, 16, 3, jnp.float32, interpret, layers=3,
             layer=jnp.int32(2), padding="garbage", pages_per_block=1)


@pytest.mark.parametrize("interpret", MODES)
def test_decode_batch_matches_decode_kernel(interpret):
    """A batch of one-token sequences through the ragged kernel equals the decode kernel."""
    rng = np.random.default_rng(3)
    lens = [1, 9, 16, 40]
    out = run_case(rng, [(1, n) for n in lens], 8, 2, 64, 8, 5, jnp.float32, interpret,
                   num_padding=0)
    rng = np.random.default_rng(3)          # same draws as run_case made
    tables, live = random_tables(rng, lens, 8, 5, 4 * 5 + 3)
    k, v = random_cache(rng, live, 2, 64, jnp.float32)
    q = random_q(rng, 4, 8, 64, jnp.float32)
    decode = paged_attention(q, k, v, tables, jnp.asarray(lens, jnp.int32), interpret=interpret)
    np.testing.assert_allclose(np.asarray(out), np.asarray(decode), atol=1e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_random_ragged_batches(seed, data):
    """Property: any mix of q_len (zero-length sequences too) and context length in one fixed
    token bucket, with random tables, equals the reference; padding tokens give 0."""
    page_size, pages_per_seq, num_seqs, bucket = 8, 4, 4, 24
    top = page_size * pages_per_seq
    q_lens = data.draw(st.lists(st.integers(0, 9), min_size=num_seqs, max_size=num_seqs)
                       .filter(lambda lens: sum(lens) <= bucket))
    lens = [data.draw(st.integers(max(q, 1), top)) for q in q_lens]
    run_case(np.random.default_rng(seed), list(zip(q_lens, lens)), 8, 2, 64, page_size,
             pages_per_seq, jnp.float32, True, num_padding=bucket - sum(q_lens), block_q=4,
             pages_per_block=2)


def test_work_items_cover_every_token_once():
    query_start_loc = jnp.asarray([0, 5, 5, 6, 23], jnp.int32)     # q_lens 5, 0, 1, 17
    seq, first, end = np.asarray(work_items(query_start_loc, 26, 4))
    assert seq.shape == (11,)                                      # cdiv(26, 4) + B
    covered = np.concatenate([np.arange(a, b) for a, b in zip(first, end)])
    np.testing.assert_array_equal(np.sort(covered), np.arange(23))
    expected = [0, 0, 2, 3, 3, 3, 3, 3]
    np.testing.assert_array_equal(seq[end > first], expected)


def test_rejects_bad_shapes():
    q = jnp.zeros((6, 8, 64))
    k = jnp.zeros((2, 10, 16, 64))
    tables, lens = jnp.zeros((2, 4), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"query_start_loc must be \[B\+1\].*\(2,\)"):
        ragged_paged_attention(q, k, k, tables, lens, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"q \(6, 8, 32\)"):
        ragged_paged_attention(jnp.zeros((6, 8, 32)), k, k, tables, lens,
                               jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="block_q"):
        ragged_paged_attention(q, k, k, tables, lens, jnp.zeros((3,), jnp.int32), block_q=3)


@pytest.mark.parametrize("head_dim,page_size,dtype", [
    (64, 8, jnp.float32), (80, 16, jnp.bfloat16), (128, 32, jnp.float16),
    (256, 128, jnp.bfloat16)])
def test_triton_ir_has_the_designed_tiles(head_dim, page_size, dtype):
    """Lower for CUDA on CPU and read the Triton IR back: grid (cdiv(T, BQ) + B, K); R = BQ x Gp
    = 16 x 4 query rows (G = 3 padded to 4); two dots per KV block, QK^T and PV; masked K/V tile
    loads; the output stored under a mask (padding rows and lanes untouched)."""
    sds = jax.ShapeDtypeStruct
    num_tokens, kv_heads, num_seqs = 37, 4, 3
    q, k = sds((num_tokens, 12, head_dim), dtype), sds((2, kv_heads, 40, page_size, head_dim), dtype)
    tables, lens = sds((num_seqs, 7), jnp.int32), sds((num_seqs,), jnp.int32)
    qsl = sds((num_seqs + 1,), jnp.int32)
    lowered = ragged_paged_attention.trace(q, k, k, tables, lens, qsl, layer=sds((), jnp.int32),
                                           soft_cap=30.0, sliding_window=64).lower(
        lowering_platforms=("cuda",))
    grid, ttir = triton_kernel_ir(lowered)
    padded = max(16, 1 << (head_dim - 1).bit_length())
    ppb = default_pages_per_block(page_size, head_dim)
    block, rows = ppb * page_size, 16 * 4
    assert grid == (-(-num_tokens // 16) + num_seqs, kv_heads, 1)
    assert tt_dots(ttir) == [f"{rows}x{padded} * {padded}x{block} -> {rows}x{block}",
                             f"{rows}x{block} * {block}x{padded} -> {rows}x{padded}"]
    assert masked_loads(ttir, f"{ppb}x{page_size}x{padded}") == 2
    assert re.search(rf"tt\.store %\w+, %\w+, %\w+ : tensor<{rows}x{padded}x!tt\.ptr", ttir)
