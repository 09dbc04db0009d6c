"""Model configuration, read from a HuggingFace config.json.

One dataclass drives one model file (jpaged/models/decoder.py): Llama 2/3/3.1, Mistral, Qwen2/3,
Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE, SmolLM2 and TinyLlama differ by flags (`qkv_bias`, `qk_norm`,
`norm_offset`, `post_norms`, soft caps, rope scaling, per-layer `layer_types`, `num_experts`), not
by separate code. Adding an architecture is a `SUPPORTED_ARCHITECTURES` entry, its flags in
`_family_flags`, and its weight rules (jpaged/checkpoint/weight_map.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# HF `architectures` entry -> jpaged family name. Everything here runs through jpaged/models/decoder.py.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SLIDING, FULL = "sliding_attention", "full_attention"     # HF's `layer_types` entries
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# The params layout (jpaged/models/weights.py) a converted checkpoint stores; 2 = q/k/v and
# gate/up fused (1, separate projections, was never marked in the files).
PARAMS_LAYOUT = 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str                 # a SUPPORTED_ARCHITECTURES value: "llama", "gemma3", ...
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
    # --- per-architecture options; the defaults are Llama's ---
    hidden_act: str = "silu"          # the MLP's gate activation (GeGLU: "gelu_pytorch_tanh")
    norm_offset: float = 0.0          # RMSNorm multiplies by (norm_offset + w): Gemma's 1
    qk_norm: bool = False             # RMSNorm on each q and k head before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False          # norms on the attention and MLP outputs too (Gemma 2/3)
    embed_scale: float | None = None  # embeddings are multiplied by it (Gemma: sqrt(D))
    attn_scale: float | None = None   # softmax scale; None: H ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_soft_cap: float | None = None   # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_soft_cap: float | None = None  # the same on the logits (Gemma 2)
    # per layer SLIDING or FULL; None: every layer is SLIDING when sliding_window is set
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None   # RoPE base of the SLIDING layers, unscaled (Gemma 3)
    partial_rotary_factor: float = 1.0      # RoPE on the first H * factor dims of a head
    # the longest sequence the model is run for (the engine's max_model_len; None: the
    # max_position_embeddings); LongRoPE picks its short or long factors by it (vLLM's rule)
    max_model_len: int | None = None
    # --- mixture of experts (num_experts 0: every MLP dense) ---
    num_experts: int = 0              # E
    num_experts_per_tok: int = 0      # top-k experts per token
    moe_intermediate_size: int = 0    # Fe, one expert's MLP dim
    norm_topk_prob: bool = True       # renormalise the top-k router probabilities to sum to 1
    moe_layers: tuple[int, ...] | None = None   # the MoE layers; None: all (when num_experts > 0)

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
        if hf.get("use_bidirectional_attention"):
            raise ValueError("config.json sets use_bidirectional_attention=true (an embedding model): "
                             "jpaged runs causal language models only")
        num_heads = hf["num_attention_heads"]
        rope_theta, rope_scaling, flags = _read_rope(hf, family)
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
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", family.startswith("gemma"))),
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            **flags, **_attention_layers(hf, family), **_family_flags(hf, family),
            **_moe_fields(hf, family),
        )

    def __hash__(self) -> int:
        """Hash with `rope_scaling` as sorted items (its lists as tuples): the dataclass default
        fails on the dict, and a model over this config must hash to be a static `jax.jit`
        argument (`jpaged.generate`)."""
        return hash(tuple(_frozen(v) for v in dataclasses.astuple(self)))

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
        for name in ("eos_token_ids", "layer_types", "moe_layers"):   # JSON lists back to tuples
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        data = {**dataclasses.asdict(self), "params_layout": PARAMS_LAYOUT}
        Path(path).write_text(json.dumps(data, indent=2))

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that RoPE rotates (all of H unless partial)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: the layer attends to its whole context)."""
        types = self.layer_types or (SLIDING,) * self.num_layers
        return tuple(self.sliding_window if t == SLIDING else None for t in types)

    def moe_layer_ids(self) -> tuple[int, ...]:
        """The layers whose MLP is a sparse MoE block (the others are dense)."""
        if not self.is_moe:
            return ()
        return tuple(range(self.num_layers)) if self.moe_layers is None else self.moe_layers

    def dense_layer_ids(self) -> tuple[int, ...]:
        moe = set(self.moe_layer_ids())
        return tuple(i for i in range(self.num_layers) if i not in moe)

    def rope_inv_freq(self, local: bool = False) -> np.ndarray:
        """Inverse RoPE frequencies [rotary_dim / 2] in float32, as HF transformers computes them;
        `local`: those of the SLIDING layers when they have their own base (Gemma 3: unscaled)."""
        dim = self.rotary_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        theta = self.local_rope_theta if local and self.local_rope_theta else self.rope_theta
        base = np.float32(theta) ** exponent
        inv_freq = (1.0 / base).astype(np.float32)
        scaling = {"rope_type": "default"} if local else self.rope_scaling or {"rope_type": "default"}
        rope_type = scaling.get("rope_type", "default")
        if rope_type == "linear":
            inv_freq = inv_freq / np.float32(scaling["factor"])
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "longrope":
            inv_freq = 1.0 / (np.asarray(self._longrope_factors(scaling), np.float32) * base)
        return inv_freq.astype(np.float32)

    def rope_attention_factor(self) -> float:
        """The factor cos and sin are multiplied by (LongRoPE's; 1 for the other rope types)."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") != "longrope":
            return 1.0
        if scaling.get("attention_factor") is not None:
            return float(scaling["attention_factor"])
        original = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or self.max_position_embeddings / original
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))

    def _longrope_factors(self, scaling: dict) -> list[float]:
        """NOTE: LongRoPE's short or long factors, chosen once by the longest sequence the model
        is run for (vLLM: max_model_len > original_max_position_embeddings), not per forward pass
        by its length as HF transformers does: a sequence crossing the threshold would otherwise
        hold keys rotated with both sets. The two agree whenever the run's max_model_len and every
        HF forward pass sit on the same side of original_max_position_embeddings."""
        longest = self.max_model_len or self.max_position_embeddings
        return scaling["long_factor" if longest > scaling["original_max_position_embeddings"]
                       else "short_factor"]


def _read_rope(hf: dict[str, Any], family: str) -> tuple[float, dict | None, dict]:
    """(rope_theta, rope_scaling or None, {local_rope_theta, partial_rotary_factor}) from either
    style; transformers >= 5 writes Gemma 3's as one `rope_parameters` dict per layer type."""
    params = hf.get("rope_parameters")
    local_theta = hf.get("rope_local_base_freq", 10000.0) if family == "gemma3" else None
    if params is not None and FULL in params:        # per layer type
        local = params.get(SLIDING) or {}
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {local['rope_type']!r} on the sliding layers")
        local_theta = local.get("rope_theta", local_theta)
        params = params[FULL]
    if params is not None:  # transformers >= 5 style
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    partial = float(scaling.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "su" or (family == "phi3" and rope_type == "yarn"):   # Phi-3's old names
        rope_type = scaling["rope_type"] = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}: jpaged supports {SUPPORTED_ROPE_TYPES}")
    if rope_type == "longrope":
        scaling.setdefault("original_max_position_embeddings",
                           hf.get("original_max_position_embeddings"))
    flags = dict(local_rope_theta=None if local_theta is None else float(local_theta),
                 partial_rotary_factor=partial)
    return float(theta), (scaling if rope_type != "default" else None), flags


def _attention_layers(hf: dict[str, Any], family: str) -> dict:
    """{sliding_window, layer_types}: HF's `layer_types` when given, else each family's pattern
    (Gemma 2: every other layer from the first; Gemma 3: all but every `sliding_window_pattern`th;
    Qwen: layers from `max_window_layers` on, with use_sliding_window; others: every layer)."""
    window = hf.get("sliding_window")
    num_layers = hf["num_hidden_layers"]
    if family in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return dict(sliding_window=None, layer_types=None)
    types = hf.get("layer_types")
    if types is None and family == "gemma2":
        types = [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
    elif types is None and family == "gemma3":
        pattern = hf.get("sliding_window_pattern", 6)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    elif types is None and family.startswith("qwen"):
        first = hf.get("max_window_layers", 0)
        types = [SLIDING if i >= first else FULL for i in range(num_layers)]
    types = tuple(types or (SLIDING,) * num_layers)
    if len(types) != num_layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError(f"config.json's layer_types must be {num_layers} entries of {SLIDING!r} "
                         f"or {FULL!r}; got {list(types)}")
    if SLIDING not in types:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=int(window), layer_types=None if FULL not in types else types)


def _family_flags(hf: dict[str, Any], family: str) -> dict:
    """The flags that set Gemma (and the other families) apart from Llama."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}: jpaged supports {SUPPORTED_ACTIVATIONS}")
    flags: dict[str, Any] = dict(hidden_act=act, qk_norm=family in ("qwen3", "qwen3_moe", "gemma3"))
    if family in ("gemma2", "gemma3"):
        scalar = hf.get("query_pre_attn_scalar")
        flags.update(norm_offset=1.0, post_norms=True, embed_scale=hf["hidden_size"] ** 0.5,
                     attn_scale=None if scalar is None else float(scalar) ** -0.5,
                     attn_soft_cap=hf.get("attn_logit_softcapping"),
                     final_soft_cap=hf.get("final_logit_softcapping"))
    return flags


def _moe_fields(hf: dict[str, Any], family: str) -> dict:
    """Mixtral: every layer MoE, top-k renormalised, experts as wide as intermediate_size.
    Qwen3-MoE: layer i is MoE unless in mlp_only_layers or (i + 1) % decoder_sparse_step != 0;
    its experts are moe_intermediate_size wide, its dense MLPs intermediate_size."""
    num_experts = hf.get("num_experts") or hf.get("num_local_experts")   # transformers 5: the latter
    if family == "mixtral":
        return dict(num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
                    moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)
    if family != "qwen3_moe" or not num_experts:
        return {}
    step, dense = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
    num_layers = hf["num_hidden_layers"]
    layers = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    if not layers:
        return {}
    return dict(num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["moe_intermediate_size"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                moe_layers=None if len(layers) == num_layers else layers)


def _frozen(value):
    """A hashable copy: dicts as sorted item tuples, lists as tuples, recursively."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


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
