"""Tensor parallelism over a `jax.sharding.Mesh`: Megatron-style weight shardings, a KV cache split
by KV head, and attention run per device under `shard_map`.

Nothing here moves data by hand: weights and the cache are placed with `NamedSharding`s, the step
is plain jitted code with those shardings, and XLA's SPMD partitioner inserts the collectives: per
layer one all-reduce after attention's output projection and one after the MLP's down projection;
per step one all-reduce for the vocabulary-sharded embedding lookup and one all-gather of the
vocabulary-sharded logits (tests/parallel counts them in the compiled step). The host scheduler and block manager do not change: one
scheduler, one SPMD step over every device of the mesh.

Sharding rules (mesh axis "tp" of TP devices; leaves in the layout of jpaged/models/weights.py):
  attn/wqkv [L, D, K, G+2, H], bqkv [L, K, G+2, H]   by KV head: each device holds whole query
                                                      groups with their own key and value heads
  attn/wo [L, N*H, D]                      by rows (query heads): partial sums, all-reduced
  mlp/w_gate_up [L, D, 2, F]               by F;   mlp/w_down [L, F, D] by F (rows): all-reduced
  embed/embedding [V, D], lm_head [D, V]   by vocabulary (replicated when TP does not divide V)
  norms, bo                                replicated
  KV cache k, v [L, K, P, S, H]            by KV head: each device holds K/TP heads of every page
Axes are counted from the end, so the rules hold for per-layer leaves too (weights.py).
NOTE: KV head replication (vLLM's rule). When TP > K, each KV head is repeated R = TP/K times:
in wqkv/bqkv, KV head k with its G query heads becomes R KV heads k*R .. k*R+R-1, each with G/R
of those query heads and a copy of k's key and value columns. The model then runs with K' = TP
KV heads and G' = G/R, and query head h still meets its original KV head:
h // G' // R == h // G.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpaged.config import ModelConfig
from jpaged.models import AttentionFns, KVCache

logger = logging.getLogger("jpaged")
AXIS = "tp"
# Sharded leaves: (group, name) -> the axis split over the mesh, counted from the end.
_SHARDED_AXIS = {("attn", "wqkv"): -3, ("attn", "bqkv"): -3, ("attn", "wo"): -2,
                 ("mlp", "w_gate_up"): -1, ("mlp", "w_down"): -2}
_KV_LEAVES = ("wqkv", "bqkv")        # the leaves KV head replication rewrites

try:                                   # JAX >= 0.7 has jax.shard_map (check_vma); older: experimental
    _shard_map = functools.partial(jax.shard_map, check_vma=False)
except AttributeError:                 # pragma: no cover - older JAX
    from jax.experimental.shard_map import shard_map as _old_shard_map
    _shard_map = functools.partial(_old_shard_map, check_rep=False)


def kv_replicas(num_heads: int, num_kv_heads: int, tensor_parallel_size: int) -> int:
    """R, how many copies of each KV head the mesh needs (1 unless TP > K); ValueError naming the
    head counts and the fix when `tensor_parallel_size` cannot split them."""
    tp = tensor_parallel_size
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tp!r}")
    if num_heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {num_heads} query "
                         f"heads (num_attention_heads); choose a divisor of {num_heads}: "
                         f"{_divisors(num_heads)}")
    if num_kv_heads % tp == 0:
        return 1
    if tp % num_kv_heads:
        fits = [d for d in _divisors(num_heads) if d % num_kv_heads == 0 or num_kv_heads % d == 0]
        raise ValueError(f"tensor_parallel_size={tp} neither divides the model's {num_kv_heads} KV "
                         f"heads (num_key_value_heads) nor is a multiple of them, so KV heads can "
                         f"be neither split nor replicated evenly; choose one of {fits}")
    return tp // num_kv_heads


def _divisors(count: int) -> list[int]:
    return [d for d in range(1, count + 1) if count % d == 0]


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A 1-D mesh ("tp",) over the first `tensor_parallel_size` devices (all processes' devices
    under jax.distributed, in jax.devices() order)."""
    devices = list(jax.devices() if devices is None else devices)
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs that many devices, but "
                         f"only {len(devices)} are visible ({devices[0].platform}); lower it, or on "
                         f"CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{tensor_parallel_size} before jax is imported")
    return Mesh(np.array(devices[:tensor_parallel_size]), (AXIS,))


def param_specs(params, config: ModelConfig, tensor_parallel_size: int):
    """The PartitionSpec of every params leaf (a tree like `params`, or like param_shapes(config))."""
    tp = tensor_parallel_size

    def spec(path, leaf) -> PartitionSpec:
        keys = _names(path)
        axes = [None] * len(leaf.shape)
        axis = _SHARDED_AXIS.get(tuple(keys[-2:]))
        if axis is not None and not (keys[-2] == "mlp" and config.intermediate_size % tp):
            axes[axis] = AXIS
        elif keys[-1] in ("embedding", "lm_head") and config.vocab_size % tp == 0:
            axes[0 if keys[-1] == "embedding" else -1] = AXIS
        return PartitionSpec(*axes)
    return jax.tree_util.tree_map_with_path(spec, params)


def _names(path) -> list[str]:
    """The dict keys along a pytree path (tuple indices of split layer weights skipped)."""
    return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, tensor_parallel_size: int) -> tuple[int, ...]:
    """The per-device shape of a `shape` leaf placed with `spec` on a ("tp",) mesh."""
    return tuple(d // tensor_parallel_size if i < len(spec) and spec[i] == AXIS else d
                 for i, d in enumerate(shape))


def replicate_kv_heads(params, replicas: int, num_heads: int, num_kv_heads: int):
    """wqkv, bqkv with each KV head split into `replicas` KV heads (see the NOTE above)."""
    if replicas == 1:
        return params
    group = num_heads // num_kv_heads

    def split(path, leaf):
        keys = _names(path)
        if len(keys) < 2 or keys[-2] != "attn" or keys[-1] not in _KV_LEAVES:
            return leaf
        *lead, k, _, h = leaf.shape                            # [..., K, G+2, H]
        q = leaf[..., :group, :].reshape(*lead, k * replicas, group // replicas, h)
        kv = jnp.repeat(leaf[..., group:, :], replicas, axis=-3)  # [..., K*R, 2, H]
        return jnp.concatenate([q, kv], axis=-2)
    return jax.tree_util.tree_map_with_path(split, params)


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """One model's tensor-parallel layout on a mesh: shard its params, build its sharded cache,
    wrap its attention. `model_config` is the config the model runs with (K' KV heads)."""
    mesh: Mesh
    config: ModelConfig           # the checkpoint's
    replicas: int                 # R copies of each KV head

    @classmethod
    def create(cls, config: ModelConfig, tensor_parallel_size: int | None = None, *,
               mesh: Mesh | None = None) -> "TensorParallel":
        """Over the first `tensor_parallel_size` devices, or over a given 1-D `mesh` (any axis
        name: its devices are used in order)."""
        if mesh is not None:
            if len(mesh.axis_names) != 1:
                raise ValueError(f"mesh has axes {mesh.axis_names}; tensor parallelism needs a 1-D "
                                 f"mesh, e.g. Mesh(np.array(jax.devices()[:N]), ('tp',))")
            tensor_parallel_size = mesh.size
            mesh = Mesh(mesh.devices.reshape(-1), (AXIS,))
        replicas = kv_replicas(config.num_heads, config.num_kv_heads, tensor_parallel_size)
        tp = cls(mesh or make_mesh(tensor_parallel_size), config, replicas)
        for dim, size in (("vocab_size", config.vocab_size),
                          ("intermediate_size", config.intermediate_size)):
            if size % tensor_parallel_size:
                logger.warning("tensor_parallel_size=%d does not divide %s=%d: those weights are "
                               "replicated on every device", tensor_parallel_size, dim, size)
        logger.info("tensor parallel: %d devices (%s), %d query + %d KV heads per device%s",
                    tp.size, tp.mesh.devices.flat[0].platform, config.num_heads // tp.size,
                    tp.model_config.num_kv_heads // tp.size,
                    f", each KV head replicated {replicas}x" if replicas > 1 else "")
        return tp

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def model_config(self) -> ModelConfig:
        return dataclasses.replace(self.config, num_kv_heads=self.config.num_kv_heads * self.replicas)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param_shardings(self, params):
        """NamedShardings for a params tree in the model's layout (KV heads already replicated)."""
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s),
                            param_specs(params, self.config, self.size))

    def checkpoint_shardings(self, shapes):
        """Where to load a checkpoint's params (K KV heads) so that each device reads only its
        shards: the model's shardings, except that KV leaves stay whole when they are to be
        replicated (shard_params then repeats and slices them on device)."""
        specs = param_specs(shapes, self.config, self.size)
        if self.replicas > 1:
            specs = jax.tree_util.tree_map_with_path(
                lambda path, spec: PartitionSpec() if _names(path)[-2:] in (["attn", "wqkv"],
                                                                            ["attn", "bqkv"])
                else spec, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    def shard_params(self, params):
        """The checkpoint's params, KV heads replicated, placed in their shards."""
        params = replicate_kv_heads(params, self.replicas, self.config.num_heads,
                                    self.config.num_kv_heads)
        return place(params, self.param_shardings(params))

    def cache_sharding(self) -> KVCache:
        by_head = NamedSharding(self.mesh, PartitionSpec(None, AXIS))
        return KVCache(by_head, by_head)

    def zeros_cache(self, num_pages: int, page_size: int, dtype) -> KVCache:
        """A zero KV cache [L, K', P, S, H] created in its shards (no full copy on any device)."""
        make = jax.jit(lambda: KVCache.zeros(self.model_config, num_pages, page_size, dtype),
                       out_shardings=self.cache_sharding())
        return make()

    def wrap_attention(self, fns: AttentionFns) -> AttentionFns:
        """The same attention functions, each run per device under shard_map over the heads: q by
        query head, pages by KV head, block tables and lengths replicated; no collective inside."""
        return AttentionFns(self._per_device(fns.paged_attention),
                            self._per_device(fns.ragged_paged_attention))

    def _per_device(self, fn):
        mesh = self.mesh

        def call(q, k_pages, v_pages, *metadata, layer=None, **kwargs):
            if layer is None:                                  # one layer's pages [K, ...]
                def body(q, k_pages, v_pages, *metadata):
                    return fn(q, k_pages, v_pages, *metadata, **kwargs)
                specs, args = (PartitionSpec(None, AXIS), PartitionSpec(AXIS), PartitionSpec(AXIS)), (q, k_pages, v_pages)
            else:                                              # [L, K, ...] read at `layer`
                def body(q, k_pages, v_pages, layer, *metadata):
                    return fn(q, k_pages, v_pages, *metadata, layer=layer, **kwargs)
                specs = (PartitionSpec(None, AXIS), PartitionSpec(None, AXIS), PartitionSpec(None, AXIS), PartitionSpec())
                args = (q, k_pages, v_pages, layer)
            return _shard_map(body, mesh=mesh, in_specs=specs + (PartitionSpec(),) * len(metadata),
                              out_specs=PartitionSpec(None, AXIS))(*args, *metadata)
        return call

    def step_shardings(self, params):
        """(in_shardings, out_shardings) of the engine's step(params, kv_cache, batch): the batch's
        small int32 arrays, the logits and the prompt log-probs replicated, the donated cache kept
        by KV head."""
        cache = self.cache_sharding()
        return (jax.tree.map(lambda a: a.sharding, params), cache, self.replicated), \
            (self.replicated, cache, self.replicated)


def place(tree, shardings):
    """jax.device_put, also onto meshes that span processes (jax.distributed): there each process
    fills its own devices' shards from its host copy of a leaf, which every process holds equal."""
    def put(leaf, sharding):
        if sharding.is_fully_addressable or (isinstance(leaf, jax.Array) and
                                             not leaf.is_fully_addressable):
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree, shardings)


def bytes_per_device(shapes, specs, tensor_parallel_size: int, dtype) -> int:
    """Sum of one device's shard bytes over a tree of shapes and a matching tree of specs."""
    itemsize = jnp.dtype(dtype).itemsize
    leaves = jax.tree.leaves(shapes)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(int(np.prod(shard_shape(tuple(s.shape), spec, tensor_parallel_size))) * itemsize
               for s, spec in zip(leaves, spec_leaves))
