"""Tensor parallelism on a virtual 8-device CPU mesh: tokens equal across mesh sizes, each device
holding 1/N of the sharded weights and KV pages, one all-reduce after attention and one after the
MLP, and clear errors for head counts N cannot split.

The multi-device runs happen in subprocesses (tp_script.py beside this file): the device count must
be forced before jax is imported, and this pytest process keeps its single device.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jpaged.config import ModelConfig
from jpaged.parallel import kv_replicas, param_specs, shard_shape
from jpaged.checkpoint.params import param_shapes

SCRIPT = Path(__file__).with_name("tp_script.py")
CAPACITY = Path(__file__).resolve().parents[2] / "benchmarks" / "capacity.py"
RANDOM_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=128,
                    intermediate_size=256, num_hidden_layers=2, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=8, rms_norm_eps=1e-5,
                    max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=1)



def with_devices(count: int) -> str:
    """XLA_FLAGS for a subprocess with `count` CPU devices, keeping the suite's own flags."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"

def paper_capacity(tmp_path, overrides: dict, devices: int) -> dict:
    """benchmarks/capacity.py --json for the random Llama's config (float32, pages of 4)."""
    spec = importlib.util.spec_from_file_location("capacity", CAPACITY)
    capacity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capacity)
    path = tmp_path / f"config_{devices}.json"
    path.write_text(json.dumps({**RANDOM_LLAMA, **overrides}))
    config = capacity.load_config(str(path))
    return capacity.capacity(config, devices, "float32", memory_gib=1.0, page_size=4)


def assert_capacity_matches_engine(paper: dict, engine: dict) -> None:
    """The paper figures equal what device 0 of the engine's mesh really holds."""
    assert paper["weight_bytes_per_device"] == engine["param_bytes_device0"]
    assert paper["kv_bytes_per_page_per_device"] == engine["kv_page_bytes_device0"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [200, 3]]


def run_mesh(job: dict, timeout: int = 900) -> dict:
    env = dict(os.environ, XLA_FLAGS=with_devices(8),
               JAX_PLATFORMS="cpu", JPAGED_COMPILATION_CACHE_DIR="off", JPAGED_MODEL_CACHE_DIR="off")
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(job)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return {int(k): v for k, v in json.loads(lines[-1][len("RESULT "):]).items()}


def assert_sharded(result: dict, size: int, sharded_axis: dict[str, int | None]) -> None:
    """Each device holds exactly 1/size of every sharded leaf along its axis, and all of the rest."""
    for name, axis in sharded_axis.items():
        full, shards = result["shapes"][name], result["shards"][name]
        want = [d // size if i == axis else d for i, d in enumerate(full)]
        assert shards == [want] * size, (name, size, shards)


def test_kv_replicas_follow_vllms_rule_and_bad_sizes_name_both_numbers():
    assert kv_replicas(32, 8, 4) == 1 and kv_replicas(32, 8, 8) == 1
    assert kv_replicas(9, 3, 3) == 1
    assert kv_replicas(8, 2, 4) == 2 and kv_replicas(9, 3, 9) == 3     # N > K: replicate
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the model's 32 "
                                         r"query heads.*divisor of 32: \[1, 2, 4, 8, 16, 32\]"):
        kv_replicas(32, 8, 3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=6 neither divides the model's 4 KV "
                                         r"heads.*nor is a multiple"):
        kv_replicas(12, 4, 6)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1, got 0"):
        kv_replicas(8, 8, 0)


def test_param_specs_are_megatron_style():
    config = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
    shapes = param_shapes(config)
    specs = param_specs(shapes, config, 2)
    per_device = {path: shard_shape(tuple(shapes_leaf.shape), spec, 2) for path, shapes_leaf, spec in [
        ("wqkv", shapes["layers"]["attn"]["wqkv"], specs["layers"]["attn"]["wqkv"]),
        ("wo", shapes["layers"]["attn"]["wo"], specs["layers"]["attn"]["wo"]),
        ("w_gate_up", shapes["layers"]["mlp"]["w_gate_up"], specs["layers"]["mlp"]["w_gate_up"]),
        ("w_down", shapes["layers"]["mlp"]["w_down"], specs["layers"]["mlp"]["w_down"]),
        ("embedding", shapes["embed"]["embedding"], specs["embed"]["embedding"]),
        ("lm_head", shapes["lm_head"], specs["lm_head"]),
        ("norm", shapes["norm"]["scale"], specs["norm"]["scale"])]}
    # wqkv [L, D, K, G+2, H] by KV head (each device: 1 KV head with its 2 query heads), wo
    # [L, N*H, D] by rows, w_gate_up [L, D, 2, F] and w_down [L, F, D] by F, vocabulary for the rest
    assert per_device == {"wqkv": (2, 32, 1, 4, 8), "wo": (2, 16, 32), "w_gate_up": (2, 32, 2, 24),
                          "w_down": (2, 24, 32), "embedding": (32, 32), "lm_head": (32, 32),
                          "norm": (32,)}
    odd = ModelConfig("llama", vocab_size=63, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    assert tuple(param_specs(param_shapes(odd), odd, 2)["embed"]["embedding"]) == (None, None)


def test_random_llama_32q_8kv_same_greedy_tokens_for_tp_1_2_4_8(tmp_path):
    result = run_mesh({"model": "random", "sizes": [1, 2, 4, 8, 3], "prompts": PROMPTS,
                       "max_tokens": 6})
    base = result[1]
    for size in (2, 4, 8):
        got = result[size]
        assert got["tokens"] == base["tokens"], size
        assert got["forks"] == base["forks"], size              # sampling, forks, copy-on-write
        assert got["after_update"] == base["tokens"] and got["compiled_by_update"] == 0
        assert got["kv_cache_spec"] == [[None, "tp"]]           # still by KV head after it all
        np.testing.assert_allclose(got["logprobs"], base["logprobs"], atol=1e-4)
        assert_sharded(got, size, {"wqkv": 2, "wo": 1, "w_gate_up": 3, "w_down": 1, "embed": 0,
                                   "kv_cache_k": 1})
        # XLA inserts exactly: the vocab-sharded embedding lookup's sum, one all-reduce after
        # attention's output projection, one after the MLP (both [T, D]), the logits' all-gather.
        decode = got["collectives"]["decode"]
        assert [c.split()[0] for c in decode].count("all-reduce") == 3, decode
        assert [c.split()[0] for c in decode].count("all-gather") == 1, decode
        assert_capacity_matches_engine(paper_capacity(tmp_path, {}, size), got)
    assert_sharded(base, 1, {"embed": None, "kv_cache_k": None})
    assert result[3] == {"error": "tensor_parallel_size=3 does not divide the model's 32 query heads "
                                  "(num_attention_heads); choose a divisor of 32: "
                                  "[1, 2, 4, 8, 16, 32]"}


@pytest.mark.parametrize("llm", [dict(quantization="int8", kv_cache_dtype="int8"),
                                 dict(quantization="int4", kv_cache_dtype="fp8")])
def test_quantized_weights_and_kv_cache_shard_with_their_scales(llm):
    """Quantized matmul weights (values, scales and mins sharded like the float weight) and a
    quantized KV cache (pages and per-token scales by KV head): the same greedy tokens for
    tensor_parallel_size 1, 2 and 4, each device holding 1/N of the KV pages."""
    result = run_mesh({"model": "random", "sizes": [1, 2, 4], "prompts": PROMPTS, "max_tokens": 8,
                       "llm": llm})
    for size in (2, 4):
        assert result[size]["tokens"] == result[1]["tokens"], (llm, size)
        assert result[size]["after_update"] == result[1]["tokens"]
        assert_sharded(result[size], size, {"kv_cache_k": 1})


def test_kv_heads_are_replicated_when_tp_exceeds_them(tmp_path):
    # 8 query heads, 2 KV heads on 4 devices: each KV head twice, one per device with its 2 queries.
    result = run_mesh({"model": "random", "sizes": [1, 4], "prompts": PROMPTS[:2], "max_tokens": 5,
                       "config": {"num_attention_heads": 8, "num_key_value_heads": 2,
                                  "head_dim": 16}})
    assert result[4]["tokens"] == result[1]["tokens"]
    np.testing.assert_allclose(result[4]["logprobs"], result[1]["logprobs"], atol=1e-4)
    assert result[1]["shapes"]["kv_cache_k"][1] == 2 and result[4]["shapes"]["kv_cache_k"][1] == 4
    # wqkv [L, D, K'=4, G'+2=4, H]: one (replicated) KV head and its 2 query heads per device
    assert result[4]["shards"]["wqkv"] == [[2, 128, 1, 4, 16]] * 4
    assert result[4]["shards"]["kv_cache_k"] == [[2, 1, 64, 4, 16]] * 4
    overrides = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16}
    paper = paper_capacity(tmp_path, overrides, 4)
    assert paper["kv_head_replicas"] == 2 and paper["kv_heads_per_device"] == 1
    assert_capacity_matches_engine(paper, result[4])


def test_smollm2_tp3_equals_tp1(smollm2_path):
    # 9 query heads and 3 KV heads: 3 query heads and 1 KV head per device.
    result = run_mesh({"model": str(smollm2_path), "sizes": [1, 3], "max_tokens": 8,
                       "prompts": [[1, 504, 3458, 282, 4649, 314], [1, 9690, 198, 2683]]})
    assert result[3]["tokens"] == result[1]["tokens"]
    np.testing.assert_allclose(result[3]["logprobs"], result[1]["logprobs"], atol=1e-4)
    assert result[3]["shards"]["kv_cache_k"] == [[30, 1, 64, 4, 64]] * 3
    assert_sharded(result[3], 3, {"wqkv": 2, "wo": 1, "w_gate_up": 3, "w_down": 1, "embed": 0})


def test_capacity_of_llama_3_70b_on_8_h100s_from_its_config():
    result = subprocess.run([sys.executable, str(CAPACITY), str(CAPACITY.parent / "configs" /
                             "llama-3-70b.json"), "--devices", "8", "--dtype", "bfloat16",
                             "--memory-gib", "80", "--json"], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    c = json.loads(result.stdout)
    assert c["params"] == 70_553_706_496
    assert c["weight_bytes_per_device"] * 8 == pytest.approx(c["weight_bytes_total"], rel=1e-3)
    assert c["kv_bytes_per_token_per_device"] == 2 * 80 * 1 * 128 * 2      # 1 of 8 KV heads
    assert c["tokens_that_fit"] == c["pages_that_fit"] * 16
    assert c["tokens_that_fit"] * c["kv_bytes_per_token_per_device"] <= \
        80 * 2**30 * 0.9 - c["weight_bytes_per_device"]
    bad = subprocess.run([sys.executable, str(CAPACITY), str(CAPACITY.parent / "configs" /
                          "llama-3-70b.json"), "--devices", "3"], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert bad.returncode == 2
    assert "tensor_parallel_size=3 does not divide the model's 64 query heads" in bad.stderr


def test_load_with_mesh_restores_into_shards_and_generate_gives_the_same_tokens(tiny_llama_dir,
                                                                               tmp_path):
    # tiny Llama: 4 query heads, 2 KV heads, on 4 devices: each KV head replicated twice.
    from jpaged.checkpoint.convert import convert
    out = convert(tiny_llama_dir, tmp_path / "ckpt", dtype="float32", progress=False)
    env = dict(os.environ, XLA_FLAGS=with_devices(4),
               JAX_PLATFORMS="cpu", JPAGED_COMPILATION_CACHE_DIR="off")
    proc = subprocess.run([sys.executable, str(SCRIPT.with_name("load_script.py")), str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["sharded"] == r["plain"]
    assert r["logprob_err"] < 1e-4
    # Orbax restored each device's quarter of wo; wqkv (its KV heads to be replicated) whole, then
    # split on device: [L, D, K'=4, G'+2=3, H], one KV head with its one query head per device.
    assert r["restored_wo"] == [[2, 16, 64]] * 4
    assert r["restored_wo_spec"] == [None, "tp", None]
    assert r["restored_wqkv_spec"] == []
    assert r["wqkv"] == [[2, 64, 1, 3, 16]] * 4 and r["wo"] == [[2, 16, 64]] * 4
    assert r["num_kv_heads"] == 4


# --- two processes on 127.0.0.1 (jax.distributed, CPU collectives), 2 devices each, N = 4 ---------

def start_two_processes(mode: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    import socket
    with socket.socket() as s:                      # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS=with_devices(2),
               JAX_PLATFORMS="cpu", JPAGED_COMPILATION_CACHE_DIR="off", PYTHONUNBUFFERED="1")
    script = str(SCRIPT.with_name("multihost_script.py"))
    return tuple(subprocess.Popen([sys.executable, script, port, str(i), mode], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in (0, 1))


def single_device_tokens(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    import jax
    from jpaged import LLM, SamplingParams
    from jpaged.models.random_weights import random_checkpoint
    checkpoint = random_checkpoint(RANDOM_LLAMA, dtype="float32", seed=0)
    checkpoint.params = jax.tree.map(lambda x: x * 15.0, checkpoint.params)   # as multihost_script
    llm = LLM.from_checkpoint(checkpoint, num_pages=64, page_size=4, max_model_len=64,
                              max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_two_processes_tp4_give_the_single_device_tokens_and_stop_cleanly():
    leader, follower = start_two_processes("once")
    try:
        out0, err0 = leader.communicate(timeout=600)
        out1, err1 = follower.communicate(timeout=60)
    finally:
        for p in (leader, follower):
            p.kill()
    assert leader.returncode == 0, err0[-3000:]
    assert follower.returncode == 0 and "FOLLOWER STOPPED" in out1, err1[-3000:]
    result = json.loads(next(l for l in out0.splitlines() if l.startswith("RESULT "))[7:])
    assert result["kv_shards"] == [[2, 2, 64, 4, 8]] * 2      # 8 KV heads / 4 devices, 2 local
    assert result["tokens"] == single_device_tokens([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], 6)


def test_killing_one_process_makes_the_other_exit_with_a_message():
    import time
    leader, follower = start_two_processes("forever")
    try:
        for line in leader.stdout:                   # process 0 has generated across both
            if line.startswith("RESULT "):
                break
        follower.kill()
        start = time.monotonic()
        _, err = leader.communicate(timeout=120)     # no hang
        elapsed = time.monotonic() - start
    finally:
        for p in (leader, follower):
            p.kill()
    assert leader.returncode == 1, err[-3000:]
    assert "jpaged: process 0 of 2: a step of the multi-process engine failed, most likely a " \
           "collective with a peer process that has died or is unreachable" in err, err[-3000:]
    assert elapsed < 60


def test_serve_flags_and_a_too_large_mesh_give_clear_errors():
    import argparse

    from jpaged import LLM
    from jpaged.entrypoints.openai.run import add_serve_arguments
    from jpaged.models.random_weights import random_checkpoint
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["m", "-tp", "4", "--coordinator-address", "h:1", "--num-processes",
                              "2", "--process-id", "1"])
    assert (args.tensor_parallel_size, args.coordinator_address, args.num_processes,
            args.process_id) == (4, "h:1", 2, 1)
    checkpoint = random_checkpoint(RANDOM_LLAMA, dtype="float32")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs that many devices, but only "
                                         r"1 are visible \(cpu\); lower it, or on CPU set XLA_FLAGS="
                                         r"--xla_force_host_platform_device_count=2"):
        LLM.from_checkpoint(checkpoint, tensor_parallel_size=2, num_pages=8)
    from jpaged.distributed import initialize
    with pytest.raises(ValueError, match=r"coordinator_address must be HOST:PORT"):
        initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=2\), got 2"):
        initialize("localhost:1", 2, 2)


def test_pallas_kernels_run_per_device_under_shard_map():
    env = dict(os.environ, XLA_FLAGS=with_devices(4),
               JAX_PLATFORMS="cpu", JPAGED_COMPILATION_CACHE_DIR="off")
    proc = subprocess.run([sys.executable, str(SCRIPT.with_name("pallas_script.py"))],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    for name, r in result.items():
        assert r["shard_map"] and r["pallas_call"], (name, r)
        assert r["err"] < 2e-3, (name, r)                 # the probe's float32 tolerance
        rows = 2 if name == "paged_attention" else 4
        assert r["out_shards"] == [[rows, 2, 16]] * 4      # 8 query heads, 2 per device
