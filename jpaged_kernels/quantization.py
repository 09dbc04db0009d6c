"""Quantized matmul weights: the storage format, quantizers, the dequantizer and the matmul.

A `QuantizedWeight` stands for a float weight W with one input (contraction) axis of D_in values
and any output axes, as the model's matmuls use it (`x [T, D_in] @ W -> [T, *out]`). It stores
W with the input axis LAST, output-major like GGUF and PyTorch (so a row of one output channel is
contiguous, which is what a fused matrix-vector product reads), in groups of `group_size`
consecutive input values, each group with a scale (and a min for affine formats):

    w[..., d] = q[..., d] * scales[..., d // group_size]  (+ mins[..., d // group_size])

  bits=8   values int8 [*lead, *out, D_in] (GGUF Q8_0/Q5_K/Q6_K are stored this way too), or
           float8_e4m3fn (fp8, per output channel)
  bits=4   values uint8 [*lead, *out, D_in // 2], two per byte, packed as GGUF's Q4_0/Q4_1 do it:
           in each group, byte j holds value j (low nibble) and value j + group_size/2 (high)
  scales, mins  [*lead, *out, D_in // group_size]; per output channel: group_size = D_in
`activation_bits=8` makes the matmul quantize its input per token to int8 (W8A8), so XLA runs an
int8 x int8 -> int32 dot (oneDNN/YNNPACK with VNNI on CPU).

NOTE: how it runs on XLA:CPU (measured on the 2-core AVX-512 dev machine, 30 layers x [7680, 576],
~133M weights, one decode row): float32 weights 23.8 ms; int8 per output channel 4.3-6.2 ms, the
dequantization fused INTO the matrix-vector product (a loop fusion around the dot: only the int8
bytes are read, no float copy of W exists; see tests/kernels/test_quantization.py for the HLO
check); int8 with group scales 14.1 ms; 4-bit packed 19-24 ms (the nibble unpack is ALU-bound in
XLA's generated loops). With two or more rows XLA:CPU does not fuse the dequantization into its
matrix-matrix dots, so `quantized_matmul` dequantizes one tile of output rows at a time (a few
hundred KB, cache-resident) inside a loop, and W8A8 weights take the int8 dot instead (M=4: 12 ms,
M=32: 38 ms vs 60+ ms in float32).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "int4", "fp8", "w8a8")
_TILE_BYTES = 1 << 18          # float32 bytes of one dequantized tile of output rows (T > 1)


@dataclasses.dataclass
class QuantizedWeight:
    values: jax.Array              # see the module docstring
    scales: jax.Array
    mins: jax.Array | None = None
    bits: int = 8                  # static: 8 or 4
    group_size: int = 0            # static: input values per scale
    activation_bits: int = 16      # static: 8 = quantize activations per token (W8A8)

    @property
    def in_features(self) -> int:
        return self.values.shape[-1] * (2 if self.bits == 4 else 1)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape in this (input-last) layout."""
        return (*self.values.shape[:-1], self.in_features)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize
                   for a in (self.values, self.scales, self.mins) if a is not None)

    def __getitem__(self, index) -> "QuantizedWeight":
        """Index the leading (layer / output) axes of every field alike."""
        return dataclasses.replace(self, values=self.values[index], scales=self.scales[index],
                                   mins=None if self.mins is None else self.mins[index])


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["values", "scales", "mins"],
                                 meta_fields=["bits", "group_size", "activation_bits"])


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


# ---- quantizers (float -> QuantizedWeight), input axis last ----------------------------------
def quantize(w, kind: str, group_size: int | None = None) -> QuantizedWeight:
    """Quantize `w` [..., D_in] (input axis last) as `kind`:
      int8  symmetric, one scale per output channel (round to nearest, |q| <= 127)
      w8a8  the same weights, activations quantized per token at run time
      int4  affine (scale and min per group of `group_size`, default 32; q in 0..15), packed
      fp8   float8_e4m3fn, one scale per output channel (amax -> 448)
    Works on NumPy or jax arrays; returns jax arrays (NumPy in, NumPy-computed)."""
    if kind not in KINDS:
        raise ValueError(f"quantization={kind!r} is not one of {KINDS}")
    xp = np if isinstance(w, np.ndarray) else jnp
    w = w.astype(xp.float32)
    d_in = w.shape[-1]
    if kind in ("int8", "w8a8"):
        scale = xp.max(xp.abs(w), axis=-1, keepdims=True) / 127.0
        scale = xp.where(scale == 0, 1.0, scale)
        q = xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8)
        return QuantizedWeight(jnp.asarray(q), jnp.asarray(scale, jnp.float32), None, 8, d_in,
                               8 if kind == "w8a8" else 16)
    if kind == "fp8":
        scale = xp.max(xp.abs(w), axis=-1, keepdims=True) / 448.0
        scale = xp.where(scale == 0, 1.0, scale)
        q = jnp.asarray(w / scale).astype(jnp.float8_e4m3fn)
        return QuantizedWeight(q, jnp.asarray(scale, jnp.float32), None, 8, d_in)
    group_size = group_size or 32
    check_group_size(d_in, group_size)
    g = w.reshape(*w.shape[:-1], d_in // group_size, group_size)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    scale = (hi - lo) / 15.0
    scale = xp.where(scale == 0, 1.0, scale)
    q = xp.clip(xp.round((g - lo[..., None]) / scale[..., None]), 0, 15).astype(xp.uint8)
    return QuantizedWeight(jnp.asarray(pack_int4(q)), jnp.asarray(scale, jnp.float16),
                           jnp.asarray(lo, jnp.float16), 4, group_size)


def check_group_size(d_in: int, group_size: int) -> None:
    if group_size < 2 or group_size % 2 or d_in % group_size:
        raise ValueError(f"int4 group_size={group_size} must be even and divide every matmul's "
                         f"input size (here {d_in}); choose e.g. 32 or 64")


def pack_int4(q):
    """q [..., G, g] of 0..15 -> [..., G * g / 2] uint8: byte j of a group holds q[j] (low nibble)
    and q[j + g/2] (high), GGUF's Q4_0/Q4_1 order."""
    half = q.shape[-1] // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.reshape(*q.shape[:-2], -1)


def widened(qw: QuantizedWeight) -> QuantizedWeight:
    """The same weight held for XLA:CPU: 4-bit values unpacked into int8 (0..15) and float32
    scales and mins; exact (the same values).

    NOTE: measured on the 2-core AVX-512 dev machine, one decode row x a [49152, 576] weight:
    4-bit packed 85-140 ms (XLA:CPU's loops over nibble shifts do not vectorise; int32/int8/
    uint32 formulations were no faster), the same values held as int8 2.9 ms (float32 scales) or
    4.2 ms (float16 scales), plain float32 19 ms. So on CPU the engine holds 4-bit weights this
    way: 1.25 bytes per weight with group-32 scales and mins, 3.2x less than float32 (the GPU
    keeps the packed 0.625)."""
    values = qw.values
    if qw.bits == 4:
        g = values.reshape(*values.shape[:-1], -1, qw.group_size // 2)
        values = jnp.concatenate([g & 15, g >> 4], axis=-1).astype(jnp.int8)
        values = values.reshape(*qw.values.shape[:-1], -1)
    as_f32 = lambda a: None if a is None else a.astype(jnp.float32)       # noqa: E731
    return dataclasses.replace(qw, values=values, scales=as_f32(qw.scales), mins=as_f32(qw.mins),
                               bits=8)


# ---- the dequantizer and the matmul ----------------------------------------------------------
def dequantize(qw: QuantizedWeight, dtype=jnp.float32):
    """The float weight [..., D_in] (input axis last). Elementwise, so XLA fuses it into what
    consumes it."""
    v = qw.values
    if qw.bits == 4:
        g = qw.group_size
        v = v.reshape(*v.shape[:-1], -1, g // 2)
        q = jnp.concatenate([v & 15, v >> 4], axis=-1).astype(jnp.float32)     # [..., G, g]
    else:
        q = v.astype(jnp.float32).reshape(*v.shape[:-1], -1, qw.group_size)
    w = q * qw.scales.astype(jnp.float32)[..., None]
    if qw.mins is not None:
        w = w + qw.mins.astype(jnp.float32)[..., None]
    return w.reshape(*w.shape[:-2], -1).astype(dtype)


def quantized_matmul(x, qw: QuantizedWeight):
    """x [T, D_in] @ W -> [T, *out] float32, W = qw dequantized (input axis last).

    One row (batch-1 decode): the dequantization is fused into XLA's matrix-vector product.
    Several rows: W8A8 weights take an int8 x int8 dot; the others are dequantized one tile of
    output rows at a time inside a loop (no float copy of the whole W)."""
    num_rows, out_shape = x.shape[0], qw.out_shape
    flat = QuantizedWeight(qw.values.reshape(-1, qw.values.shape[-1]),
                           qw.scales.reshape(-1, qw.scales.shape[-1]),
                           None if qw.mins is None else qw.mins.reshape(-1, qw.mins.shape[-1]),
                           qw.bits, qw.group_size, qw.activation_bits)
    x = x.astype(jnp.float32)
    if qw.activation_bits == 8:
        x8, x_scale = quantize_activations(x)
        if num_rows > 1:
            acc = jax.lax.dot_general(x8, flat.values, (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.int32)
            y = acc.astype(jnp.float32) * x_scale * flat.scales[:, 0]
            return y.reshape(num_rows, *out_shape)
        x = x8.astype(jnp.float32) * x_scale
    if num_rows == 1:
        y = x @ dequantize(flat).T
    else:
        y = _tiled_matmul(x, flat)
    return y.reshape(num_rows, *out_shape)


def quantize_activations(x):
    """Per-row symmetric int8: (x8 [T, D], scale [T, 1]) with x ~ x8 * scale."""
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _tiled_matmul(x, flat: QuantizedWeight):
    """x [T, D] @ dequantize(flat).T, dequantizing `tile` output rows at a time."""
    num_out, d_in = flat.values.shape[0], flat.in_features
    tile = max(8, _TILE_BYTES // (4 * d_in))
    if num_out <= tile:
        return x @ dequantize(flat).T
    num_tiles = -(-num_out // tile)
    pad = num_tiles * tile - num_out
    tiles = jax.tree.map(
        lambda a: jnp.pad(a, ((0, pad), (0, 0))).reshape(num_tiles, tile, a.shape[-1]), flat)
    out = jax.lax.map(lambda t: x @ dequantize(t).T, tiles)                  # [tiles, T, tile]
    return out.transpose(1, 0, 2).reshape(x.shape[0], -1)[:, :num_out]
