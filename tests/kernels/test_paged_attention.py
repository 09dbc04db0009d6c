"""Triton decode kernel and the pure-jnp reference, each against the dense NumPy oracle
(dense_oracle.py) and against each other: interpret mode on CPU, compiled on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpaged_kernels import paged_attention, reference
from jpaged_kernels.reference import as_bits
from jpaged_kernels.triton_common import default_pages_per_block
from dense_oracle import dense_attention
from paged_cases import (MODES, assert_close, masked_loads, quantized_inputs, random_cache, random_q,
                         random_sinks, random_tables, triton_kernel_ir, tt_dots)

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

# (B, N, K, H, S, P, dtype, num_splits): every head layout (MHA, GQA, MQA, G > 16), head dim
# (64, 80, 96, 128, 256) and page size (8..128) appears; P is the table width.
GRID = [
    (4, 4, 4, 64, 8, 6, jnp.float32, None),        # MHA, S=8 (2 pages per block)
    (4, 4, 4, 80, 16, 5, jnp.bfloat16, 2),         # MHA, padded head dim
    (4, 8, 2, 128, 16, 5, jnp.float32, 3),         # GQA 4, odd split count
    (4, 8, 2, 64, 32, 4, jnp.bfloat16, None),      # GQA 4, S=32
    (4, 8, 1, 80, 8, 6, jnp.float32, 1),           # MQA, padded head dim, no split
    (4, 8, 1, 128, 8, 6, jnp.bfloat16, 6),         # MQA, more splits than needed
    (4, 6, 2, 96, 32, 3, jnp.float32, None),       # G=3 (padded to 16 rows), H=96
    (4, 32, 1, 64, 16, 4, jnp.bfloat16, None),     # G=32 > 16 rows
    (4, 4, 2, 256, 64, 3, jnp.float16, 2),         # H=256, S=64, float16
    (4, 8, 2, 128, 128, 2, jnp.float32, None),     # S=128 (one page per block)
]


def context_lens_for(page_size, pages_per_seq):
    """1, an exact page multiple, a ragged length, and the table maximum."""
    return [1, page_size, min(2, pages_per_seq - 1) * page_size + 3, pages_per_seq * page_size]


def run_case(rng, batch, heads, kv_heads, head_dim, page_size, pages_per_seq, dtype, lens,
             interpret, padding="arbitrary", sinks=False, kv_dtype=None, fp8_as_bits=True, **kwargs):
    num_pages = batch * pages_per_seq + 3
    tables, live = random_tables(rng, lens, page_size, pages_per_seq, num_pages, padding)
    k, v = random_cache(rng, live, kv_heads, head_dim, dtype)
    q = random_q(rng, batch, heads, head_dim, dtype)
    lens = jnp.asarray(lens, jnp.int32)
    if sinks:
        kwargs["sinks"] = random_sinks(rng, heads)
    oracle_k, oracle_v = k, v
    if kv_dtype is not None:               # a quantized cache: the oracle sees its exact values
        k, v, oracle_k, oracle_v = quantized_inputs(k, v, kv_dtype, kwargs, fp8_as_bits)
    out = paged_attention(q, k, v, tables, lens, interpret=interpret, **kwargs)
    ref_kwargs = {a: b for a, b in kwargs.items()
                  if a in ("scale", "sliding_window", "soft_cap", "sinks", "k_scale", "v_scale", "fp8_dtype")}
    oracle_kwargs = {a: b for a, b in ref_kwargs.items()
                     if a not in ("k_scale", "v_scale", "fp8_dtype")}
    ref = reference.paged_attention(q, k, v, tables, lens, **ref_kwargs)
    oracle = dense_attention(q, oracle_k, oracle_v, tables, lens, **oracle_kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(ref, oracle, dtype)
    assert_close(out, oracle, dtype)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,page_size,pages_per_seq,dtype,num_splits",
                         GRID)
def test_matches_reference(batch, heads, kv_heads, head_dim, page_size, pages_per_seq, dtype,
                           num_splits, interpret):
    rng = np.random.default_rng(0)
    lens = context_lens_for(page_size, pages_per_seq)[:batch]
    run_case(rng, batch, heads, kv_heads, head_dim, page_size, pages_per_seq, dtype, lens,
             interpret, num_splits=num_splits)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("soft_cap,sliding_window,sinks", [
    (5.0, None, False), (None, 1, False), (None, 7, False), (None, 20, False), (3.0, 12, False),
    (None, None, True), (50.0, 7, True)])
def test_soft_cap_sliding_window_and_sinks(soft_cap, sliding_window, sinks, interpret):
    """Sinks with 2 splits: each split's partial sums merge with the sink once."""
    rng = np.random.default_rng(1)
    run_case(rng, 4, 8, 2, 64, 8, 5, jnp.float32, [1, 8, 19, 40], interpret, num_splits=2,
             pages_per_block=2, soft_cap=soft_cap, sliding_window=sliding_window, sinks=sinks)


KV_DTYPES = [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype,head_dim,extra", [
    (jnp.float32, 64, {}), (jnp.bfloat16, 80, dict(sliding_window=7, sinks=True)),
    (jnp.float32, 64, dict(fp8_as_bits=False))])
def test_quantized_cache(kv_dtype, dtype, head_dim, extra, interpret):
    """int8 / float8 pages with a scale per token and KV head (kv_cache_dtype): equal to the
    oracle on the dequantized pages, with 2 splits and a padded head dim; float8 pages as uint8
    bit patterns (the engine's cache) or as float8 arrays."""
    rng = np.random.default_rng(6)
    run_case(rng, 4, 8, 2, head_dim, 8, 5, dtype, [1, 8, 19, 40], interpret, num_splits=2,
             pages_per_block=2, kv_dtype=kv_dtype, **extra)


@pytest.mark.parametrize("interpret", MODES)
def test_traced_window_per_layer_compiles_once(interpret):
    """One jit over layers of different windows (a global layer passes a window past any
    length): the window is data, like the layer index."""
    rng = np.random.default_rng(4)
    lens = [3, 17, 40]
    tables, live = random_tables(rng, lens, 8, 5, 18)
    k, v = random_cache(rng, live, 2, 64, jnp.float32)
    q = random_q(rng, 3, 8, 64, jnp.float32)
    lens = jnp.asarray(lens, jnp.int32)
    traces = []

    @jax.jit
    def attend(window):
        traces.append(window)
        return paged_attention(q, k, v, tables, lens, sliding_window=window, num_splits=2,
                               pages_per_block=2, interpret=interpret)

    for window in (4, 1 << 30):
        assert_close(attend(jnp.int32(window)),
                     dense_attention(q, k, v, tables, lens, sliding_window=window), jnp.float32)
    assert len(traces) == 1


@pytest.mark.parametrize("interpret", MODES)
def test_garbage_padding_entries_are_never_read(interpret):
    """Out-of-range padding entries are clamped, never followed; a length-0 row (a padded batch
    slot) gives 0."""
    rng = np.random.default_rng(2)
    run_case(rng, 4, 8, 2, 64, 16, 4, jnp.float32, [0, 16, 20, 33], interpret, padding="garbage",
             num_splits=2, pages_per_block=1)


@pytest.mark.parametrize("interpret", MODES)
def test_layer_reads_one_layer_in_place(interpret):
    rng = np.random.default_rng(3)
    batch, heads, kv_heads, head_dim, page_size, pages_per_seq, layers = 3, 8, 2, 64, 16, 3, 3
    lens = [5, 16, 48]
    tables, live = random_tables(rng, lens, page_size, pages_per_seq, 12)
    q = random_q(rng, batch, heads, head_dim, jnp.float32)
    lens = jnp.asarray(lens, jnp.int32)
    traces = []

    @jax.jit
    def attend(k, v, layer):
        traces.append(layer)
        return paged_attention(q, k, v, tables, lens, layer=layer, interpret=interpret)

    for layer in (1, 2):
        k, v = random_cache(rng, live, kv_heads, head_dim, jnp.float32, num_layers=layers,
                            layer=layer)
        out = attend(k, v, jnp.int32(layer))
        assert_close(out, reference.paged_attention(q, k, v, tables, lens, layer=layer),
                     jnp.float32)
        assert_close(out, reference.paged_attention(q, k[layer], v[layer], tables, lens),
                     jnp.float32)
    assert len(traces) == 1                                  # the layer index is data, not shape


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_splits=st.sampled_from([1, 2, 5]),
       data=st.data())
def test_random_block_tables(seed, num_splits, data):
    """Property: for any distinct page assignment, any padding entries and any lengths in
    1..P*S, the kernel equals the reference."""
    batch, page_size, pages_per_seq = 3, 8, 5
    lens = data.draw(st.lists(st.integers(1, page_size * pages_per_seq), min_size=batch,
                              max_size=batch))
    padding = data.draw(st.sampled_from(["arbitrary", "garbage"]))
    run_case(np.random.default_rng(seed), batch, 4, 2, 64, page_size, pages_per_seq,
             jnp.float32, lens, True, padding=padding, num_splits=num_splits,
             pages_per_block=2)


def test_rejects_bad_shapes():
    q = jnp.zeros((2, 8, 64))
    k = jnp.zeros((3, 10, 16, 64))
    tables, lens = jnp.zeros((2, 4), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"num_heads \(8"):
        paged_attention(q, k, k, tables, lens, interpret=True)
    with pytest.raises(ValueError, match=r"\(2, 10, 12, 64\)"):
        paged_attention(q, jnp.zeros((2, 10, 12, 64)), jnp.zeros((2, 10, 12, 64)), tables, lens)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        paged_attention(q, k[:2], k[:2], jnp.zeros((3, 4), jnp.int32), lens)
    with pytest.raises(ValueError, match="pages_per_block"):
        paged_attention(q, k[:2], k[:2], tables, lens, pages_per_block=3)
    with pytest.raises(ValueError, match="layer given"):
        paged_attention(q, k[:2], k[:2], tables, lens, layer=0)


@pytest.mark.parametrize("head_dim,page_size,dtype", [
    (64, 8, jnp.float32), (80, 16, jnp.bfloat16), (96, 32, jnp.float16),
    (128, 16, jnp.bfloat16), (256, 128, jnp.bfloat16)])
def test_triton_ir_has_the_designed_tiles(head_dim, page_size, dtype):
    """Lower for CUDA on CPU (no GPU needed) and read the kernel's Triton IR back: the grid is
    (B, K, splits); the inner loop makes exactly two dots, QK^T [R, Hp] x [Hp, BK] and PV
    [R, BK] x [BK, Hp] with R = 16 rows (G = 4 padded) and Hp = H padded to a power of two;
    the K and V page tiles [ppb, S, Hp] are loaded under a mask."""
    sds = jax.ShapeDtypeStruct
    batch, kv_heads, pages_per_seq = 3, 8, 37
    q, k = sds((batch, 32, head_dim), dtype), sds((2, kv_heads, 40, page_size, head_dim), dtype)
    tables, lens = sds((batch, pages_per_seq), jnp.int32), sds((batch,), jnp.int32)
    lowered = paged_attention.trace(q, k, k, tables, lens, layer=sds((), jnp.int32),
                                    soft_cap=30.0, sliding_window=64, num_splits=2).lower(
        lowering_platforms=("cuda",))
    grid, ttir = triton_kernel_ir(lowered)
    padded = max(16, 1 << (head_dim - 1).bit_length())
    ppb = default_pages_per_block(page_size, head_dim)
    block = ppb * page_size
    assert grid == (batch, kv_heads, min(2, -(-pages_per_seq // ppb)))  # splits <= blocks
    assert tt_dots(ttir) == [f"16x{padded} * {padded}x{block} -> 16x{block}",
                             f"16x{block} * {block}x{padded} -> 16x{padded}"]
    assert masked_loads(ttir, f"{ppb}x{page_size}x{padded}") == 2        # K and V tiles


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_triton_ir_of_a_quantized_cache(kv_dtype):
    """int8 / float8 (uint8 bit patterns) pages lower for CUDA: the same two dots in the query's
    dtype (the tile is converted as loaded) and the scale tiles [ppb, S] loaded under a mask."""
    sds = jax.ShapeDtypeStruct
    page_size, head_dim = 16, 64
    q = sds((2, 8, head_dim), jnp.bfloat16)
    bits = kv_dtype != jnp.int8                       # float8 pages as the engine stores them
    k = sds((2, 2, 40, page_size, head_dim), jnp.uint8 if bits else kv_dtype)
    scales = sds((2, 2, 40, page_size), jnp.float16)
    lowered = paged_attention.trace(
        q, k, k, sds((2, 9), jnp.int32), sds((2,), jnp.int32), layer=sds((), jnp.int32),
        k_scale=scales, v_scale=scales, fp8_dtype=kv_dtype if bits else None).lower(
        lowering_platforms=("cuda",))
    _, ttir = triton_kernel_ir(lowered)
    block = default_pages_per_block(page_size, head_dim) * page_size
    assert tt_dots(ttir) == [f"16x64 * 64x{block} -> 16x{block}",
                             f"16x{block} * {block}x64 -> 16x64"]
    assert masked_loads(ttir, f"{block // page_size}x{page_size}") == 2     # K and V scales
