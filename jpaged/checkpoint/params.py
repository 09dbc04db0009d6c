"""Build the CausalLM params pytree from a checkpoint source through the weight tables.

Each stacked leaf is filled layer by layer from the source, turned into a jax array, and its NumPy
buffer dropped, so at most one leaf is held twice. The mapping itself lives in weight_map.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jpaged.checkpoint.quantized import STORED, matmul_key, quantize_leaf, stored_leaf
from jpaged.checkpoint.sources import GGUFSource, HFSource
from jpaged.checkpoint.weight_map import (HF_IGNORED_SUFFIXES, Rule, expected_shape, hf_rules,
                                   layer_names, leaf_entries, shape_dims, table_pattern)
from jpaged.config import SUPPORTED_DTYPES, ModelConfig
from jpaged_kernels.quantization import QuantizedWeight

logger = logging.getLogger(__name__)


def resolve_dtype(dtype) -> str:
    """"bfloat16" / jnp.bfloat16 / np.dtype(...) -> its name, one of SUPPORTED_DTYPES."""
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: jpaged supports {', '.join(SUPPORTED_DTYPES)}")
    return name


def param_shapes(config: ModelConfig) -> dict:
    """The CausalLM params pytree as jax.ShapeDtypeStruct leaves (float32, layers stacked),
    without allocating."""
    from jpaged.models.decoder import CausalLM
    from jpaged.models.kv_cache import AttentionMetadata, KVCache

    def init():
        cache = KVCache.zeros(config, num_pages=2, page_size=1, dtype=jnp.float32)
        one = jnp.zeros((1,), jnp.int32)
        metadata = AttentionMetadata(block_tables=jnp.ones((1, 1), jnp.int32), slot_mapping=one,
                                     context_lens=one + 1, query_start_loc=jnp.array([0, 1]))
        return CausalLM(config).init(jax.random.key(0), one, one, cache, metadata)["params"]
    return jax.eval_shape(init)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {"layers/attn/wq": leaf, ...}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(flatten(value, path + "/") if isinstance(value, dict) else {path: value})
    return out


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return tree


def build_params(source: HFSource | GGUFSource, config: ModelConfig, dtype: str,
                 progress: bool = True, quantization: str | None = None,
                 group_size: int | None = None) -> dict:
    """Stream `source`'s tensors through HF_TO_JPAGED into the params pytree (jax arrays in dtype,
    layers stacked). A fused leaf is filled part by part, every part checked present.
    `quantization`: the matmul weights quantized as they are built (checkpoint/quantized.py)."""
    shapes = flatten(param_shapes(config))
    rules = _rules_by_dst(config)
    dims, available = shape_dims(config), set(source.tensor_names())
    _warn_unused(source, config, rules, shapes)
    total = sum(len(leaf_entries(hf_name, dst, config))
                for dst in shapes for hf_name, _ in rules.get(dst, ()))
    params = {}
    with tqdm(total=total, desc=f"converting {source.path.name}", unit="tensor",
              disable=not progress) as bar:
        for dst, shape in shapes.items():
            if dst not in rules:
                raise ValueError(f"jpaged param {dst} has no rule in "
                                 f"jpaged.checkpoint.weight_map.HF_TO_JPAGED")
            quantized = matmul_key(dst) is not None and quantization is not None
            if quantized and quantization in STORED:
                stored = stored_leaf(source, dst, rules[dst], shape.shape, config.num_layers, dims)
                if stored is not None:
                    params[dst] = stored
                    bar.update(sum(len(layer_names(hf, config.num_layers))
                                   for hf, _ in rules[dst]))
                    continue
            leaf = np.empty(shape.shape, jnp.dtype(dtype))
            for hf_name, rule in rules[dst]:
                for index, name in leaf_entries(hf_name, dst, config):
                    value = rule.transform(_read_checked(source, name, rule, dims, available), dims)
                    leaf[index][rule.index(dims)] = value          # leaf[index]: a view
                    bar.update()
            params[dst] = quantize_leaf(dst, leaf, quantization, group_size) \
                if quantized and quantization not in STORED else jnp.asarray(leaf)
            del leaf
    return unflatten(params)


def _rules_by_dst(config: ModelConfig) -> dict[str, list[tuple[str, Rule]]]:
    """params path -> the (HF name pattern, rule) pairs that fill it (several for a fused leaf),
    from the table of config's family (weight_map.hf_rules)."""
    out: dict[str, list[tuple[str, Rule]]] = {}
    for hf_name, rule in hf_rules(config).items():
        out.setdefault(rule.dst, []).append((hf_name, rule))
    return out


def _read_checked(source, name: str, rule: Rule, dims: dict[str, int], available: set[str]):
    if name not in available:
        raise ValueError(f"{source.path}: missing tensor {source.source_name(name)}, needed for "
                         f"jpaged param {rule.dst}")
    expected, actual = expected_shape(rule, dims), source.shape(name)
    if actual != expected:
        letters = "[" + ", ".join(rule.shape) + "]"
        raise ValueError(f"{source.path}: tensor {source.source_name(name)} has shape {list(actual)}, "
                         f"expected {list(expected)} = {letters} from the config")
    return source.read(name)


def _warn_unused(source, config: ModelConfig, rules: dict, shapes: dict) -> None:
    used = {hf_name for dst in shapes for hf_name, _ in rules.get(dst, ())}
    known = {hf_name for pairs in rules.values() for hf_name, _ in pairs}
    unused = []
    for name in source.tensor_names():
        pattern = table_pattern(name)
        if pattern not in known and not name.endswith(HF_IGNORED_SUFFIXES):
            unused.append(name)
        elif pattern in known and pattern not in used and name != "lm_head.weight":
            unused.append(name)   # e.g. a bias the config does not enable
    if unused:
        logger.warning("%s: %d tensors are not used by jpaged's %s model: %s", source.path, len(unused),
                       config.architecture, preview(unused))


def preview(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def save_params(path: Path, params: dict) -> None:
    """An Orbax checkpoint of the params pytree (what `jpaged convert` writes)."""
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.resolve(), params)
    checkpointer.wait_until_finished()


PARAMS_FILE = "params.safetensors"


def save_params_file(path: Path, params: dict, quantization: str | None = None) -> None:
    """The params pytree as one safetensors file of flat names ("layers/attn/wqkv"); bfloat16 and
    float8 arrays are stored as their raw bits (NumPy has neither type), named in the file's
    metadata, and a QuantizedWeight as "<name>/values", "<name>/scales", "<name>/mins" with its
    format in the metadata too."""
    from safetensors.numpy import save_file
    tensors, raw, quantized = {}, {}, {}
    for name, leaf in flatten(params).items():
        fields = {name: leaf}
        if isinstance(leaf, QuantizedWeight):
            quantized[name] = dict(bits=leaf.bits, group_size=leaf.group_size,
                                   activation_bits=leaf.activation_bits)
            fields = {f"{name}/{field}": getattr(leaf, field)
                      for field in ("values", "scales", "mins") if getattr(leaf, field) is not None}
        for key, value in fields.items():
            x = np.asarray(value)
            if x.dtype.name in _RAW_BITS:
                raw[key] = x.dtype.name
                x = x.view(_RAW_BITS[x.dtype.name])
            tensors[key] = x
    save_file(tensors, str(path), metadata={"raw": json.dumps(raw),
                                            "quantized": json.dumps(quantized),
                                            "quantization": quantization or ""})


_RAW_BITS = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8}


def params_file_dtype(path: Path) -> str:
    """The float dtype save_params_file stored (that of the final norm)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        if json.loads((f.metadata() or {}).get("raw", "{}")).get("norm/scale") == "bfloat16":
            return "bfloat16"
        return f.get_slice("norm/scale").get_dtype().lower().replace("f32", "float32").replace(
            "f16", "float16")


def params_file_quantization(path: Path) -> str | None:
    """The quantization a params file's matmul weights were stored with (None: floats)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        return (f.metadata() or {}).get("quantization") or None


def load_params_file(path: Path, dtype: str) -> dict:
    """save_params_file's file back as a params pytree of jax arrays, float leaves in `dtype`
    (quantized ones as stored).

    NOTE: a plain read and one device_put per leaf: several times faster than an Orbax restore
    (no tensorstore, no thread pool), which is what makes a warm start from the model cache fast.
    """
    import ml_dtypes
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        raw = json.loads(metadata.get("raw", "{}"))
        quantized = json.loads(metadata.get("quantized", "{}"))
        flat = {name: f.get_tensor(name) for name in f.keys()}
    types = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}
    flat = {name: x.view(types[raw[name]]) if name in raw else x for name, x in flat.items()}
    target = jnp.dtype(dtype)
    out = {}
    for name, form in quantized.items():
        fields = {field: flat.pop(f"{name}/{field}", None) for field in ("values", "scales", "mins")}
        out[name] = QuantizedWeight(*(None if x is None else jax.device_put(x)
                                      for x in fields.values()), **form)
    out.update({name: jax.device_put(x.astype(target, copy=False)) for name, x in flat.items()})
    return unflatten(out)
