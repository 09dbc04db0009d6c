"""Random-weight checkpoints from a real config, for benchmarks at scale (e.g. Llama-3-8B shapes).

Throughput does not depend on the weights' values, and nothing has to be downloaded. Weights are
drawn on the device leaf by leaf, so a 16 GB bfloat16 model never passes through host memory.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from jpaged.checkpoint.params import param_shapes
from jpaged.config import ModelConfig
from jpaged.checkpoint.loader import LoadedCheckpoint


def random_checkpoint(hf_config: dict, dtype: str = "bfloat16", seed: int = 0) -> LoadedCheckpoint:
    config = ModelConfig.from_hf_config(hf_config)
    leaves, treedef = jax.tree.flatten(param_shapes(config))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = jax.tree.unflatten(treedef, [_normal(k, tuple(leaf.shape), jnp.dtype(dtype).name)
                                          for k, leaf in zip(keys, leaves)])
    return LoadedCheckpoint(config, params, jnp.dtype(dtype).name, None, config.eos_token_ids,
                            "random", Path("<random weights>"))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
