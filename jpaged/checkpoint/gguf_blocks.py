"""GGUF's block-quantized tensors as jpaged QuantizedWeights, exactly (no float detour).

Each ggml block format stores, per group of input values, small integers q with a scale (and a
min): that is jpaged's format (jpaged_kernels/quantization.py) with the same groups, so a tensor
is re-laid out, never re-quantized:

  type   block     jpaged QuantizedWeight
  Q8_0   32        bits 8, group 32:  w = d q                 (q int8)
  Q4_0   32        bits 4, group 32:  w = d q - 8 d           (q 0..15, nibbles copied as they are)
  Q4_1   32        bits 4, group 32:  w = d q + m
  Q4_K   256 = 8x32  bits 4, group 32: w = (d sc_j) q - (dmin m_j)  (nibbles re-paired per group)
  Q5_K   256 = 8x32  bits 8, group 32: w = (d sc_j) q - (dmin m_j)  (q 0..31 held in int8)
  Q6_K   256 = 16x16 bits 8, group 16: w = (d sc_j) (q - 32)        (q - 32 in int8)
Scales and mins are float32 products of the block's float16 factors and small integers, exact in
float32. A ggml tensor [ne0 = in, ne1 = out] is stored row by row: rows are output channels, the
input axis is contiguous, which is jpaged's quantized layout (input axis last).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jpaged_kernels.quantization import pack_int4

QK_K = 256
# block bytes by type name (what a row of the raw tensor is made of)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
BLOCK_VALUES = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}
SUPPORTED = tuple(BLOCK_BYTES)


@dataclasses.dataclass
class HostQuantized:
    """A QuantizedWeight's fields on the host (NumPy), before they are placed on a device."""
    values: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None
    bits: int
    group_size: int
    activation_bits: int = 16     # 8: W8A8 (compressed-tensors checkpoints)

    def map_rows(self, fn) -> "HostQuantized":
        """Apply a transform of the output rows (e.g. llama.cpp's q/k row permutation, or a
        reshape of the output axis) to every field alike."""
        return dataclasses.replace(self, values=fn(self.values), scales=fn(self.scales),
                                   mins=None if self.mins is None else fn(self.mins))


def decode(type_name: str, data: np.ndarray, num_rows: int) -> HostQuantized:
    """Raw tensor bytes (uint8, `num_rows` rows of blocks) -> HostQuantized [rows, in]."""
    if type_name not in SUPPORTED:
        raise ValueError(f"GGUF tensor type {type_name} cannot be served as stored; jpaged reads "
                         f"{', '.join(SUPPORTED)} (load with quantization=None to dequantize it)")
    blocks = np.ascontiguousarray(data, np.uint8).reshape(num_rows, -1, BLOCK_BYTES[type_name])
    return _DECODERS[type_name](blocks)


def _f16(raw: np.ndarray) -> np.ndarray:
    """float16 bytes [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _rows(x: np.ndarray) -> np.ndarray:
    """[rows, blocks, ...] -> [rows, blocks * ...]."""
    return x.reshape(x.shape[0], -1)


def _q8_0(b):
    d = _f16(b[..., :2])                                              # [rows, nb]
    q = b[..., 2:].view(np.int8)                                      # [rows, nb, 32]
    return HostQuantized(_rows(q), d, None, 8, 32)


def _q4_0(b):
    d = _f16(b[..., :2])
    return HostQuantized(_rows(b[..., 2:]), d, -8.0 * d, 4, 32)


def _q4_1(b):
    d, m = _f16(b[..., :2]), _f16(b[..., 2:4])
    return HostQuantized(_rows(b[..., 4:]), d, m, 4, 32)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of Q4_K / Q5_K -> 6-bit scales and mins of the 8 sub-blocks.
    Bytes 0-3: scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7: mins 0-3 and
    the top bits of mins 4-7; bytes 8-11: the low 4 bits of scales 4-7 (low nibble) and mins 4-7."""
    lead = scales.shape[:-1]
    s = scales.reshape(*lead, 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b):
    d, dmin = _f16(b[..., :2]), _f16(b[..., 2:4])                     # [rows, nb]
    sc, mn = _k_scale_min(b[..., 4:16])                               # [rows, nb, 8]
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 32)                     # 4 chunks of 64 values
    q = np.stack([qs & 15, qs >> 4], axis=-2).reshape(*b.shape[:2], 8, 32)   # sub-block j
    return HostQuantized(_rows(pack_int4(q)), _rows(d[..., None] * sc),
                         _rows(-(dmin[..., None] * mn)), 4, 32)


def _q5_k(b):
    d, dmin = _f16(b[..., :2]), _f16(b[..., 2:4])
    sc, mn = _k_scale_min(b[..., 4:16])
    qh = b[..., 16:48]                                                # [rows, nb, 32]
    qs = b[..., 48:].reshape(*b.shape[:2], 4, 32)
    low = np.stack([qs & 15, qs >> 4], axis=-2).reshape(*b.shape[:2], 8, 32)
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1   # bit j: sub-block j
    q = (low | (high << 4)).astype(np.int8)
    return HostQuantized(_rows(q), _rows(d[..., None] * sc), _rows(-(dmin[..., None] * mn)),
                         8, 32)


def _q6_k(b):
    ql = b[..., :128].reshape(*b.shape[:2], 2, 64)                    # two halves of 128 values
    qh = b[..., 128:192].reshape(*b.shape[:2], 2, 32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)             # [rows, nb, 16]
    d = _f16(b[..., 208:210])
    low = np.stack([ql & 15, ql >> 4], axis=-2).reshape(*b.shape[:2], 2, 4, 32)
    high = np.stack([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-2)   # [.., 2, 4, 32]
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return HostQuantized(_rows(q), _rows(d[..., None] * sc), None, 8, 16)


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k,
             "Q6_K": _q6_k}


def harmonize(parts: list[HostQuantized]) -> list[HostQuantized]:
    """Bring the parts of one fused leaf (q, k, v; gate, up) to one format, losslessly: the
    smallest group size (scales repeated), 8-bit values if any part has them (4-bit ones
    unpacked), mins everywhere if any part has them (zeros added)."""
    if len({(p.bits, p.group_size, p.mins is None) for p in parts}) == 1:
        return parts
    group = min(p.group_size for p in parts)
    bits = 4 if all(p.bits == 4 for p in parts) else 8
    affine = any(p.mins is not None for p in parts)
    out = []
    for p in parts:
        values = p.values if p.bits == bits else unpack_int4(p.values, p.group_size)
        repeat = p.group_size // group
        if bits == 4 and repeat > 1:      # re-pair nibbles for the smaller groups
            values = pack_int4(unpack_int4(p.values, p.group_size).astype(np.uint8).reshape(
                *p.values.shape[:-1], -1, group))
        scales = np.repeat(p.scales, repeat, axis=-1)
        mins = np.repeat(p.mins, repeat, axis=-1) if p.mins is not None else \
            (np.zeros_like(scales) if affine else None)
        out.append(HostQuantized(values, scales, mins, bits, group, p.activation_bits))
    return out


def unpack_int4(packed: np.ndarray, group_size: int) -> np.ndarray:
    """pack_int4's inverse: [..., D/2] uint8 -> [..., D] int8 (values 0..15)."""
    g = packed.reshape(*packed.shape[:-1], -1, group_size // 2)
    return np.concatenate([g & 15, g >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int8)
