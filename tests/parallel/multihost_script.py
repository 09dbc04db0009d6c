"""One process of a 2-process jax.distributed run on 127.0.0.1, 2 CPU devices each (see
test_tensor_parallel.py). argv: PORT PROCESS_ID MODE, MODE "once" (process 0 generates, prints
RESULT, stops the follower) or "forever" (process 0 generates again and again: the test kills the
follower and expects process 0 to exit with a message).
"""

import json
import sys
import time

port, process_id, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]

import jpaged.distributed as distributed  # noqa: E402

distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import jax  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.models.random_weights import random_checkpoint  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from tp_script import PROMPTS_FOR_MULTIHOST, RANDOM_LLAMA  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
checkpoint = random_checkpoint(RANDOM_LLAMA, dtype="float32", seed=0)   # equal on both processes
checkpoint.params = jax.tree.map(lambda x: x * 15.0, checkpoint.params)
llm = LLM.from_checkpoint(checkpoint, tensor_parallel_size=4, num_pages=64, page_size=4,
                          max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64,
                          enable_prefix_caching=False)
engine = llm.llm_engine
shards = [list(s.data.shape) for s in engine.runner.kv_cache.k.addressable_shards]
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
prompts = [{"prompt_token_ids": p} for p in PROMPTS_FOR_MULTIHOST]
try:
    if process_id != 0:
        print(f"FOLLOWER kv shards {json.dumps(shards)}", flush=True)
        engine.run_follower()
        print("FOLLOWER STOPPED", flush=True)
    else:
        while True:
            outs = llm.generate(prompts, params, use_tqdm=False)
            print("RESULT " + json.dumps({"tokens": [o.outputs[0].token_ids for o in outs],
                                          "kv_shards": shards}), flush=True)
            if mode == "once":
                engine.stop_followers()
                break
            time.sleep(0.2)
except Exception as exc:  # a peer died: say so and exit, never hang
    distributed.exit_on_peer_failure(exc)
