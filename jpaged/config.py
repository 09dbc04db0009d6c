"""Model configuration for the Llama family, read from a HuggingFace config.json.

One dataclass drives one model file: Llama 2/3/3.1, Mistral, Qwen2, SmolLM2 and TinyLlama differ by
flags (`qkv_bias`, `tie_word_embeddings`, rope scaling, `sliding_window`), not by separate code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

# HF `architectures` entry -> jpaged family name. Everything here runs through jpaged/models/decoder.py.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# The params layout (jpaged/models/weights.py) a converted checkpoint stores; 2 = q/k/v and
# gate/up fused (1, separate projections, was never marked in the files).
PARAMS_LAYOUT = 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str                 # "llama" | "mistral" | "qwen2"
    vocab_size: int                   # V
    hidden_size: int                  # D
    intermediate_size: int            # F
    num_layers: int                   # L
    num_heads: int                    # N
    num_kv_heads: int                 # K
    head_dim: int                     # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a HF config dict, in either rope style (rope_theta/rope_scaling or the
        transformers>=5 `rope_parameters` dict)."""
        arch_names = hf.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in arch_names if a in SUPPORTED_ARCHITECTURES),
                      None)
        if family is None:
            raise ValueError(
                f"unsupported architecture {arch_names or hf.get('model_type')!r}: jpaged supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if hf.get("mlp_bias"):
            raise ValueError("config.json sets mlp_bias=true, which jpaged's Llama model does not support")
        num_heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = _read_rope(hf)
        sliding_window = hf.get("sliding_window")
        if family == "qwen2" and not hf.get("use_sliding_window", False):
            sliding_window = None
        return cls(
            architecture=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
            sliding_window=sliding_window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        )

    def __hash__(self) -> int:
        """Hash with `rope_scaling` as sorted items: the dataclass default fails on the dict, and a
        model over this config must hash to be a static `jax.jit` argument (`jpaged.generate`)."""
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v
                          for v in dataclasses.astuple(self)))

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """A converted checkpoint's jpaged_config.json; ValueError when its params are in an
        older layout than this jpaged reads (convert the source again)."""
        data = json.loads(Path(path).read_text())
        layout = data.pop("params_layout", 1)
        if layout != PARAMS_LAYOUT:
            raise ValueError(f"{Path(path).parent} was converted by another jpaged version (params "
                             f"layout {layout}; this one reads layout {PARAMS_LAYOUT}); convert "
                             f"the source again with `jpaged convert SRC OUT`")
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        data = {**dataclasses.asdict(self), "params_layout": PARAMS_LAYOUT}
        Path(path).write_text(json.dumps(data, indent=2))

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies [H/2] in float32, as HF transformers computes them."""
        dim = self.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (1.0 / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        scaling = self.rope_scaling or {"rope_type": "default"}
        rope_type = scaling.get("rope_type", "default")
        if rope_type == "linear":
            inv_freq = inv_freq / np.float32(scaling["factor"])
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        return inv_freq.astype(np.float32)


def _read_rope(hf: dict[str, Any]) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters")
    if params is not None:  # transformers >= 5 style
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}: jpaged supports {SUPPORTED_ROPE_TYPES}")
    return float(theta), (scaling if rope_type != "default" else None)


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
