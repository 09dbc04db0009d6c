"""Quantized weights against an independent NumPy dequantize-then-matmul, over a grid of shapes,
kinds and group sizes; the optimised HLO of a one-row matmul reads the int8 weight in place."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged_kernels.quantization import QuantizedWeight, quantize, quantized_matmul


def numpy_dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The format's definition, written out in NumPy (float64): w = q * scale (+ min) per group,
    4-bit values two per byte (value j low nibble, value j + g/2 high nibble of byte j)."""
    values = np.asarray(qw.values)
    if qw.bits == 4:
        half = qw.group_size // 2
        b = values.reshape(*values.shape[:-1], -1, half).astype(np.int64)
        q = np.concatenate([b % 16, b // 16], axis=-1)
    else:
        q = values.astype(np.float64).reshape(*values.shape[:-1], -1, qw.group_size)
    w = q * np.asarray(qw.scales, np.float64)[..., None]
    if qw.mins is not None:
        w = w + np.asarray(qw.mins, np.float64)[..., None]
    return w.reshape(*w.shape[:-2], -1)


CASES = [("int8", None), ("w8a8", None), ("fp8", None), ("int4", 32), ("int4", 64),
         ("int4", 128)]


@pytest.mark.parametrize("kind,group_size", CASES)
@pytest.mark.parametrize("out_shape,d_in,rows", [((48,), 256, 1), ((2, 3, 8), 128, 5),
                                                 ((2, 700), 384, 33)])
def test_matmul_equals_numpy_dequantize_then_matmul(kind, group_size, out_shape, d_in, rows):
    if group_size and d_in % group_size:
        pytest.skip("group size does not divide the input")
    rng = np.random.default_rng(d_in + rows)
    w = rng.standard_normal((*out_shape, d_in)).astype(np.float32)
    qw = quantize(w, kind, group_size)
    assert qw.shape == w.shape and qw.in_features == d_in
    dense = numpy_dequantize(qw)
    # the quantizers' error is what their formats allow
    step = {"int8": 1 / 127, "w8a8": 1 / 127, "fp8": 1 / 16, "int4": 2 / 15}[kind]
    assert np.abs(dense - w).max() <= step * np.abs(w).max() * 1.01
    x = rng.standard_normal((rows, d_in)).astype(np.float32)
    got = np.asarray(quantized_matmul(jnp.asarray(x), qw))
    assert got.shape == (rows, *out_shape)
    if kind == "w8a8":      # the activations are quantized per row too: int8 x int8
        scale = np.abs(x).max(-1, keepdims=True) / 127
        x = np.clip(np.round(x / scale), -127, 127) * scale
    want = np.einsum("td,...d->t...", x.astype(np.float64), dense)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_one_row_reads_the_int8_weight_in_place():
    """XLA:CPU fuses the dequantization into the matrix-vector product: the optimised HLO has no
    float32 buffer of the weight's size outside the fusion that computes the dot."""
    qw = quantize(np.random.default_rng(0).standard_normal((1536, 576)).astype(np.float32), "int8")
    fn = jax.jit(quantized_matmul)
    hlo = fn.lower(jnp.ones((1, 576)), qw).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert "s8[1536,576]" in entry
    big_float = re.findall(r"= f32\[(1536,576|576,1536)\]", entry)
    assert not big_float, f"a float copy of the weight in the entry computation: {big_float}"
    assert re.search(r"fusion\(.*\), kind=kLoop, calls=%\S*dot\S*", entry) or "dot_fusion" in entry


def test_group_size_must_divide_the_input():
    with pytest.raises(ValueError, match=r"int4 group_size=96 must be even and divide every "
                                         r"matmul's input size \(here 128\)"):
        quantize(np.zeros((4, 128), np.float32), "int4", 96)
    with pytest.raises(ValueError, match="quantization='int3' is not one of"):
        quantize(np.zeros((4, 128), np.float32), "int3")


@pytest.mark.parametrize("group_size", [16, 32, 128])
def test_a_widened_4bit_weight_holds_the_same_values(group_size):
    """On CPU the engine holds 4-bit weights as int8 values with float32 scales (`widened`):
    the same weight, so the same matmul as NumPy's dequantize-then-matmul, for one row (the
    fused matrix-vector product) and several (the tiled path)."""
    from jpaged_kernels.quantization import widened

    rng = np.random.default_rng(group_size)
    qw = quantize(rng.standard_normal((3, 40, 256)).astype(np.float32), "int4", group_size)
    wide = widened(qw)
    assert wide.bits == 8 and wide.values.dtype == jnp.int8 and wide.values.shape == (3, 40, 256)
    assert wide.scales.dtype == jnp.float32 and wide.mins.dtype == jnp.float32
    np.testing.assert_array_equal(numpy_dequantize(wide), numpy_dequantize(qw))
    for rows in (1, 5):
        x = rng.standard_normal((rows, 256)).astype(np.float32)
        want = x.astype(np.float64) @ numpy_dequantize(qw).reshape(-1, 256).T
        got = np.asarray(quantized_matmul(jnp.asarray(x), wide)).reshape(rows, -1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
