"""Checkpoint readers that hand out one HF-named tensor at a time, as NumPy arrays.

`HFSource` reads an HF model directory (config.json + safetensors, one file or sharded) with
`safe_open`, so only the tensor being converted is in memory. `GGUFSource` reads a `.gguf` file:
it dequantizes each tensor with the `gguf` package, renames it through `GGUF_TO_HF`, undoes
llama.cpp's layout changes, and synthesizes an HF-style config.json from the GGUF metadata. Both
expose the same small interface, so the converter never branches on the format.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jpaged.checkpoint.gguf_blocks import SUPPORTED as GGUF_BLOCK_TYPES
from jpaged.checkpoint.prequantized import PrequantizedFormat
from jpaged.checkpoint.gguf_blocks import HostQuantized
from jpaged.checkpoint.gguf_blocks import decode as decode_blocks
from jpaged.checkpoint.weight_map import (GGUF_ARCHITECTURES, GGUF_MIXTRAL, GGUF_TO_HF,
                                          match_pattern, shape_dims, table_pattern)
from jpaged.config import SUPPORTED_DTYPES, ModelConfig

logger = logging.getLogger(__name__)

# Files transformers writes for a tokenizer; copied as they are from an HF directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_MISSING = object()


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_MARKERS)


def load_tokenizer(directory: Path):
    """The directory's tokenizer (a transformers fast tokenizer), or None when it has none."""
    if not has_tokenizer(directory):
        return None
    # NOTE: when tokenizer_config.json names the generic fast class (as the tokenizers jpaged saves
    # do), load that class directly: AutoTokenizer would pick the same class but first reads the
    # model config, which imports torch (~4 s of a warm start).
    declared = (read_json(directory / "tokenizer_config.json") or {}).get("tokenizer_class")
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and \
            (directory / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(directory))


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class HFSource:
    """An HF model directory: config.json plus model.safetensors or sharded model-*.safetensors."""
    kind = "hf"

    def __init__(self, path: str | Path):
        from safetensors import safe_open
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: an HF model directory needs config.json "
                                    f"beside its *.safetensors weights")
        self.hf_config = read_json(config_path)
        self.config = ModelConfig.from_hf_config(self.hf_config)   # unsupported architectures stop here
        self.generation_config = read_json(self.path / "generation_config.json")
        self._safe_open = safe_open
        self._files = {}    # (file, framework) -> open safetensors handle
        self._where = {name: file for file in self._weight_files() for name in self._open(file).keys()}
        # a GPTQ / AWQ / compressed-tensors checkpoint: its layers under their float names
        self.prequantized = PrequantizedFormat.from_hf_config(self.hf_config)
        self._layers, hidden = self.prequantized.logical_names(list(self._where)) \
            if self.prequantized else ({}, set())
        self._names = [n for n in self._where if n not in hidden and n not in self._layers] + \
            sorted(self._layers)

    def _weight_files(self) -> list[Path]:
        index = read_json(self.path / "model.safetensors.index.json")
        if index is not None:
            files = [self.path / f for f in sorted(set(index["weight_map"].values()))]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{f} not found: model.safetensors.index.json in {self.path} "
                                            f"lists it as a shard")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.path.glob("*.bin")) + \
                sorted(p.name for p in self.path.glob("*.pt"))
            hint = f" (found {', '.join(found)}: re-save with safe_serialization=True)" if found else ""
            raise FileNotFoundError(f"no *.safetensors weights in {self.path}: expected model.safetensors "
                                    f"or shards listed in model.safetensors.index.json{hint}")
        return files

    def _open(self, file: Path, framework: str = "numpy"):
        key = (file, framework)
        if key not in self._files:
            self._files[key] = self._safe_open(str(file), framework=framework)
        return self._files[key]

    @property
    def default_dtype(self) -> str:
        dtype = self.hf_config.get("torch_dtype") or self.hf_config.get("dtype")
        return dtype if dtype in SUPPORTED_DTYPES else "float32"

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def source_name(self, name: str) -> str:
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._layers:
            return self.prequantized.shape(self._read_stored, self._layers[name])
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        """A float tensor; a pre-quantized layer dequantized (float32, [out, in])."""
        if name in self._layers:
            return self.prequantized.dequantized(self._read_stored, self._layers[name])
        return self._read_stored(name)

    def stores_quantized(self, name: str) -> bool:
        return name in self._layers and \
            self.prequantized.in_groups(self._read_stored, self._layers[name])

    def read_quantized(self, name: str) -> HostQuantized | None:
        """A pre-quantized layer as stored (prequantized.py), [out, in]; None for floats."""
        if name not in self._layers:
            return None
        return self.prequantized.read(self._read_stored, self._layers[name])

    def _read_stored(self, name: str) -> np.ndarray:
        file = self._where[name]
        if self._open(file).get_slice(name).get_dtype() == "BF16":
            # NumPy has no bfloat16 of its own; the flax framework returns one (ml_dtypes) that does.
            return np.asarray(self._open(file, "flax").get_tensor(name))
        return self._open(file).get_tensor(name)

    def save_config_files(self, out: Path) -> None:
        for name in ("config.json", "generation_config.json"):
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, out / name)

    def load_tokenizer(self):
        return load_tokenizer(self.path)

    def save_tokenizer(self, out: Path) -> bool:
        copied = [name for name in TOKENIZER_FILES if (self.path / name).is_file()]
        for name in copied:
            shutil.copyfile(self.path / name, out / name)
        return bool(copied)


class GGUFSource:
    """A llama.cpp `.gguf` file, dequantized tensor by tensor to float32 in the HF layout."""
    kind = "gguf"
    default_dtype = "float32"
    generation_config = None

    def __init__(self, path: str | Path):
        import gguf
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found: expected a .gguf file")
        self._gguf = gguf
        self.reader = gguf.GGUFReader(str(self.path))
        self.arch_name = self._meta("general.architecture")
        if self.arch_name not in GGUF_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {self.arch_name!r} in {self.path}: jpaged "
                             f"supports {', '.join(GGUF_ARCHITECTURES)}")
        self.arch = GGUF_ARCHITECTURES[self.arch_name]
        if self.arch_name == "llama" and self._meta("llama.expert_count", 0):
            self.arch = GGUF_MIXTRAL
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._expert_of: dict[str, int] = {}    # HF name -> its expert in a stacked GGUF tensor
        self._stacked = (None, None)            # the last stacked tensor dequantized, by name
        self._hf_to_gguf = self._map_names()
        self.hf_config = self._hf_config()
        self.config = ModelConfig.from_hf_config(self.hf_config)
        self._dims = shape_dims(self.config)

    def _meta(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ValueError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def _map_names(self) -> dict[str, str]:
        """HF name -> GGUF name; a GGUF tensor stacking E experts stands for E HF names."""
        table = {**GGUF_TO_HF, **self.arch.names}
        hf_to_gguf, unused = {}, []
        for name in self._tensors:
            match = match_pattern(name, table)
            if match is None:
                unused.append(name)
                continue
            pattern, layer = match
            hf_pattern = table[pattern]
            if hf_pattern.count("{}") == 2:
                for expert in range(self._hf_shape(self._tensors[name])[0]):
                    hf_name = hf_pattern.format(layer, expert)
                    hf_to_gguf[hf_name], self._expert_of[hf_name] = name, expert
                continue
            hf_to_gguf[hf_pattern.format(layer) if layer is not None else hf_pattern] = name
        unused = [name for name in unused if name not in (    # read by _rope_scaling
            "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")]
        if unused:
            logger.warning("%s: ignoring %d GGUF tensors with no HF name: %s", self.path, len(unused),
                           ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
        return hf_to_gguf

    def _hf_config(self) -> dict:
        """An HF-style config.json built from the GGUF metadata (what transformers' loader infers)."""
        a = self.arch_name
        heads = self._meta(f"{a}.attention.head_count")
        hidden = self._meta(f"{a}.embedding_length")
        head_dim = self._meta(f"{a}.attention.key_length", hidden // heads)
        rotary_dim = self._meta(f"{a}.rope.dimension_count", head_dim)
        theta = float(self._meta(f"{a}.rope.freq_base", 10000.0))
        config = {
            "architectures": [self.arch.hf_architecture],
            "model_type": self.arch.model_type,
            "vocab_size": self._vocab_size(),
            "hidden_size": hidden,
            "intermediate_size": self._meta(f"{a}.feed_forward_length"),
            "num_hidden_layers": self._meta(f"{a}.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._meta(f"{a}.attention.head_count_kv", heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float(self._meta(f"{a}.attention.layer_norm_rms_epsilon")),
            "rope_theta": theta,
            "rope_scaling": self._rope_scaling(theta, head_dim),
            "max_position_embeddings": self._meta(f"{a}.context_length", 2048),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self._meta("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self._meta("tokenizer.ggml.eos_token_id", None),
            "torch_dtype": "float32",
        }
        if rotary_dim != head_dim:
            config["partial_rotary_factor"] = rotary_dim / head_dim
        if self.arch.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            config["use_sliding_window"] = False
        config.update(self._family_config(config))
        return config

    def _family_config(self, config: dict) -> dict:
        """What llama.cpp stores (or hard-codes) for the families beyond Llama's fields."""
        a, kind, layers = self.arch_name, self.arch.model_type, config["num_hidden_layers"]
        window = self._meta(f"{a}.attention.sliding_window", 0) or None
        if kind in ("mixtral", "qwen3_moe"):
            experts = dict(num_experts_per_tok=self._meta(f"{a}.expert_used_count"),
                           num_local_experts=self._meta(f"{a}.expert_count"))
            if kind == "qwen3_moe":     # llama.cpp's qwen3moe graph renormalises the top-k
                experts.update(moe_intermediate_size=self._meta(f"{a}.expert_feed_forward_length"),
                               norm_topk_prob=bool(self._meta(f"{a}.expert_weights_norm", True)))
            return experts
        if kind == "phi3":
            return dict(sliding_window=window)
        if not kind.startswith("gemma"):
            return {}
        # NOTE: llama.cpp does not store query_pre_attn_scalar: it scales by 1/sqrt(D/N) for the
        # 27B models (46 layers for Gemma 2, 62 for Gemma 3) and by 1/sqrt(H) otherwise; Gemma 3's
        # pattern (5 sliding : 1 global) and local RoPE base (10000) are fixed there too.
        big = layers == (46 if kind == "gemma2" else 62)
        out = dict(hidden_activation="gelu_pytorch_tanh", sliding_window=window,
                   query_pre_attn_scalar=config["hidden_size"] // config["num_attention_heads"]
                   if big else config["head_dim"])
        if kind == "gemma2":
            out.update(attn_logit_softcapping=self._meta(f"{a}.attn_logit_softcapping", None),
                       final_logit_softcapping=self._meta(f"{a}.final_logit_softcapping", None))
        else:
            out.update(sliding_window_pattern=6, rope_local_base_freq=10000.0)
        return out

    def _vocab_size(self) -> int:
        vocab = self._meta(f"{self.arch_name}.vocab_size", None)
        if vocab is None and "tokenizer.ggml.tokens" in self.reader.fields:
            vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        if vocab is None:
            vocab = int(self._tensors["token_embd.weight"].shape[-1])   # ggml order: [D, V]
        return int(vocab)

    def _rope_scaling(self, theta: float, head_dim: int) -> dict | None:
        a = self.arch_name
        kind = self._meta(f"{a}.rope.scaling.type", "none")
        if "rope_factors_long.weight" in self._tensors:     # Phi-3's LongRoPE
            factors = {f"{which}_factor": self._dequantize(
                self._tensors[f"rope_factors_{which}.weight"]).reshape(-1).tolist()
                for which in ("long", "short")}
            return {"rope_type": "longrope", **factors, "original_max_position_embeddings":
                    self._meta(f"{a}.rope.scaling.original_context_length")}
        if "rope_freqs.weight" in self._tensors:
            freqs = self._dequantize(self._tensors["rope_freqs.weight"]).reshape(-1)
            original = self._meta(f"{a}.rope.scaling.original_context_length", 8192)
            return llama3_scaling_from_rope_freqs(freqs, theta, head_dim, original, self.path)
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._meta(f"{a}.rope.scaling.factor"))}
        raise ValueError(f"{self.path}: unsupported GGUF rope scaling {kind!r}: jpaged supports none, "
                         f"linear, and llama3 (rope_freqs)")

    def _dequantize(self, tensor) -> np.ndarray:
        values = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(values, dtype=np.float32).reshape(self._hf_shape(tensor))

    @staticmethod
    def _hf_shape(tensor) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(tensor.shape))   # ggml lists the fastest axis first

    def tensor_names(self) -> list[str]:
        return list(self._hf_to_gguf)

    def source_name(self, name: str) -> str:
        return f"{self._hf_to_gguf.get(name, '?')} (HF {name})"

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self._hf_shape(self._tensors[self._hf_to_gguf[name]])
        return shape[1:] if name in self._expert_of else shape

    def read(self, name: str) -> np.ndarray:
        gguf_name = self._hf_to_gguf[name]
        if name in self._expert_of:             # one expert of a stacked tensor, dequantized once
            if self._stacked[0] != gguf_name:
                self._stacked = (gguf_name, self._dequantize(self._tensors[gguf_name]))
            return self._fix(gguf_name, self._stacked[1][self._expert_of[name]])
        values = self._dequantize(self._tensors[gguf_name])
        return self._fix(gguf_name, values)

    def read_quantized(self, name: str) -> HostQuantized | None:
        """The tensor as stored (gguf_blocks.py), in the HF layout [out, in]; None when it is
        stored as floats."""
        gguf_name = self._hf_to_gguf[name]
        tensor = self._tensors[gguf_name]
        if tensor.tensor_type.name not in GGUF_BLOCK_TYPES:
            return None
        out_rows = self._hf_shape(tensor)[0]
        quantized = decode_blocks(tensor.tensor_type.name, np.asarray(tensor.data), out_rows)
        return quantized.map_rows(lambda x: self._fix(gguf_name, x))

    def stores_quantized(self, name: str) -> bool:
        return self.tensor_type(name) in GGUF_BLOCK_TYPES

    def tensor_type(self, name: str) -> str:
        """The stored type ("F32" for the tensors jpaged dequantizes whatever their type:
        stacked experts and the GGUFArch's `dequantized`)."""
        gguf_name = self._hf_to_gguf[name]
        if name in self._expert_of or table_pattern(gguf_name) in self.arch.dequantized:
            return "F32"
        return self._tensors[gguf_name].tensor_type.name

    def _fix(self, gguf_name: str, values: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's layout changes (they act on output rows, so on block rows too)."""
        match = match_pattern(gguf_name, self.arch.fixes)
        if match is not None:
            values = self.arch.fixes[match[0]](values, self._dims)
        return values

    def save_config_files(self, out: Path) -> None:
        (out / "config.json").write_text(json.dumps(self.hf_config, indent=2))

    def load_tokenizer(self):
        """The tokenizer transformers builds from the GGUF metadata (vocab, merges, chat template).

        NOTE: built from the metadata this reader already parsed, with transformers' own GGUF
        recipe; `AutoTokenizer.from_pretrained(gguf_file=...)` would parse the file a second time
        (~3 s for SmolLM2) and import torch. That is only the fallback, for transformers versions
        whose recipe lives elsewhere.
        """
        if "tokenizer.ggml.model" not in self.reader.fields:
            return None
        try:
            return self._tokenizer_from_metadata()
        except ImportError:
            pass
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except ImportError as error:   # transformers' GGUF metadata reader imports torch
            raise ImportError(f"{self.path}: this transformers version needs torch to build a tokenizer "
                              f"from GGUF metadata: `pip install torch==2.13.0` (CPU), or convert the "
                              f"GGUF where torch is installed and load the converted checkpoint") from error

    def _tokenizer_from_metadata(self):
        """transformers' own GGUF tokenizer recipe (`get_gguf_tokenizer` + `convert_gguf_tokenizer`),
        fed from gguf-py's reader instead of transformers' reader, which needs torch."""
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
        from transformers import PreTrainedTokenizerFast
        groups = {group: {name: self._meta(f"tokenizer.{key}") for key, name in renames.items()
                          if f"tokenizer.{key}" in self.reader.fields}
                  for group, renames in GGUF_TOKENIZER_MAPPING.items()}
        tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
        if tokenizer_dict.get("tokenizer_type") == "llama":
            tokenizer_config.setdefault("add_bos_token", True)   # llama.cpp's default for sentencepiece
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            token_id = self._meta(f"tokenizer.ggml.{key}", None)
            tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
        backend, extra = convert_gguf_tokenizer(self.arch_name, tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)

    def save_tokenizer(self, out: Path) -> bool:
        tokenizer = self.load_tokenizer()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        return tokenizer is not None


def llama3_scaling_from_rope_freqs(freqs: np.ndarray, theta: float, head_dim: int,
                                   original_context: int, path: Path) -> dict:
    """llama.cpp stores Llama 3.1-style RoPE scaling as per-frequency divisors (`rope_freqs.weight`).

    Recover the HF `llama3` rope_scaling dict: low/high frequency factors 1 and 4 are what every
    Llama 3.x release uses; the factor is the largest divisor (when the lowest frequency is fully
    scaled) or one of the released factors. The fit is checked, not trusted.
    """
    probe = dict(architecture="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1,
                 num_layers=1, num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta)
    base = ModelConfig(**probe).rope_inv_freq()
    for factor in dict.fromkeys((float(freqs.max()), 8.0, 16.0, 32.0)):
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": int(original_context)}
        scaled = ModelConfig(**probe, rope_scaling=scaling).rope_inv_freq()
        if freqs.shape == base.shape and np.allclose(base / scaled, freqs, rtol=1e-3):
            return scaling
    raise ValueError(f"{path}: rope_freqs.weight does not match llama3 rope scaling (low/high "
                     f"frequency factors 1 and 4, original context {original_context}); this GGUF's "
                     f"RoPE scaling is not supported")


def open_source(path: str | Path) -> HFSource | GGUFSource:
    """An HF model directory or a .gguf file; anything else raises naming both forms."""
    path = Path(path)
    if path.is_dir():
        return HFSource(path)
    if path.suffix == ".gguf" and path.is_file():
        return GGUFSource(path)
    raise FileNotFoundError(f"{path}: expected an HF model directory (config.json + *.safetensors) "
                            f"or a .gguf file")
