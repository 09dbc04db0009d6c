"""Pre-quantized HF checkpoints read as stored: GPTQ and AWQ (int4, GPTQ int8 too) and
compressed-tensors int8 (W8A16, W8A8), the layouts vLLM users have on disk.

Each stores, per linear layer `prefix` (e.g. "model.layers.0.self_attn.q_proj"), integers q with a
scale s and (GPTQ, AWQ) a zero point z per group of `group_size` input values:

  method               tensors (PyTorch layout)                         w[out, in]
  gptq (AutoGPTQ,      qweight int32 [in / (32/b), out]  packed along in  s[g, out] (q - z[g, out])
   GPTQModel)          qzeros  int32 [G, out / (32/b)]   packed along out  g = g_idx[in]
                       scales  fp16  [G, out], g_idx int32 [in]            (v1 format: z stored - 1)
  awq (AutoAWQ GEMM)   qweight int32 [in, out / 8], qzeros int32 [G, out / 8]  s[g, out] (q - z[g, out])
                       (both packed along out in AWQ's order 0 2 4 6 1 3 5 7), scales [G, out]
  compressed-tensors   weight int8 [out, in], weight_scale [out, 1] (or [out, G], or [1])
   (int-quantized)     (+ weight_zero_point); input_activations dynamic per token = W8A8

They become jpaged's QuantizedWeight groups exactly (w = q s + min, min = -z s): 4-bit values packed
as GGUF's nibbles, 8-bit ones in int8 (GPTQ's unsigned 0..255 shifted by 128 into the min). A GPTQ
checkpoint quantized with act-order (`desc_act`: g_idx not in group order) has no contiguous
groups: its layers are dequantized to floats (logged), which is exact but takes float memory.
Compressed-tensors' static activation scales are not used: jpaged quantizes activations per token
at run time (at least as accurate; vLLM uses the static scale).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jpaged.checkpoint.gguf_blocks import HostQuantized
from jpaged_kernels.quantization import pack_int4

logger = logging.getLogger("jpaged")
METHODS = ("gptq", "awq", "compressed-tensors")
_AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])       # nibble i of a word holds column ORDER[i]
_GPTQ_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".bias")
_CT_SUFFIXES = (".weight_scale", ".weight_zero_point", ".input_scale", ".input_zero_point")


@dataclasses.dataclass(frozen=True)
class PrequantizedFormat:
    method: str                 # one of METHODS
    bits: int
    group_size: int             # -1: one group per output channel
    zero_offset: int = 0        # GPTQ v1 stores z - 1
    activation_bits: int = 16   # 8: W8A8 (compressed-tensors with dynamic int8 activations)

    @classmethod
    def from_hf_config(cls, hf_config: dict) -> "PrequantizedFormat | None":
        """The checkpoint's format from config.json's quantization_config, or None (floats);
        a ValueError naming the field for a format jpaged cannot read as stored."""
        q = hf_config.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method")
        if method not in METHODS:
            raise ValueError(f"config.json quantization_config.quant_method={method!r}: jpaged reads "
                             f"{', '.join(METHODS)} checkpoints as stored; dequantize this one to "
                             f"floats first (e.g. with its own library's save_pretrained)")
        if method == "compressed-tensors":
            return cls._compressed_tensors(q)
        bits = int(q.get("bits", q.get("w_bit", 4)))
        group_size = int(q.get("group_size", q.get("q_group_size", 128)))
        if method == "awq":
            version = str(q.get("version", "gemm")).lower()
            if bits != 4 or version != "gemm":
                raise ValueError(f"AWQ quantization_config bits={bits}, version={version!r}: jpaged "
                                 f"reads 4-bit GEMM-packed AWQ checkpoints (AutoAWQ's default)")
            return cls("awq", 4, group_size)
        if bits not in (4, 8):
            raise ValueError(f"GPTQ quantization_config.bits={bits}: jpaged reads 4- and 8-bit GPTQ")
        v2 = str(q.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        return cls("gptq", bits, group_size, zero_offset=0 if v2 else 1)

    @classmethod
    def _compressed_tensors(cls, q: dict) -> "PrequantizedFormat":
        if q.get("format") not in ("int-quantized", "naive-quantized"):
            raise ValueError(f"compressed-tensors quantization_config.format={q.get('format')!r}: "
                             f"jpaged reads int-quantized (int8 W8A16 / W8A8) checkpoints")
        groups = list((q.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise ValueError(f"compressed-tensors config_groups has {len(groups)} groups: jpaged "
                             f"reads checkpoints with one scheme for every Linear layer")
        weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations")
        if weights.get("num_bits") != 8 or weights.get("type", "int") != "int":
            raise ValueError(f"compressed-tensors weights num_bits={weights.get('num_bits')}, "
                             f"type={weights.get('type')!r}: jpaged reads 8-bit int weights")
        group_size = int(weights.get("group_size") or -1) \
            if weights.get("strategy") == "group" else -1
        act_bits = 8 if acts and acts.get("num_bits") == 8 and acts.get("type", "int") == "int" \
            else 16
        return cls("compressed-tensors", 8, group_size, activation_bits=act_bits)

    # ---- which stored tensors make a layer's weight ------------------------------------------
    def logical_names(self, stored: list[str]) -> tuple[dict[str, str], set[str]]:
        """({logical "prefix.weight": prefix} of the quantized layers, the stored names they
        hide) so the weight tables see an ordinary HF model."""
        if self.method == "compressed-tensors":
            layers = {n[:-len(".weight_scale")] for n in stored if n.endswith(".weight_scale")}
            hidden = {n for n in stored if n.endswith(_CT_SUFFIXES)}
            return {f"{p}.weight": p for p in layers}, hidden
        layers = {n[:-len(".qweight")] for n in stored if n.endswith(".qweight")}
        hidden = {n for n in stored if n.endswith(_GPTQ_SUFFIXES[:4])
                  and n.rsplit(".", 1)[0] in layers}
        return {f"{p}.weight": p for p in layers}, hidden

    def in_groups(self, read, prefix: str) -> bool:
        """Whether the layer's groups are contiguous runs of inputs (all but GPTQ act-order)."""
        g_idx = self._optional(read, f"{prefix}.g_idx") if self.method == "gptq" else None
        if g_idx is None:
            return True
        g_idx = g_idx.astype(np.int64)
        group = g_idx.size if self.group_size == -1 else self.group_size
        return bool(np.array_equal(g_idx, np.arange(g_idx.size) // group))

    def shape(self, read, prefix: str) -> tuple[int, int]:
        """[out, in] of the float weight."""
        if self.method == "compressed-tensors":
            return tuple(read(f"{prefix}.weight").shape)
        words = read(f"{prefix}.qweight").shape
        per_word = 32 // self.bits
        return (words[1], words[0] * per_word) if self.method == "gptq" else \
            (words[1] * per_word, words[0])

    def read(self, read, prefix: str) -> HostQuantized | None:
        """The layer as stored, in the HF layout [out, in]; None when it has no contiguous
        groups (GPTQ act-order): read it as floats (`dequantized`) instead."""
        if self.method == "compressed-tensors":
            return self._read_compressed(read, prefix)
        if not self.in_groups(read, prefix):
            logger.info("%s: GPTQ act-order (g_idx not in group order) has no contiguous groups; "
                        "dequantized to floats", prefix)
            return None
        q, z, s, _ = self.integers(read, prefix)
        group = q.shape[1] if self.group_size == -1 else self.group_size
        scales = s.T.astype(np.float32)                       # [out, G]
        mins = -(z.T * scales)
        if self.bits == 4:
            values = pack_int4(q.astype(np.uint8).reshape(q.shape[0], -1, group))
        else:                                                 # 0..255 -> int8, offset in the min
            values = (q.astype(np.int16) - 128).astype(np.int8)
            mins = mins + 128 * scales
        return HostQuantized(values, scales, mins.astype(np.float32), self.bits, group)

    def dequantized(self, read, prefix: str) -> np.ndarray:
        """The float weight [out, in] float32 (any layer, act-order included)."""
        if self.method == "compressed-tensors":
            h = self._read_compressed(read, prefix)
            w = h.values.astype(np.float32).reshape(h.values.shape[0], -1, h.group_size)
            w = w * h.scales[..., None] + (0 if h.mins is None else h.mins[..., None])
            return w.reshape(h.values.shape[0], -1)
        q, z, s, g_idx = self.integers(read, prefix)
        d_in = q.shape[1]
        if g_idx is None:
            g_idx = np.arange(d_in) // (d_in if self.group_size == -1 else self.group_size)
        return (s.T[:, g_idx].astype(np.float32) * (q - z.T[:, g_idx])).astype(np.float32)

    def integers(self, read, prefix: str):
        """GPTQ/AWQ: (q [out, in], z [G, out], s [G, out], g_idx [in] or None), unpacked."""
        qweight = read(f"{prefix}.qweight").view(np.uint32)
        qzeros = read(f"{prefix}.qzeros").view(np.uint32)
        s = read(f"{prefix}.scales").astype(np.float32)
        if self.method == "awq":
            q = _unpack_columns(qweight, self.bits, _AWQ_ORDER).T          # [out, in]
            z = _unpack_columns(qzeros, self.bits, _AWQ_ORDER)
            return q.astype(np.int32), z.astype(np.int32), s, None
        q = _unpack_rows(qweight, self.bits).T
        z = _unpack_columns(qzeros, self.bits) + self.zero_offset
        g_idx = self._optional(read, f"{prefix}.g_idx")
        return q.astype(np.int32), z.astype(np.int32), s, \
            None if g_idx is None else g_idx.astype(np.int64)

    def _read_compressed(self, read, prefix: str) -> HostQuantized:
        values = read(f"{prefix}.weight")
        if values.dtype != np.int8:
            raise ValueError(f"{prefix}.weight is {values.dtype}, not int8: a compressed-tensors "
                             f"int-quantized checkpoint stores int8 weights")
        out, d_in = values.shape
        scale = np.asarray(read(f"{prefix}.weight_scale"), np.float32).reshape(-1)
        scale = np.broadcast_to(scale.reshape(out if scale.size >= out else 1, -1),
                                (out, max(scale.size // out, 1))).copy()
        group = d_in // scale.shape[1]
        mins = None
        zero = self._optional(read, f"{prefix}.weight_zero_point")
        if zero is not None:
            zero = np.asarray(zero, np.float32)
            if np.any(zero):
                mins = -(np.broadcast_to(zero.reshape(scale.shape[0], -1), scale.shape) * scale)
        return HostQuantized(values, scale, mins, 8, group, self.activation_bits)

    @staticmethod
    def _optional(read, name: str) -> np.ndarray | None:
        """The stored tensor `name`, or None when the checkpoint has none (read once: not
        tested for and then read again)."""
        try:
            return read(name)
        except KeyError:
            return None


def _unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] uint32 packed along rows (value j of word r is row r * (32/bits) + j) -> [R*n, C]."""
    n = 32 // bits
    shifts = (np.arange(n, dtype=np.uint32) * bits)[None, :, None]
    values = (words[:, None, :] >> shifts) & ((1 << bits) - 1)              # [R, n, C]
    return values.reshape(-1, words.shape[1])


def _unpack_columns(words: np.ndarray, bits: int, order: np.ndarray | None = None) -> np.ndarray:
    """[R, C] uint32 packed along columns -> [R, C*n]; value i of word c is column c*n + order[i]."""
    n = 32 // bits
    shifts = (np.arange(n, dtype=np.uint32) * bits)[None, None, :]
    values = (words[:, :, None] >> shifts) & ((1 << bits) - 1)              # [R, C, n]
    if order is not None:
        values = values[:, :, np.argsort(order)]
    return values.reshape(words.shape[0], -1)
