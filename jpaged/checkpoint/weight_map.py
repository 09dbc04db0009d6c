"""Declarative weight tables: HF tensor names -> jpaged params, and GGUF tensor names -> HF names.

A new architecture is a table entry, not a script: `HF_TO_JPAGED` is the Llama family's table and
`FAMILY_RULES` what each other family changes in it (`hf_rules(config)`). `{}` in a name is the
layer index; tensors with `{}` are stacked over layers on axis 0 (over the MoE or the dense layers
only, for leaves of those: `leaf_entries`), a second `{}` is the expert index (axis 1), and several
HF tensors may fill one fused leaf (q, k, v into `wqkv`; the layout is jpaged/models/weights.py's),
or one HF tensor a whole fused leaf (Phi-3's `qkv_proj`). Every rule names the HF shape it expects
in the shape legend (V vocab, D model dim, F MLP dim, N query heads, K KV heads, H head dim, E
experts, Fe an expert's MLP dim; "NH" is N * H, "QKV" (N + 2K) * H, "2F" 2 * F), so a wrong tensor
fails with its name and both shapes.
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


def fused_qkv_heads(x, d):
    """Phi-3's qkv_proj weight [(N + 2K) H, D] (the q rows, then k, then v) -> [D, K, G+2, H]."""
    n, k, h = d["N"], d["K"], d["H"]
    w = x.T.reshape(d["D"], n + 2 * k, h)
    q = w[:, :n].reshape(d["D"], k, d["G"], h)
    return np.concatenate([q, w[:, n:n + k, None], w[:, n + k:, None]], axis=2)


def fused_gate_up(x, d):
    """Phi-3's gate_up_proj weight [2F, D] (the gate rows, then up) -> [D, 2, F]."""
    return x.T.reshape(d["D"], 2, d["F"])


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

_LAYER = "model.layers.{}."
# What each family changes in HF_TO_JPAGED: its rules replace the table's rules for the same HF
# names and for the same jpaged leaves.
FAMILY_RULES: dict[str, dict[str, Rule]] = {
    "qwen3": {
        _ATTN + "q_norm.weight": Rule("layers/attn/q_norm", ("H",)),
        _ATTN + "k_norm.weight": Rule("layers/attn/k_norm", ("H",)),
    },
    "gemma2": {   # the pre-MLP norm has its own name; post_attention_layernorm is a post norm
        _LAYER + "post_attention_layernorm.weight": Rule("layers/post_attn_norm/scale", ("D",)),
        _LAYER + "pre_feedforward_layernorm.weight": Rule("layers/mlp_norm/scale", ("D",)),
        _LAYER + "post_feedforward_layernorm.weight": Rule("layers/post_mlp_norm/scale", ("D",)),
    },
    "phi3": {
        _ATTN + "qkv_proj.weight": Rule("layers/attn/wqkv", ("QKV", "D"), fused_qkv_heads),
        _LAYER + "mlp.gate_up_proj.weight": Rule("layers/mlp/w_gate_up", ("2F", "D"),
                                                 fused_gate_up),
    },
    "mixtral": {
        _LAYER + "block_sparse_moe.gate.weight": Rule("layers/moe/router", ("E", "D"), transpose),
        _LAYER + "block_sparse_moe.experts.{}.w1.weight": Rule("layers/moe/w_gate_up",
                                                               ("Fe", "D"), transpose, "gate"),
        _LAYER + "block_sparse_moe.experts.{}.w3.weight": Rule("layers/moe/w_gate_up",
                                                               ("Fe", "D"), transpose, "up"),
        _LAYER + "block_sparse_moe.experts.{}.w2.weight": Rule("layers/moe/w_down", ("D", "Fe"),
                                                               transpose),
    },
}
FAMILY_RULES["gemma3"] = {**FAMILY_RULES["gemma2"], **FAMILY_RULES["qwen3"]}
FAMILY_RULES["qwen3_moe"] = {
    **FAMILY_RULES["qwen3"],
    _LAYER + "mlp.gate.weight": Rule("layers/moe/router", ("E", "D"), transpose),
    _LAYER + "mlp.experts.{}.gate_proj.weight": Rule("layers/moe/w_gate_up", ("Fe", "D"),
                                                     transpose, "gate"),
    _LAYER + "mlp.experts.{}.up_proj.weight": Rule("layers/moe/w_gate_up", ("Fe", "D"),
                                                   transpose, "up"),
    _LAYER + "mlp.experts.{}.down_proj.weight": Rule("layers/moe/w_down", ("D", "Fe"), transpose),
}


def hf_rules(config: ModelConfig) -> dict[str, Rule]:
    """The HF -> jpaged table of `config`'s family: HF_TO_JPAGED with the family's rules in place
    of the table's for the same HF names or the same jpaged leaves."""
    family = FAMILY_RULES.get(config.architecture, {})
    replaced = {rule.dst for rule in family.values()}
    rules = {name: rule for name, rule in HF_TO_JPAGED.items() if rule.dst not in replaced}
    return {**rules, **family}


def leaf_layers(dst: str, config: ModelConfig) -> tuple[int, ...]:
    """The layers a `layers/...` leaf stacks over, in order: the MoE layers for `layers/moe/*`,
    the dense ones for `layers/mlp/*`, every layer otherwise."""
    if dst.startswith("layers/moe/"):
        return config.moe_layer_ids()
    if dst.startswith("layers/mlp/"):
        return config.dense_layer_ids()
    return tuple(range(config.num_layers))


def leaf_entries(pattern: str, dst: str, config: ModelConfig) -> list[tuple[tuple, str]]:
    """A table name -> (index into the jpaged leaf, concrete HF name) for each tensor it stands
    for: () for a name without `{}`, (i,) for the i-th layer of the leaf's layers, (i, e) for
    expert e of it when the name has a second `{}`."""
    if "{}" not in pattern:
        return [((), pattern)]
    layers = leaf_layers(dst, config)
    if pattern.count("{}") == 1:
        return [((i,), pattern.format(layer)) for i, layer in enumerate(layers)]
    return [((i, e), pattern.format(layer, e)) for i, layer in enumerate(layers)
            for e in range(config.num_experts)]


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
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
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
    # GGUF -> HF names this architecture maps differently from GGUF_TO_HF, or adds. An HF name
    # with a second `{}` is one expert of a GGUF tensor that stacks them all ([E, ...]).
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    # GGUF names always dequantized, even when quantized weights are served as stored: their rows
    # are not the layout the stored path reshapes (Phi-3's fused q/k/v and gate/up)
    dequantized: tuple[str, ...] = ()


_LLAMA_ROPE_FIXES = {
    "blk.{}.attn_q.weight": unpermute_rope_rows("N"),
    "blk.{}.attn_q.bias": unpermute_rope_rows("N"),
    "blk.{}.attn_k.weight": unpermute_rope_rows("K"),
    "blk.{}.attn_k.bias": unpermute_rope_rows("K"),
}

def unshift_norm(x, d):
    """llama.cpp stores Gemma's RMSNorm weights w as 1 + w (its norm multiplies by the weight);
    HF's (and jpaged's) Gemma norm adds the 1 itself."""
    return x - 1.0


_GEMMA_NORM_FIXES = {name: unshift_norm for name in (
    "output_norm.weight", "blk.{}.attn_norm.weight", "blk.{}.post_attention_norm.weight",
    "blk.{}.ffn_norm.weight", "blk.{}.post_ffw_norm.weight", "blk.{}.attn_q_norm.weight",
    "blk.{}.attn_k_norm.weight")}
_GEMMA_NAMES = {
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}


def _expert_names(router: str, experts: str, gate: str, up: str, down: str) -> dict[str, str]:
    return {"blk.{}.ffn_gate_inp.weight": f"model.layers.{{}}.{router}.weight",
            "blk.{}.ffn_gate_exps.weight": f"model.layers.{{}}.{experts}.{{}}.{gate}.weight",
            "blk.{}.ffn_up_exps.weight": f"model.layers.{{}}.{experts}.{{}}.{up}.weight",
            "blk.{}.ffn_down_exps.weight": f"model.layers.{{}}.{experts}.{{}}.{down}.weight"}


# GGUF `general.architecture` -> HF family. llama.cpp stores Mistral checkpoints as "llama" too,
# and Mixtral as "llama" with experts (GGUF_MIXTRAL, chosen by `llama.expert_count`). q and k of
# the other architectures are stored unpermuted (llama.cpp rotates them NeoX-style).
GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", _LLAMA_ROPE_FIXES),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2", {}),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", {}),
    "qwen3moe": GGUFArch("Qwen3MoeForCausalLM", "qwen3_moe", {}, _expert_names(
        "mlp.gate", "mlp.experts", "gate_proj", "up_proj", "down_proj")),
    "gemma2": GGUFArch("Gemma2ForCausalLM", "gemma2", _GEMMA_NORM_FIXES, _GEMMA_NAMES),
    "gemma3": GGUFArch("Gemma3ForCausalLM", "gemma3_text", _GEMMA_NORM_FIXES, _GEMMA_NAMES),
    "phi3": GGUFArch("Phi3ForCausalLM", "phi3", {}, {
        "blk.{}.attn_qkv.weight": "model.layers.{}.self_attn.qkv_proj.weight",
        "blk.{}.ffn_up.weight": "model.layers.{}.mlp.gate_up_proj.weight"},   # gate rows, up rows
        dequantized=("blk.{}.attn_qkv.weight", "blk.{}.ffn_up.weight")),
}
GGUF_MIXTRAL = GGUFArch("MixtralForCausalLM", "mixtral", _LLAMA_ROPE_FIXES, _expert_names(
    "block_sparse_moe.gate", "block_sparse_moe.experts", "w1", "w3", "w2"))


def shape_dims(config: ModelConfig) -> dict[str, int]:
    """Legend letter -> size, plus the fused head dims "NH" and "KH"."""
    dims = dict(V=config.vocab_size, D=config.hidden_size, F=config.intermediate_size,
                N=config.num_heads, K=config.num_kv_heads, H=config.head_dim,
                G=config.num_heads // config.num_kv_heads, E=config.num_experts,
                Fe=config.moe_intermediate_size)
    dims["NH"], dims["KH"] = dims["N"] * dims["H"], dims["K"] * dims["H"]
    dims["QKV"], dims["2F"] = (dims["N"] + 2 * dims["K"]) * dims["H"], 2 * dims["F"]
    return dims


def expected_shape(rule: Rule, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[letters] for letters in rule.shape)


def layer_names(pattern: str, num_layers: int) -> list[str]:
    """A table name -> the concrete names it stands for (one per layer when it has `{}`)."""
    if "{}" not in pattern:
        return [pattern]
    return [pattern.format(i) for i in range(num_layers)]


def table_pattern(name: str) -> str:
    """A concrete name with every all-digit part (layer, expert) as `{}`."""
    return ".".join("{}" if part.isdigit() else part for part in name.split("."))


def match_pattern(name: str, patterns) -> tuple[str, int | None] | None:
    """A concrete name -> (its table pattern, layer index or None), or None when no pattern fits."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            pattern = ".".join(parts[:i] + ["{}"] + parts[i + 1:])
            if pattern in patterns:
                return pattern, int(part)
    return (name, None) if name in patterns else None
