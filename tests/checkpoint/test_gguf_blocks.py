"""GGUF's block formats read as stored: every supported type, from random raw blocks, dequantizes
exactly as the `gguf` package's own dequantizer does; fused leaves of mixed types are brought to
one format without loss; the real SmolLM2 GGUF loads as stored, equal to its float conversion."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.checkpoint.gguf_blocks import (BLOCK_BYTES, BLOCK_VALUES, SUPPORTED, decode,
                                           harmonize)
from jpaged_kernels.quantization import QuantizedWeight, dequantize


def random_blocks(type_name: str, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random raw bytes with sane float16 factors (the rest of a block is bits of any value)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks_per_row, BLOCK_BYTES[type_name]), dtype=np.uint8)
    factors = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
               "Q6_K": [208]}[type_name]
    for at in factors:
        f16 = rng.uniform(-0.05, 0.05, (rows, blocks_per_row)).astype(np.float16)
        raw[..., at:at + 2] = f16[..., None].view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, -1)


def as_weight(host) -> QuantizedWeight:
    return QuantizedWeight(jnp.asarray(host.values), jnp.asarray(host.scales),
                           None if host.mins is None else jnp.asarray(host.mins), host.bits,
                           host.group_size)


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_each_type_dequantizes_like_the_gguf_package(type_name):
    rows, per_row = 3, 2
    raw = random_blocks(type_name, rows, per_row, seed=len(type_name))
    qtype = gguf.GGMLQuantizationType[type_name]
    want = gguf.quants.dequantize(raw, qtype).reshape(rows, -1)
    host = decode(type_name, raw, rows)
    assert host.values.shape[0] == rows
    got = np.asarray(dequantize(as_weight(host)))
    assert got.shape == (rows, per_row * BLOCK_VALUES[type_name])
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_mixed_parts_are_brought_to_one_format_without_loss():
    parts = [decode("Q4_1", random_blocks("Q4_1", 2, 8, 1), 2),
             decode("Q6_K", random_blocks("Q6_K", 2, 1, 2), 2),
             decode("Q4_0", random_blocks("Q4_0", 2, 8, 3), 2)]
    before = [np.asarray(dequantize(as_weight(p))) for p in parts]
    same = harmonize(parts)
    assert {(p.bits, p.group_size, p.mins is None) for p in same} == {(8, 16, False)}
    for want, p in zip(before, same):
        np.testing.assert_array_equal(np.asarray(dequantize(as_weight(p))), want)


def test_unsupported_types_are_named():
    with pytest.raises(ValueError, match="GGUF tensor type IQ2_XXS cannot be served as stored"):
        decode("IQ2_XXS", np.zeros((1, 66), np.uint8), 1)


def test_smollm2_loads_as_stored_equal_to_its_float_conversion(smollm2_path):
    from jpaged.checkpoint.params import build_params
    from jpaged.checkpoint.sources import GGUFSource
    from jpaged.models.weights import dequantize_params

    source = GGUFSource(smollm2_path)
    stored = build_params(source, source.config, "float32", progress=False, quantization="gguf")
    attn = stored["layers"]["attn"]["wqkv"]
    assert isinstance(attn, QuantizedWeight) and (attn.bits, attn.group_size) == (4, 32)
    assert stored["embed"]["embedding"].bits == 8                       # Q8_0
    floats = build_params(source, source.config, "float32", progress=False)
    jax.tree.map(np.testing.assert_array_equal, dequantize_params(stored), floats)
    size = sum(x.nbytes for x in jax.tree.leaves(stored))
    assert size < 0.2 * sum(x.nbytes for x in jax.tree.leaves(floats))    # ~5 bits per weight
