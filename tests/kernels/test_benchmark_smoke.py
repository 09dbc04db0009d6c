"""benchmarks/kernels.py --smoke runs on CPU and the three implementations agree."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("jpaged_kernel_benchmark", _PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--batches", "2", "--contexts", "32", "--out-dir",
                         str(tmp_path)])
    [row] = result["rows"]
    assert row["jpaged_triton"]["us"] > 0
    assert row["max_abs_diff_vs_xla_reference"] < 1e-4
    if "jax_pallas" in row:
        assert row["max_abs_diff_vs_jax_pallas"] < 1e-4
    assert len(list(tmp_path.glob("kernels_*_smoke.json"))) == 1
    assert len(list(tmp_path.glob("kernels_*_smoke.png"))) == 1
