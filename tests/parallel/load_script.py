"""Run in a subprocess with 4 forced CPU devices (see test_tensor_parallel.py).

argv[1]: a converted jpaged checkpoint. `jpaged.load(path, mesh=mesh)` restores it straight into
its shards; `jpaged.generate` then runs on them and must give the unsharded tokens. Prints
"RESULT {json}".
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh

import jpaged
from jpaged.checkpoint.loader import load_checkpoint
from jpaged.generation import generate

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("model",))       # any 1-D mesh; its axis is renamed "tp"
restored = load_checkpoint(sys.argv[1], mesh=mesh).params   # the checkpoint layout, in shards
model, params, _ = jpaged.load(sys.argv[1], mesh=mesh)
plain_model, plain_params, _ = jpaged.load(sys.argv[1])
gen = jax.jit(generate, static_argnames=("model", "max_new_tokens", "page_size"))
tokens = np.asarray([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]], np.int32)
lengths = np.asarray([5, 3], np.int32)
args = dict(max_new_tokens=6, rng=jax.random.key(0), page_size=4)
sharded = gen(model, params, tokens, lengths, **args)
plain = gen(plain_model, plain_params, tokens, lengths, **args)
attn = params["layers"]["attn"]
print("RESULT " + json.dumps({
    "sharded": sharded.tokens.tolist(), "plain": plain.tokens.tolist(),
    "logprob_err": float(np.max(np.abs(np.asarray(sharded.logprobs) - np.asarray(plain.logprobs)))),
    "restored_wo": [list(s.data.shape) for s in restored["layers"]["attn"]["wo"].addressable_shards],
    "restored_wo_spec": list(restored["layers"]["attn"]["wo"].sharding.spec),
    "restored_wqkv_spec": list(restored["layers"]["attn"]["wqkv"].sharding.spec),
    "wqkv": [list(s.data.shape) for s in attn["wqkv"].addressable_shards],
    "wo": [list(s.data.shape) for s in attn["wo"].addressable_shards],
    "num_kv_heads": model.config.num_kv_heads}), flush=True)
