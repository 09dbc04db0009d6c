"""Quantized params while a checkpoint is built (checkpoint/params.py's build_params):

  quantization="int8" | "w8a8" | "int4" | "fp8"   each matmul weight is quantized right after its
                                                  float leaf is built, on the host (NumPy), so the
                                                  float copy of at most one leaf exists at a time;
  quantization="gguf"                             a GGUF's block-quantized tensors become
                                                  QuantizedWeights as stored (gguf_blocks.py): no
                                                  float copy at all;
  quantization="gptq" | "awq" | "compressed-tensors"   an HF checkpoint's pre-quantized layers,
                                                  likewise (prequantized.py).
Which leaves are matmul weights, and their input axes: jpaged/models/weights.py (INPUT_AXIS).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jpaged.checkpoint.gguf_blocks import HostQuantized, harmonize
from jpaged.checkpoint.prequantized import METHODS as PREQUANTIZED_METHODS
from jpaged.checkpoint.weight_map import FUSED_PARTS, layer_names
from jpaged_kernels.quantization import KINDS, QuantizedWeight, quantize

STORED = ("gguf", *PREQUANTIZED_METHODS)     # read as the checkpoint stores them
QUANTIZATIONS = (*KINDS, *STORED)


def matmul_key(dst: str) -> tuple[str, ...] | None:
    """The INPUT_AXIS key of a params path ("layers/attn/wqkv" -> ("attn", "wqkv")), or None."""
    from jpaged.models.weights import INPUT_AXIS
    names = tuple(dst.split("/"))
    return next((key for key in INPUT_AXIS if names[-len(key):] == key), None)


def input_axis(dst: str) -> int:
    """The input axis of the leaf at `dst` in its stacked float layout."""
    from jpaged.models.weights import INPUT_AXIS
    key = matmul_key(dst)
    return (1 if dst.startswith("layers/") else 0) + INPUT_AXIS[key]


def quantize_leaf(dst: str, leaf: np.ndarray, kind: str, group_size: int | None):
    """A float leaf (stacked layout, NumPy) as a QuantizedWeight, input axis moved last."""
    from jpaged.models.weights import table_kind
    return quantize(np.moveaxis(leaf, input_axis(dst), -1), table_kind(matmul_key(dst), kind),
                    group_size)


def stored_leaf(source, dst: str, rules, float_shape: tuple[int, ...], num_layers: int,
                dims: dict[str, int]) -> QuantizedWeight | None:
    """The leaf at `dst` from the stored blocks of its parts (a GGUF's, a GPTQ/AWQ/compressed-
    tensors checkpoint's), or None if any part is stored as floats (the caller then builds it
    as a float leaf)."""
    names = [(rule, layer_names(hf, num_layers)) for hf, rule in rules]
    if not hasattr(source, "read_quantized") or not all(
            source.stores_quantized(n) for _, ns in names for n in ns):
        return None
    stacked = dst.startswith("layers/")
    per_layer = float_shape[1:] if stacked else float_shape
    axis = input_axis(dst) - stacked
    out_dims = tuple(d for i, d in enumerate(per_layer) if i != axis)     # quantized out axes
    layers = []
    for i in range(num_layers if stacked else 1):
        parts = []
        for rule, ns in names:
            parts.append((rule, source.read_quantized(ns[i])))
        layers.append(_fuse(parts, out_dims, dims))
    fields = {f: None if getattr(layers[0], f) is None else
              np.stack([getattr(q, f) for q in layers]) if stacked else getattr(layers[0], f)
              for f in ("values", "scales", "mins")}
    first = layers[0]
    return QuantizedWeight(jnp.asarray(fields["values"]), jnp.asarray(_compact(fields["scales"])),
                           None if fields["mins"] is None else jnp.asarray(_compact(fields["mins"])),
                           first.bits, first.group_size, first.activation_bits)


def _fuse(parts: list, out_dims: tuple[int, ...], dims: dict[str, int]) -> HostQuantized:
    """One layer's leaf from its parts (HF [out rows, in] each), out rows reshaped to the leaf's
    output axes; a fused leaf (parts with `part`) takes each part at its place on axis -3 (the
    float layout's axis -2, the input axis having moved last)."""
    rules, quantized = zip(*parts)
    quantized = harmonize(list(quantized))
    if rules[0].part is None:
        q = quantized[0]
        return q.map_rows(lambda x: x.reshape(*out_dims, x.shape[-1]))
    first = quantized[0]
    fields = {}
    for field in ("values", "scales", "mins"):
        if getattr(first, field) is None:
            fields[field] = None
            continue
        width = getattr(first, field).shape[-1]
        out = np.zeros((*out_dims, width), getattr(first, field).dtype)
        for rule, q in zip(rules, quantized):
            index = FUSED_PARTS[rule.part](dims)
            target = out[(..., index, slice(None), slice(None))]
            target[...] = getattr(q, field).reshape(target.shape)
        fields[field] = out
    return HostQuantized(fields["values"], fields["scales"], fields["mins"], first.bits,
                         first.group_size, first.activation_bits)


def _compact(x: np.ndarray) -> np.ndarray:
    """Scales and mins in float16 when that is exact (GGUF's own factors), else float32."""
    half = x.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), x) else x.astype(np.float32)
