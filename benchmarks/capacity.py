"""Sizing on paper: what one device holds under tensor parallelism, and how many tokens fit.

From a real config and `jax.eval_shape` (no weight is allocated), with the engine's own sharding
rules (jpaged/parallel.py: Megatron-style weights, KV cache by KV head, KV heads replicated when
the devices outnumber them), for N devices of M GiB each:
  weight bytes per device      the sum of each param leaf's shard (replicated leaves count whole)
  KV bytes per token per device  2 (K and V) x L x K'/N heads x H x dtype bytes
  tokens that fit              (M GiB x gpu_memory_utilization - weights) / KV bytes per token,
                               rounded down to whole pages: the engine's own pool sizing

    python benchmarks/capacity.py benchmarks/configs/llama-3-70b.json --devices 8 \
        --dtype bfloat16 --memory-gib 80          # Llama-3-70B on 8 x H100 80GB
    python benchmarks/capacity.py benchmarks/configs/qwen3-30b-a3b.json --devices 8 \
        --enable-expert-parallel                  # an MoE: experts split whole over the devices
    python benchmarks/capacity.py HF_DIR_OR_CONFIG_JSON [--json]

For an MoE config it also reports the parameters a token runs through (the active ones: every
non-expert weight and k of the E experts of each MoE layer) and the experts each device holds.

CONFIG is an HF config.json, an HF model directory, or a converted jpaged checkpoint directory.
The figures agree with the shard shapes the engine builds (tests/parallel/test_tensor_parallel.py
checks them against `addressable_shards` on a virtual CPU mesh).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

_GIB = 1 << 30


def load_config(path: str):
    from jpaged.config import ModelConfig
    path = Path(path)
    if path.is_dir() and (path / "jpaged_config.json").is_file():
        return ModelConfig.from_json(path / "jpaged_config.json")
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected an HF config.json, an HF model directory or a "
                                f"converted jpaged checkpoint directory")
    return ModelConfig.from_hf_config(json.loads(path.read_text()))


def capacity(config, devices: int, dtype: str, memory_gib: float, utilization: float = 0.9,
             page_size: int = 16, expert_parallel: bool = False) -> dict:
    import jax.numpy as jnp
    from jpaged.checkpoint.params import param_shapes
    from jpaged.parallel import bytes_per_device, check_experts, kv_replicas, param_specs

    replicas = kv_replicas(config.num_heads, config.num_kv_heads, devices)
    check_experts(config, devices, expert_parallel)
    kv_heads_per_device = config.num_kv_heads * replicas // devices
    shapes = param_shapes(config)                      # jax.eval_shape: nothing is allocated
    # the layout the engine runs: wk, wv (bk, bv) with K' = K x replicas heads
    run = param_shapes(dataclasses.replace(config, num_kv_heads=config.num_kv_heads * replicas))
    itemsize = jnp.dtype(dtype).itemsize
    weights = bytes_per_device(run, param_specs(run, config, devices, expert_parallel), devices,
                               dtype)
    weights_total = sum(_numel(s.shape) * itemsize for s in _leaves(shapes))
    kv_per_token = 2 * config.num_layers * kv_heads_per_device * config.head_dim * itemsize
    budget = memory_gib * _GIB * utilization - weights
    pages = max(0, int(budget // (kv_per_token * page_size)))
    tokens = pages * page_size
    moe = {}
    if config.is_moe:
        experts = sum(_numel(s.shape) for s in _leaves(shapes["layers"]["moe"]))
        router = _numel(shapes["layers"]["moe"]["router"].shape)
        active = (experts - router) * config.num_experts_per_tok // config.num_experts + router
        moe = {"experts": config.num_experts, "experts_per_token": config.num_experts_per_tok,
               "experts_per_device": config.num_experts // devices if expert_parallel
               else config.num_experts, "expert_parallel": expert_parallel,
               "active_params": sum(_numel(s.shape) for s in _leaves(shapes)) - experts + active}
    return {
        "devices": devices, "dtype": dtype, "memory_gib": memory_gib,
        "gpu_memory_utilization": utilization, "page_size": page_size,
        "params": sum(_numel(s.shape) for s in _leaves(shapes)),
        "weight_bytes_total": weights_total,
        "weight_bytes_per_device": weights,
        "kv_heads_per_device": kv_heads_per_device, "kv_head_replicas": replicas,
        "kv_bytes_per_token_per_device": kv_per_token,
        "kv_bytes_per_page_per_device": kv_per_token * page_size,
        "kv_budget_bytes_per_device": max(0, int(budget)),
        "pages_that_fit": pages, "tokens_that_fit": tokens,
        "max_model_len": config.max_position_embeddings,
        "full_length_sequences": tokens // config.max_position_embeddings,
        **moe,
    }


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def report(name: str, c: dict) -> str:
    gib = lambda b: f"{b / _GIB:.2f} GiB"                                          # noqa: E731
    lines = [
        f"{name}: {c['params'] / 1e9:.2f}B params, {gib(c['weight_bytes_total'])} of {c['dtype']} "
        f"weights, on {c['devices']} devices x {c['memory_gib']:g} GiB "
        f"(gpu_memory_utilization {c['gpu_memory_utilization']})",
        f"  weights per device:          {gib(c['weight_bytes_per_device'])}",
        f"  KV heads per device:         {c['kv_heads_per_device']}"
        + (f" (each KV head replicated {c['kv_head_replicas']}x)" if c["kv_head_replicas"] > 1 else ""),
        f"  KV bytes per token / device: {c['kv_bytes_per_token_per_device']:,} "
        f"({c['kv_bytes_per_token_per_device'] * c['devices']:,} over the mesh)",
        f"  KV budget per device:        {gib(c['kv_budget_bytes_per_device'])}",
        f"  tokens that fit:             {c['tokens_that_fit']:,} ({c['pages_that_fit']:,} pages of "
        f"{c['page_size']}), i.e. {c['full_length_sequences']:,} sequences of "
        f"{c['max_model_len']:,} tokens",
    ]
    if "experts" in c:
        split = (f"{c['experts_per_device']} whole experts per device (expert parallel)"
                 if c["expert_parallel"] else "every expert on every device, split by its width")
        lines.insert(1, f"  MoE: {c['experts']} experts, {c['experts_per_token']} per token "
                        f"({c['active_params'] / 1e9:.2f}B active params); {split}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="HF config.json, HF model directory or jpaged checkpoint")
    parser.add_argument("--devices", type=int, default=1, help="tensor_parallel_size N")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--memory-gib", type=float, default=80.0, help="memory of one device")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="an MoE's experts split whole over the devices (else by width)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead")
    args = parser.parse_args(argv)
    try:
        c = capacity(load_config(args.config), args.devices, args.dtype, args.memory_gib,
                     args.gpu_memory_utilization, args.page_size, args.enable_expert_parallel)
    except (ValueError, FileNotFoundError) as exc:
        print(f"capacity: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(c) if args.json else report(Path(args.config).stem, c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
