"""PEFT LoRA adapters from disk -> jpaged's LoRA layout (jpaged/lora/__init__.py), with NumPy.

An adapter directory holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules, ...)
and `adapter_model.safetensors`, whose tensors are named
`base_model.model.model.layers.{i}.{self_attn|mlp}.{target}.lora_{A|B}.weight`: A [r, in] and
B [out, r] of nn.Linear's orientation, so a target's delta is (x @ A.T @ B.T) * scale.
Every refusal names the adapter, the field and the fix.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


class LoRAError(ValueError):
    """An adapter that cannot be served, with what to change."""


def lora_shapes(config, rank: int) -> dict[str, tuple[int, ...]]:
    """The layout's leaves for `config` (a ModelConfig) at rank R, stacked over the L layers."""
    L, D, F, N, K, H = (config.num_layers, config.hidden_size, config.intermediate_size,
                        config.num_heads, config.num_kv_heads, config.head_dim)
    R, G = rank, N // K
    return {"qkv_a": (L, D, 3, R), "q_b": (L, R, K, G, H), "k_b": (L, R, K, H),
            "v_b": (L, R, K, H), "o_a": (L, N * H, R), "o_b": (L, R, D),
            "gate_up_a": (L, D, 2, R), "gate_b": (L, R, F), "up_b": (L, R, F),
            "down_a": (L, F, R), "down_b": (L, R, D)}


def zeros_lora(config, rank: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """An adapter that changes nothing (every target zero), in the layout at rank `rank`."""
    return {name: np.zeros(shape, dtype) for name, shape in lora_shapes(config, rank).items()}


def read_adapter_config(path: Path, name: str) -> dict:
    file = path / "adapter_config.json"
    if not file.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: no adapter_config.json in {path}; give the "
                        f"directory PEFT's save_pretrained wrote")
    cfg = json.loads(file.read_text())
    for key, bad in (("peft_type", lambda v: v not in (None, "LORA")),
                     ("use_dora", bool), ("rank_pattern", bool), ("alpha_pattern", bool),
                     ("fan_in_fan_out", bool), ("modules_to_save", bool),
                     ("bias", lambda v: v not in (None, "none"))):
        if bad(cfg.get(key)):
            raise LoRAError(f"LoRA adapter {name!r}: adapter_config.json has {key}="
                            f"{cfg.get(key)!r}, which jpaged does not serve; train a plain LoRA "
                            f"(peft_type LORA, one r and lora_alpha, bias 'none', no DoRA, no "
                            f"modules_to_save)")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise LoRAError(f"LoRA adapter {name!r}: adapter_config.json field r must be an int >= 1, "
                        f"got {cfg.get('r')!r}")
    return cfg


def read_adapter_tensors(path: Path, name: str) -> dict[str, np.ndarray]:
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise LoRAError(f"LoRA adapter {name!r}: {path} has adapter_model.bin (a pickle), which "
                            f"jpaged does not load (unpickling runs code); save it as safetensors: "
                            f"model.save_pretrained(dir, safe_serialization=True)")
        raise LoRAError(f"LoRA adapter {name!r}: no adapter_model.safetensors in {path}")
    from safetensors import safe_open
    tensors = {}
    with safe_open(str(file), framework="numpy") as f:
        for key in f.keys():
            if f.get_slice(key).get_dtype() == "BF16":
                with safe_open(str(file), framework="flax") as g:
                    tensors[key] = np.asarray(g.get_tensor(key), np.float32)
            else:
                tensors[key] = f.get_tensor(key)
    return tensors


def load_peft_adapter(path: str | Path, config, max_rank: int, *, name: str | None = None,
                      dtype=np.float32) -> dict[str, np.ndarray]:
    """Read a PEFT LoRA adapter for the model of `config` (a ModelConfig) into jpaged's layout at
    rank `max_rank` (jpaged/lora/__init__.py), the scale folded into B. LoRAError names what
    does not fit: rank above max_rank, a target jpaged has no slot for, shapes of another model."""
    path = Path(path)
    name = name or path.name
    cfg = read_adapter_config(path, name)
    rank = cfg["r"]
    if rank > max_rank:
        raise LoRAError(f"LoRA adapter {name!r}: its rank r={rank} is above max_lora_rank="
                        f"{max_rank}; start the engine with max_lora_rank >= {rank} "
                        f"(--max-lora-rank {rank})")
    if config.is_moe:
        raise LoRAError(f"LoRA adapter {name!r}: jpaged serves LoRA on dense models only, and "
                        f"this model has experts (num_experts={config.num_experts})")
    alpha = cfg.get("lora_alpha", rank)
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    out = zeros_lora(config, max_rank, np.float32)
    seen = set()
    for key, tensor in read_adapter_tensors(path, name).items():
        match = _NAME.match(key)
        if match is None:
            raise LoRAError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA weight of a "
                            f"decoder layer's projection; jpaged serves targets {list(TARGETS)} "
                            f"(target_modules in adapter_config.json)")
        layer, target, which = int(match[1]), match[2], match[3]
        if target not in TARGETS:
            raise LoRAError(f"LoRA adapter {name!r}: target module {target!r} (tensor {key!r}) "
                            f"is not one jpaged serves; target_modules must be among "
                            f"{list(TARGETS)}")
        if layer >= config.num_layers:
            raise LoRAError(f"LoRA adapter {name!r}: tensor {key!r} is for layer {layer} but the "
                            f"base model has {config.num_layers} layers; it was trained for "
                            f"another base model ({cfg.get('base_model_name_or_path')!r})")
        _place(out, config, name, key, target, which, layer, np.asarray(tensor, np.float32),
               rank, max_rank, scale)
        seen.add((layer, target, which))
    for layer, target, which in seen:
        if (layer, target, "B" if which == "A" else "A") not in seen:
            raise LoRAError(f"LoRA adapter {name!r}: layer {layer} {target} has lora_{which} but "
                            f"no lora_{'B' if which == 'A' else 'A'}; the adapter file is "
                            f"incomplete")
    if not seen:
        raise LoRAError(f"LoRA adapter {name!r}: adapter_model.safetensors holds no LoRA weights")
    return {k: v.astype(dtype) for k, v in out.items()}


def _place(out, c, name, key, target, which, layer, w, rank, max_rank, scale) -> None:
    """Write one PEFT tensor (A [r, in] or B [out, r]) into the layout, checking its shape."""
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    fan_in = {"o_proj": N * H, "down_proj": F}.get(target, D)
    fan_out = {"q_proj": N * H, "k_proj": K * H, "v_proj": K * H,
               "gate_proj": F, "up_proj": F}.get(target, D)
    expected = (rank, fan_in) if which == "A" else (fan_out, rank)
    if w.shape != expected:
        raise LoRAError(f"LoRA adapter {name!r}: tensor {key!r} has shape {list(w.shape)} but "
                        f"this base model (hidden_size {D}, intermediate_size {F}, {N} heads, "
                        f"{K} KV heads of {H}) with r={rank} needs {list(expected)}; the adapter "
                        f"was trained for another base model or adapter_config.json's r is wrong")
    G = N // K
    if which == "A":
        a = w.T                                                      # [in, r]
        slot = {"q_proj": ("qkv_a", 0), "k_proj": ("qkv_a", 1), "v_proj": ("qkv_a", 2),
                "gate_proj": ("gate_up_a", 0), "up_proj": ("gate_up_a", 1),
                "o_proj": ("o_a", None), "down_proj": ("down_a", None)}[target]
        leaf, index = slot
        if index is None:
            out[leaf][layer, :, :rank] = a
        else:
            out[leaf][layer, :, index, :rank] = a
        return
    b = w.T * scale                                                  # [r, out]
    shape = {"q_proj": (K, G, H), "k_proj": (K, H), "v_proj": (K, H)}.get(target, (fan_out,))
    leaf = {"q_proj": "q_b", "k_proj": "k_b", "v_proj": "v_b", "o_proj": "o_b",
            "gate_proj": "gate_b", "up_proj": "up_b", "down_proj": "down_b"}[target]
    out[leaf][layer, :rank] = b.reshape(rank, *shape)
