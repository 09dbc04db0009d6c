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
  norms (also attn/q_norm, k_norm), bo     replicated
  moe/router [Lm, D, E]                    replicated
  moe/w_gate_up [Lm, E, D, 2, Fe], moe/w_down [Lm, E, Fe, D]
                                           expert parallel (enable_expert_parallel): by E, each
                                           device holds E/TP whole experts; else by Fe
  KV cache k, v [L, K, P, S, H]            by KV head: each device holds K/TP heads of every page
Axes are counted from the end, so the rules hold for per-layer leaves too (weights.py).
NOTE: experts. The MoE block runs per device under shard_map (`moe_fn`): every device routes every
token (the router is replicated), runs the routed rows through the experts it holds (expert
parallel: the rows of its own E/TP experts; else all rows through its Fe/TP slice of every
expert), and one psum per MoE layer adds the partial outputs, the same all-reduce a dense MLP's
down projection makes. A traced per-layer window, and attention sinks (by query head), enter the
attention's shard_map as arguments.
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
from jpaged.models.kv_cache import float8_pages

logger = logging.getLogger("jpaged")
AXIS = "tp"
# Sharded leaves: (group, name) -> the axis split over the mesh, counted from the end.
_SHARDED_AXIS = {("attn", "wqkv"): -3, ("attn", "bqkv"): -3, ("attn", "wo"): -2,
                 ("mlp", "w_gate_up"): -1, ("mlp", "w_down"): -2}
# Expert leaves: (group, name) -> (axis of E, axis of Fe), counted from the end.
_EXPERT_AXES = {("moe", "w_gate_up"): (-4, -1), ("moe", "w_down"): (-3, -2)}
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


def check_experts(config: ModelConfig, tensor_parallel_size: int, expert_parallel: bool) -> None:
    """ValueError naming the sizes when the experts cannot be split evenly over the mesh."""
    if not config.is_moe or tensor_parallel_size == 1:
        return
    count, what = ((config.num_experts, "experts (num_experts)") if expert_parallel else
                   (config.moe_intermediate_size, "expert MLP width (moe_intermediate_size)"))
    if count % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not divide the model's "
                         f"{count} {what}; choose a divisor of {count}"
                         + ("" if expert_parallel else " or set enable_expert_parallel=True"))


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


def param_specs(params, config: ModelConfig, tensor_parallel_size: int,
                expert_parallel: bool = False):
    """The PartitionSpec of every params leaf (a tree like `params`, or like param_shapes(config));
    `expert_parallel`: expert leaves split by expert instead of by Fe."""
    tp = tensor_parallel_size

    def spec(path, leaf) -> PartitionSpec:
        keys = _names(path)
        ndim = len(leaf.shape)
        axes = [None] * ndim
        axis = _SHARDED_AXIS.get(tuple(keys[-2:]))
        if tuple(keys[-2:]) in _EXPERT_AXES:
            axis = _EXPERT_AXES[tuple(keys[-2:])][0 if expert_parallel else 1]
        if axis is not None and not (keys[-2] == "mlp" and config.intermediate_size % tp):
            axes[_quantized_axis(path, keys, axis, ndim)] = AXIS
        elif keys[-1] in ("embedding", "lm_head") and config.vocab_size % tp == 0:
            axes[_quantized_axis(path, keys, 0 if keys[-1] == "embedding" else -1, ndim)] = AXIS
        # NOTE: a quantized weight's per-channel scales have a group axis of 1 where its values
        # are split by input (wo, w_down): such a field stays whole on every device (XLA's
        # partitioner keeps the dequantization exact either way)
        axes = [a if a is None or leaf.shape[i] % tp == 0 else None for i, a in enumerate(axes)]
        return PartitionSpec(*axes)
    return jax.tree_util.tree_map_with_path(spec, params)


def _is_quantized_field(path) -> bool:
    """A path into a QuantizedWeight (jpaged_kernels/quantization.py): values, scales or mins."""
    return bool(path) and isinstance(path[-1], jax.tree_util.GetAttrKey)


def _quantized_axis(path, keys: list[str], axis: int, ndim: int) -> int:
    """Where the float layout's `axis` sits in a QuantizedWeight field: the float layout with its
    input axis moved last (jpaged/models/weights.py)."""
    if not _is_quantized_field(path):
        return axis
    from jpaged.models.weights import INPUT_AXIS
    key = ("lm_head",) if keys[-1] == "lm_head" else tuple(keys[-2:])
    lead = 1 if keys[0] == "layers" else 0
    position, source = axis % ndim, lead + INPUT_AXIS[key]
    if position == source:
        return ndim - 1
    return position - 1 if position > source else position


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
        if _is_quantized_field(path):      # [..., K, G+2, H, in]: the same on the axes before
            return jnp.moveaxis(split(path[:-1], jnp.moveaxis(leaf, -1, 0)), 0, -1)
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
    expert_parallel: bool = False  # experts split by expert (vLLM's enable_expert_parallel)

    @classmethod
    def create(cls, config: ModelConfig, tensor_parallel_size: int | None = None, *,
               mesh: Mesh | None = None, expert_parallel: bool = False) -> "TensorParallel":
        """Over the first `tensor_parallel_size` devices, or over a given 1-D `mesh` (any axis
        name: its devices are used in order). `expert_parallel`: an MoE model's experts are
        split whole over the devices (else each expert's MLP width is)."""
        if mesh is not None:
            if len(mesh.axis_names) != 1:
                raise ValueError(f"mesh has axes {mesh.axis_names}; tensor parallelism needs a 1-D "
                                 f"mesh, e.g. Mesh(np.array(jax.devices()[:N]), ('tp',))")
            tensor_parallel_size = mesh.size
            mesh = Mesh(mesh.devices.reshape(-1), (AXIS,))
        replicas = kv_replicas(config.num_heads, config.num_kv_heads, tensor_parallel_size)
        check_experts(config, tensor_parallel_size, expert_parallel)
        tp = cls(mesh or make_mesh(tensor_parallel_size), config, replicas, expert_parallel)
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
                            param_specs(params, self.config, self.size, self.expert_parallel))

    def checkpoint_shardings(self, shapes):
        """Where to load a checkpoint's params (K KV heads) so that each device reads only its
        shards: the model's shardings, except that KV leaves stay whole when they are to be
        replicated (shard_params then repeats and slices them on device)."""
        specs = param_specs(shapes, self.config, self.size, self.expert_parallel)
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

    def cache_sharding(self, kv_cache_dtype: str = "auto") -> KVCache:
        """By KV head: the pages [L, K', P, S, H], and a quantized cache's scales [L, K', P, S]."""
        by_head = NamedSharding(self.mesh, PartitionSpec(None, AXIS))
        if kv_cache_dtype == "auto":
            return KVCache(by_head, by_head)
        return KVCache(by_head, by_head, by_head, by_head, float8_pages(kv_cache_dtype))

    def zeros_cache(self, num_pages: int, page_size: int, dtype,
                    kv_cache_dtype: str = "auto") -> KVCache:
        """A zero KV cache [L, K', P, S, H] created in its shards (no full copy on any device)."""
        make = jax.jit(lambda: KVCache.zeros(self.model_config, num_pages, page_size, dtype,
                                             kv_cache_dtype),
                       out_shardings=self.cache_sharding(kv_cache_dtype))
        return make()

    def wrap_attention(self, fns: AttentionFns) -> AttentionFns:
        """The same attention functions, each run per device under shard_map over the heads: q by
        query head, pages by KV head, block tables and lengths replicated; no collective inside."""
        return AttentionFns(self._per_device(fns.paged_attention),
                            self._per_device(fns.ragged_paged_attention))

    def _per_device(self, fn):
        mesh = self.mesh

        def call(q, k_pages, v_pages, *metadata, layer=None, **kwargs):
            # Python options (scale, soft_cap, a constant window) stay static; arrays (the layer,
            # a traced window, sinks [N] split by query head like q) go in as arguments.
            if layer is not None:
                kwargs["layer"] = layer
            arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
            static = {k: v for k, v in kwargs.items() if k not in arrays}
            names = list(arrays)
            pages = PartitionSpec(AXIS) if layer is None else PartitionSpec(None, AXIS)
            specs = (PartitionSpec(None, AXIS), pages, pages) + tuple(
                PartitionSpec(AXIS) if k == "sinks" else
                pages if k in ("k_scale", "v_scale") else PartitionSpec() for k in names)

            def body(q, k_pages, v_pages, *rest):
                options = dict(zip(names, rest[:len(names)]))
                return fn(q, k_pages, v_pages, *rest[len(names):], **static, **options)
            return _shard_map(body, mesh=mesh, in_specs=specs + (PartitionSpec(),) * len(metadata),
                              out_specs=PartitionSpec(None, AXIS))(q, k_pages, v_pages,
                                                                    *arrays.values(), *metadata)
        return call

    def moe_fn(self, impl: str = "auto"):
        """The model's MoE block (decoder.moe_block) run per device under shard_map, its expert
        leaves in their shards, the router and the tokens replicated; one psum of the partial
        outputs (see the NOTE on experts)."""
        from jpaged.models.decoder import moe_block
        from jpaged.models.weights import LayerWeights
        mesh, size, expert_parallel = self.mesh, self.size, self.expert_parallel

        def call(w, x, config):
            leaves = w.weights["moe"]
            specs = param_specs({"layers": {"moe": leaves}}, config, size,
                                expert_parallel)["layers"]["moe"]
            local = config.num_experts // size if expert_parallel else None

            def body(leaves, layer, x):
                first = jax.lax.axis_index(AXIS) * local if expert_parallel else 0
                y = moe_block(LayerWeights({"moe": leaves}, layer), x, config, impl=impl,
                              num_local_experts=local, first_expert=first)
                return jax.lax.psum(y, AXIS)
            return _shard_map(body, mesh=mesh, in_specs=(specs, PartitionSpec(), PartitionSpec()),
                              out_specs=PartitionSpec())(leaves, w.layer, x)
        return call

    def step_shardings(self, params, kv_cache_dtype: str = "auto"):
        """(in_shardings, out_shardings) of the engine's step(params, kv_cache, batch, lora): the
        batch's small int32 arrays, the logits and the prompt log-probs replicated, the donated
        cache kept by KV head (LoRA is refused under tensor parallelism: its argument is None)."""
        cache = self.cache_sharding(kv_cache_dtype)
        return (jax.tree.map(lambda a: a.sharding, params), cache, self.replicated,
                self.replicated), (self.replicated, cache, self.replicated)


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
