"""The grouped matmul and the MoE block (jpaged/models/moe.py, decoder.moe_block): the segment and
ragged_dot implementations equal a NumPy product per group (empty groups, one group holding every
row, rows of other devices' experts left out), and the MoE block equals the dense formulation
(every token through every expert) in both placements of the layer stack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.config import ModelConfig
from jpaged.models import CausalLM, LayerWeights, arrange_layers
from jpaged.models.decoder import layer_param_specs, moe_block
from jpaged.models.moe import dispatch, grouped_matmul, route, segment_matmul


def numpy_grouped(x, w, sizes):
    out, start = np.zeros((x.shape[0], w.shape[2]), np.float64), 0
    for g, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


SIZES = [[3, 0, 10, 5], [18, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1],
         [2, 0, 3, 1]]                          # the last: 12 rows in no group (other devices')


@pytest.mark.parametrize("impl", ["segment", "ragged_dot"])
def test_grouped_matmul_equals_a_product_per_group(impl):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((18, 8)), rng.standard_normal((4, 8, 6))
    xj, wj = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    grouped = jax.jit(lambda x, w, s: grouped_matmul(          # group sizes are data: one trace
        x, s, lambda rows, g: rows @ w[g], lambda: w, out_shape=(6,), impl=impl))
    small = jax.jit(lambda x, w, s: segment_matmul(x, s, lambda rows, g: rows @ w[g], block=2))
    for sizes in SIZES:
        want = numpy_grouped(x, w, sizes)
        np.testing.assert_allclose(np.asarray(grouped(xj, wj, jnp.asarray(sizes))), want,
                                   atol=1e-5)
        if impl == "segment":                   # blocks of 2 rows: blocks cross group ends
            np.testing.assert_allclose(np.asarray(small(xj, wj, jnp.asarray(sizes))), want,
                                       atol=1e-5)


def test_dispatch_sorts_by_expert_and_drops_other_devices_experts():
    experts = jnp.asarray([[3, 1], [0, 3], [2, 1]], jnp.int32)           # T = 3, k = 2
    weights = jnp.asarray([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]], jnp.float32)
    d = dispatch(weights, experts, num_local_experts=2, first_expert=2)   # experts 2, 3 here
    assert d.group_sizes.tolist() == [1, 2]
    assert d.token[:3].tolist() == [2, 0, 1]                  # expert 2: token 2; 3: tokens 0, 1
    np.testing.assert_allclose(np.asarray(d.weight), [0.5, 0.6, 0.3, 0, 0, 0])
    w, e = route(jnp.asarray([[0.0, 2.0, 1.0]]), 2, normalize=True)
    assert e.tolist() == [[1, 2]] and abs(float(w.sum()) - 1.0) < 1e-6


CONFIG = ModelConfig("qwen3_moe", vocab_size=32, hidden_size=16, intermediate_size=24,
                     num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, num_experts=8,
                     num_experts_per_tok=3, moe_intermediate_size=12, norm_topk_prob=False,
                     moe_layers=(0, 2))


@pytest.mark.parametrize("per_layer", [False, True])
def test_moe_block_equals_the_dense_formulation(per_layer):
    specs = layer_param_specs(CONFIG)
    keys = iter(jax.random.split(jax.random.key(0), 8))
    moe = {name: 0.5 * jax.random.normal(next(keys), shape)
           for name, (shape, _) in specs["moe"].items()}
    layers = arrange_layers({"layers": {"moe": moe}}, per_layer=per_layer)["layers"]
    assert isinstance(layers["moe"]["w_gate_up"], tuple) == per_layer
    x = jax.random.normal(next(keys), (10, 16))
    for index in (0, 1):                        # the MoE layers' stack: layers 0 and 2
        w = LayerWeights(layers, jnp.int32(index))
        grouped = jax.jit(lambda x: moe_block(w, x, CONFIG, impl="segment"))(x)
        dense = moe_block(w, x, CONFIG, impl="dense")
        np.testing.assert_allclose(np.asarray(grouped), np.asarray(dense), atol=1e-5, rtol=1e-5)
        assert float(jnp.abs(dense).max()) > 0.1
    with pytest.raises(ValueError, match="moe_impl must be one of"):
        CausalLM(CONFIG, moe_impl="everything").init(jax.random.key(0), *_tiny_inputs())


def _tiny_inputs():
    from jpaged.models import AttentionMetadata, KVCache
    one = jnp.zeros((1,), jnp.int32)
    return (one, one, KVCache.zeros(CONFIG, 2, 1, jnp.float32),
            AttentionMetadata(jnp.ones((1, 1), jnp.int32), one, one + 1, jnp.array([0, 1])))
