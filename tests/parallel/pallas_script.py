"""Run in a subprocess with 4 forced CPU devices (see test_tensor_parallel.py): the Pallas Triton
kernels (interpret mode) wrapped by TensorParallel.wrap_attention, i.e. under shard_map with q split
by query head and the [L, K, P, S, H] pages by KV head, against the unsharded reference.
Prints "RESULT {json}".
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

import jpaged_kernels
from jpaged.config import ModelConfig
from jpaged.models import AttentionFns, reference_attention
from jpaged.parallel import TensorParallel

config = ModelConfig("llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                     num_heads=8, num_kv_heads=4, head_dim=16)
tp = TensorParallel.create(config, 4)
wrapped = tp.wrap_attention(AttentionFns(
    functools.partial(jpaged_kernels.paged_attention, interpret=True),
    functools.partial(jpaged_kernels.ragged_paged_attention, interpret=True)))
rng = np.random.default_rng(0)
pages = [jax.device_put(jnp.asarray(rng.standard_normal((2, 4, 9, 16, 16)), jnp.float32),
                        tp.cache_sharding().k) for _ in range(2)]
block_tables = jnp.asarray([[1, 3, 5, 0], [2, 4, 6, 7]], jnp.int32)
context_lens = jnp.asarray([37, 64], jnp.int32)
query_start_loc = jnp.asarray([0, 3, 4], jnp.int32)          # a 3-token chunk and a decode
q_decode = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
q_ragged = jnp.asarray(rng.standard_normal((4, 8, 16)), jnp.float32)
layer = jnp.int32(1)
cases = {
    "paged_attention": lambda f: f.paged_attention(q_decode, *pages, block_tables, context_lens,
                                                   layer=layer),
    "ragged_paged_attention": lambda f: f.ragged_paged_attention(
        q_ragged, *pages, block_tables, context_lens, query_start_loc, layer=layer),
}
result = {}
for name, call in cases.items():
    got = jax.jit(lambda: call(wrapped))()
    want = call(reference_attention())
    jaxpr = str(jax.make_jaxpr(lambda: call(wrapped))())
    result[name] = {"err": float(jnp.max(jnp.abs(got - want))),
                    "shard_map": "shard_map" in jaxpr, "pallas_call": "pallas_call" in jaxpr,
                    "out_shards": [list(s.data.shape) for s in got.addressable_shards]}
print("RESULT " + json.dumps(result), flush=True)
