"""Start-up time: a fresh process from launch to its first generated token, cold and warm.

Two ways in, each timed in a new process:
  cli   `jpaged generate --prompt X --max-tokens 1 --quiet`
  llm   `LLM()` + one `generate(X, max_tokens=1)` in a python process
Cold: an empty cache root (JPAGED_CACHE_DIR set to a new temporary directory), so the GGUF is
dequantized and every step bucket compiled. Warm: the same cache root again, so the converted model
comes from the model cache and the executables from JAX's persistent compilation cache. (The OS
file cache is warm in both: the Python packages and the GGUF have been read before.)

The time to the first token is taken by the parent when the child's line announcing it arrives
(stdout unbuffered); the child's own exit comes a little later and is reported as process_wall_s.

    python benchmarks/startup.py                   # 2 cold + 3 warm runs of each, JSON + PNG
    python benchmarks/startup.py --runs 1 --cases llm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"
LLM_SCRIPT = f"""
from jpaged import LLM, SamplingParams
out = LLM().generate([{PROMPT!r}], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
print("FIRST_TOKEN", out[0].outputs[0].token_ids, flush=True)
"""


def command(case: str) -> tuple[list[str], str]:
    """(argv, the stdout prefix that marks the first token) of one case."""
    bin_dir = Path(sys.executable).parent
    if case == "cli":
        jpaged = bin_dir / "jpaged"
        argv = [str(jpaged)] if jpaged.is_file() else [sys.executable, "-m", "jpaged.entrypoints.cli"]
        return argv + ["generate", "--prompt", PROMPT, "--max-tokens", "1", "--quiet"], "1 requests"
    return [sys.executable, "-c", LLM_SCRIPT], "FIRST_TOKEN"


def time_once(case: str, cache_root: Path) -> dict:
    argv, marker = command(case)
    env = dict(os.environ, JPAGED_CACHE_DIR=str(cache_root), PYTHONUNBUFFERED="1")
    for var in ("JPAGED_COMPILATION_CACHE_DIR", "JPAGED_MODEL_CACHE_DIR"):
        env.pop(var, None)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    first = None
    for line in proc.stdout:
        if first is None and line.startswith(marker):
            first = time.perf_counter() - start
    stderr = proc.stderr.read()
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode or first is None:
        raise RuntimeError(f"{case} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return {"first_token_s": first, "process_wall_s": wall}


def measure(case: str, runs: int) -> dict:
    """`runs` cold starts (each with a new empty cache root) and `runs + 1` warm ones."""
    cold, warm = [], []
    for i in range(runs):
        root = Path(tempfile.mkdtemp(prefix="jpaged-startup-"))
        try:
            cold.append(time_once(case, root))
            if i == 0:
                warm = [time_once(case, root) for _ in range(runs + 1)]
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"{case}: cold {[round(r['first_token_s'], 2) for r in cold]} "
              f"warm {[round(r['first_token_s'], 2) for r in warm]}", file=sys.stderr)
    return {"cold": cold, "warm": warm,
            "cold_first_token_s_min": min(r["first_token_s"] for r in cold),
            "warm_first_token_s_min": min(r["first_token_s"] for r in warm),
            "cold_first_token_s_median": sorted(r["first_token_s"] for r in cold)[len(cold) // 2],
            "warm_first_token_s_median": sorted(r["first_token_s"] for r in warm)[len(warm) // 2]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="cli,llm", help="comma list of cli,llm")
    parser.add_argument("--runs", type=int, default=2, help="cold runs (warm runs: one more)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    import jax

    report = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version(), "jax": jax.__version__,
                          "device": jax.devices()[0].device_kind},
              "prompt": PROMPT, "load_average_before": os.getloadavg()}
    for case in args.cases.split(","):
        report[case] = measure(case, args.runs)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    write_outputs(report, Path(args.out_dir))
    return 0


def write_outputs(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{report['machine']['device'].replace(' ', '_')}_jax{report['machine']['jax']}"
    (out_dir / f"startup_{tag}.json").write_text(json.dumps(report, indent=2))
    cases = [c for c in ("cli", "llm") if c in report]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    for j, kind in enumerate(("cold", "warm")):
        values = [report[c][f"{kind}_first_token_s_min"] for c in cases]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(cases))], values, width, label=kind)
        ax.bar_label(bars, fmt="%.1f s")
    ax.set_xticks(range(len(cases)), ["jpaged generate\n--max-tokens 1", "LLM() + generate"][:len(cases)]
                  if cases == ["cli", "llm"] else cases)
    ax.set_ylabel("launch to first token, s (min of runs)")
    ax.set_title(f"jpaged start-up on {report['machine']['device']} ({report['machine']['cpu_count']} "
                 f"cores), SmolLM2-135M float32", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"startup_{tag}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
