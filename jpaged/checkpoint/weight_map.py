"""Declarative weight tables: HF tensor names -> jpaged params, and GGUF tensor names -> HF names.

A new architecture is a table entry, not a script. `{}` in a name is the layer index; tensors with
`{}` are stacked over layers on axis 0, and several HF tensors may fill one fused leaf (q, k, v into
`wqkv`; the layout is jpaged/models/weights.py's). Every rule names
the HF shape it expects in the shape legend (V vocab, D model dim, F MLP dim, N query heads, K KV
heads, H head dim; "NH" is N * H), so a wrong tensor fails with its name and both shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jpaged.config import ModelConfig

Transform = Callable[[np.ndarray, dict[str, int]], np.ndarray]


def identity(x, dims):
    return x


def transpose(x, dims):
    """nn.Linear weight [out, in] -> [in, out]."""
    return x.T


def q_heads(x, d):
    """q_proj weight [(N H), D] -> [D, K, G, H]: the query heads grouped by their KV head."""
    return x.T.reshape(d["D"], d["K"], d["G"], d["H"])


def kv_heads(x, d):
    """k_proj / v_proj weight [(K H), D] -> [D, K, H]."""
    return x.T.reshape(d["D"], d["K"], d["H"])


def q_bias_heads(x, d):
    """q_proj bias [(N H)] -> [K, G, H]."""
    return x.reshape(d["K"], d["G"], d["H"])


def kv_bias_heads(x, d):
    """k_proj / v_proj bias [(K H)] -> [K, H]."""
    return x.reshape(d["K"], d["H"])


# Fused leaves (jpaged/models/weights.py): where each part goes along axis -2 of one layer's leaf.
FUSED_PARTS: dict[str, Callable[[dict[str, int]], int | slice]] = {
    "q": lambda d: slice(0, d["G"]), "k": lambda d: d["G"], "v": lambda d: d["G"] + 1,
    "gate": lambda d: 0, "up": lambda d: 1,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    dst: str                         # path in the params pytree, "/"-separated
    shape: tuple[str, ...]           # the HF tensor's shape in legend letters, checked before transform
    transform: Transform = identity  # HF layout -> jpaged layout of one (per-layer) tensor
    part: str | None = None          # for a fused leaf: which part (FUSED_PARTS) this tensor fills

    def index(self, dims: dict[str, int]) -> tuple:
        """Where the transformed tensor goes in one layer's leaf."""
        return (...,) if self.part is None else (..., FUSED_PARTS[self.part](dims), slice(None))


_ATTN = "model.layers.{}.self_attn."
HF_TO_JPAGED: dict[str, Rule] = {
    "model.embed_tokens.weight": Rule("embed/embedding", ("V", "D")),
    "model.norm.weight": Rule("norm/scale", ("D",)),
    "lm_head.weight": Rule("lm_head", ("V", "D"), transpose),
    "model.layers.{}.input_layernorm.weight": Rule("layers/attn_norm/scale", ("D",)),
    "model.layers.{}.post_attention_layernorm.weight": Rule("layers/mlp_norm/scale", ("D",)),
    _ATTN + "q_proj.weight": Rule("layers/attn/wqkv", ("NH", "D"), q_heads, "q"),
    _ATTN + "k_proj.weight": Rule("layers/attn/wqkv", ("KH", "D"), kv_heads, "k"),
    _ATTN + "v_proj.weight": Rule("layers/attn/wqkv", ("KH", "D"), kv_heads, "v"),
    _ATTN + "o_proj.weight": Rule("layers/attn/wo", ("D", "NH"), transpose),
    _ATTN + "q_proj.bias": Rule("layers/attn/bqkv", ("NH",), q_bias_heads, "q"),
    _ATTN + "k_proj.bias": Rule("layers/attn/bqkv", ("KH",), kv_bias_heads, "k"),
    _ATTN + "v_proj.bias": Rule("layers/attn/bqkv", ("KH",), kv_bias_heads, "v"),
    _ATTN + "o_proj.bias": Rule("layers/attn/bo", ("D",)),
    "model.layers.{}.mlp.gate_proj.weight": Rule("layers/mlp/w_gate_up", ("F", "D"), transpose,
                                                 "gate"),
    "model.layers.{}.mlp.up_proj.weight": Rule("layers/mlp/w_gate_up", ("F", "D"), transpose, "up"),
    "model.layers.{}.mlp.down_proj.weight": Rule("layers/mlp/w_down", ("D", "F"), transpose),
}

# HF tensors that carry nothing jpaged needs (old checkpoints saved RoPE buffers).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def unpermute_rope_rows(heads: str) -> Transform:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs adjacent values; HF rotates halves).

    llama.cpp writes `w.reshape(n, 2, H // 2, ...).swapaxes(1, 2)`; this is the inverse, written as
    transformers' GGUF loader writes it (`LlamaTensorProcessor._reverse_permute_weights`). It acts on
    weights [(n H), D] and biases [(n H)] alike.
    """
    def fix(x, d):
        n = d[heads]
        return x.reshape(n, x.shape[0] // n // 2, 2, *x.shape[1:]).swapaxes(2, 1).reshape(x.shape)
    return fix


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    hf_architecture: str                 # the HF `architectures` entry the GGUF maps to
    model_type: str
    fixes: dict[str, Transform]          # GGUF name -> transform back to the HF layout


_LLAMA_ROPE_FIXES = {
    "blk.{}.attn_q.weight": unpermute_rope_rows("N"),
    "blk.{}.attn_q.bias": unpermute_rope_rows("N"),
    "blk.{}.attn_k.weight": unpermute_rope_rows("K"),
    "blk.{}.attn_k.bias": unpermute_rope_rows("K"),
}

# GGUF `general.architecture` -> HF family. llama.cpp stores Mistral checkpoints as "llama" too.
GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", _LLAMA_ROPE_FIXES),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2", {}),
}


def shape_dims(config: ModelConfig) -> dict[str, int]:
    """Legend letter -> size, plus the fused head dims "NH" and "KH"."""
    dims = dict(V=config.vocab_size, D=config.hidden_size, F=config.intermediate_size,
                N=config.num_heads, K=config.num_kv_heads, H=config.head_dim,
                G=config.num_heads // config.num_kv_heads)
    dims["NH"], dims["KH"] = dims["N"] * dims["H"], dims["K"] * dims["H"]
    return dims


def expected_shape(rule: Rule, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[letters] for letters in rule.shape)


def layer_names(pattern: str, num_layers: int) -> list[str]:
    """A table name -> the concrete names it stands for (one per layer when it has `{}`)."""
    if "{}" not in pattern:
        return [pattern]
    return [pattern.format(i) for i in range(num_layers)]


def match_pattern(name: str, patterns) -> tuple[str, int | None] | None:
    """A concrete name -> (its table pattern, layer index or None), or None when no pattern fits."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            pattern = ".".join(parts[:i] + ["{}"] + parts[i + 1:])
            if pattern in patterns:
                return pattern, int(part)
    return (name, None) if name in patterns else None
