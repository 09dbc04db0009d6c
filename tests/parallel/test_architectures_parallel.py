"""Tensor and expert parallelism for issue #18's families on a virtual 8-device CPU mesh: a dense
model (Qwen3, q/k norms, KV heads replicated past 2 devices) and an MoE model (Qwen3-MoE with a
dense layer among its MoE layers) give the same greedy tokens for N = 1, 2, 4, 8, the MoE one with
its experts split whole over the devices (enable_expert_parallel) and, at N = 8, by their MLP
width instead. The runs happen in one subprocess (arch_tp_script.py): the device count must be
forced before jax is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_archs import ARCHS, build_hf_model  # noqa: E402

SCRIPT = Path(__file__).with_name("arch_tp_script.py")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 300, 41], [12, 13, 14, 200]]


def test_dense_and_moe_tokens_equal_for_tp_1_2_4_8(tmp_path):
    paths = {name: tmp_path / name for name in ("qwen3", "qwen3_moe")}
    for name, path in paths.items():
        build_hf_model(name, path, seed=11)
    runs = [[f"qwen3/{n}", str(paths["qwen3"]), n, False] for n in (1, 2, 4, 8)]
    runs += [[f"moe/{n}", str(paths["qwen3_moe"]), n, n > 1] for n in (1, 2, 4, 8)]
    runs += [["moe/8/by-width", str(paths["qwen3_moe"]), 8, False]]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JPAGED_MODEL_CACHE_DIR="off",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                         f"--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(
        {"runs": runs, "prompts": PROMPTS, "max_tokens": 12})], capture_output=True, text=True,
        env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    for label, r in result.items():
        family = label.split("/")[0]
        assert r["tokens"] == result[f"{family}/1"]["tokens"], label
        assert r["pages_free"], label
    experts, width = ARCHS["qwen3_moe"][1]["num_experts"], 32     # moe_intermediate_size
    for n in (2, 4, 8):
        # w_gate_up [Lm=2, E, D, 2, Fe]: E/n whole experts on each device; the KV cache by head
        assert result[f"moe/{n}"]["w_gate_up"] == [[2, experts // n, 64, 2, width]] * n
        assert result[f"qwen3/{n}"]["kv_cache"][0][1] == max(1, 2 // n)
        # one all-reduce per MoE layer's psum inside the scan body, as after a dense MLP
        assert "all-reduce" in result[f"moe/{n}"]["collectives"]
    assert result["moe/8/by-width"]["w_gate_up"] == [[2, experts, 64, 2, width // 8]] * 8


def test_capacity_sizes_moe_configs_on_paper():
    """benchmarks/capacity.py on the published Qwen3-30B-A3B and Mixtral-8x7B configs: their
    known parameter counts, the active ones, and the experts each of 8 devices holds."""
    import importlib.util
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "capacity.py"
    spec = importlib.util.spec_from_file_location("capacity", path)
    capacity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capacity)
    configs = path.parent / "configs"
    qwen = capacity.load_config(str(configs / "qwen3-30b-a3b.json"))
    mixtral = capacity.load_config(str(configs / "mixtral-8x7b.json"))
    c = capacity.capacity(qwen, 8, "bfloat16", 80.0, expert_parallel=True)
    assert (c["params"], c["active_params"]) == (30_532_122_624, 3_353_032_704)   # "30B-A3B"
    assert c["experts_per_device"] == 16 and c["kv_head_replicas"] == 2
    c = capacity.capacity(mixtral, 8, "bfloat16", 80.0, expert_parallel=True)
    assert (c["params"], c["active_params"]) == (46_702_792_704, 12_879_925_248)
    assert c["experts_per_device"] == 1
    assert c["weight_bytes_per_device"] * 8 == pytest.approx(c["weight_bytes_total"], rel=0.02)
    with pytest.raises(ValueError, match="tensor_parallel_size=16 does not divide the model's 8 "
                                         "experts"):
        capacity.capacity(mixtral, 16, "bfloat16", 80.0, expert_parallel=True)
