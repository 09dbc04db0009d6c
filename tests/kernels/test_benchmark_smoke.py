"""benchmarks/kernels.py --smoke runs on CPU and the three implementations agree."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("jpaged_kernel_benchmark", _PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--batches", "2", "--contexts", "32", "--out-dir",
                         str(tmp_path)])
    [row] = result["rows"]
    # K and V of B=2 sequences x 32 tokens x 2 KV heads x 64 (the smoke shapes), float32
    assert row["kv_bytes"] == 2 * 2 * 32 * 2 * 64 * 4
    for name in ("jpaged_triton", "xla_reference"):
        timing = row[name]
        assert 0 < timing["us"] < 60e6, timing                       # a real, finite time
        assert timing["gbps"] == pytest.approx(row["bytes_moved"] / timing["us"] / 1e3, rel=0.01,
                                               abs=0.06)
    assert row["max_abs_diff_vs_xla_reference"] < 1e-4
    if "jax_pallas" in row:
        assert row["max_abs_diff_vs_jax_pallas"] < 1e-4
    assert len(list(tmp_path.glob("kernels_*_smoke.json"))) == 1
    assert len(list(tmp_path.glob("kernels_*_smoke.png"))) == 1
