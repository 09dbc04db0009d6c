"""JAX's persistent compilation cache as the engine turns it on: a second process loads the step
and sampler executables from disk instead of compiling them, and makes the same tokens.

Each run is a fresh process (JAX's in-memory caches would hide the disk cache otherwise); the suite
itself runs with the cache off (tests/conftest.py), these processes get a temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN = """
import json, sys
import jax
from jpaged import LLM, SamplingParams

events = {"compiles": 0, "hits": 0, "misses": 0}
def on_duration(event, duration, **kwargs):   # NOTE: JAX reports a cache hit as a compile too
    events["compiles"] += event == "/jax/core/compile/backend_compile_duration"
def on_event(event, **kwargs):
    events["hits"] += event == "/jax/compilation_cache/cache_hits"
    events["misses"] += event == "/jax/compilation_cache/cache_misses"

llm = LLM(sys.argv[1], num_pages=64, max_model_len=128, max_num_seqs=4,
          max_num_batched_tokens=64, **({} if sys.argv[2] == "-" else dict(compilation_cache_dir=sys.argv[2])))
jax.monitoring.register_event_duration_secs_listener(on_duration)   # from the engine's start on
jax.monitoring.register_event_listener(on_event)
out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": [3, 4]}],
                   SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
print(json.dumps(dict(events, tokens=[o.outputs[0].token_ids for o in out],
                      cache_dir=jax.config.jax_compilation_cache_dir,
                      buckets=llm.stats().num_compilations)))
"""


def run(model_dir, cache_arg: str, **env) -> dict:
    result = subprocess.run([sys.executable, "-c", RUN, str(model_dir), cache_arg], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, **env))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_loads_compiled_steps(tiny_llama_dir, tmp_path):
    cache = tmp_path / "xla"
    cold = run(tiny_llama_dir, str(cache))
    assert cold["cache_dir"] == str(cache) and cold["hits"] == 0
    assert cold["misses"] == cold["compiles"] >= cold["buckets"] == 3     # 2 step buckets, 1 sampler
    assert any(p.name.startswith("jit_step-") for p in cache.iterdir())
    assert any(p.name.startswith("jit__sample_traced-") for p in cache.iterdir())
    warm = run(tiny_llama_dir, str(cache))
    assert warm["misses"] == 0                          # every step and sampler variant from disk
    assert warm["hits"] == warm["compiles"] == cold["compiles"]
    assert warm["tokens"] == cold["tokens"]


def test_off_and_environment(tiny_llama_dir, tmp_path):
    off = run(tiny_llama_dir, "off", JPAGED_COMPILATION_CACHE_DIR=str(tmp_path / "unused"))
    assert off["cache_dir"] is None and off["hits"] == off["misses"] == 0
    assert not (tmp_path / "unused").exists()
    from_env = run(tiny_llama_dir, "-", JPAGED_COMPILATION_CACHE_DIR=str(tmp_path / "env"))
    assert from_env["cache_dir"] == str(tmp_path / "env")
    assert from_env["tokens"] == off["tokens"]
