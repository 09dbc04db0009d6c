"""Memory sharing, measured on the real engine (SmolLM2-135M-Instruct, float32, CPU by default).

Prints one JSON line and writes it with a PNG to --out-dir. Each figure sits beside its peer from
the same run (the same engine with sharing off) and its ideal or goal:
  kv_waste_fraction          allocated but unfilled KV slots / allocated slots, averaged over the
                             steps of a ShareGPT-like length mix (goal < 4%, the vLLM paper's)
  parallel_sampling_saving   n=4, 512-token prompt, 256 output tokens: 1 - peak pages with forks /
                             peak pages of 4 unshared sequences; beside parallel_sampling_ideal
  beam_search_saving         beam width 4, same lengths, EOS ignored: 1 - peak pages of the beams /
                             peak pages of 4 unshared sequences (goal >= 55%, the paper's best)
  prefix_cache_speedup       a shared 1k-token system prompt, 64 requests: wall time with prefix
                             caching off / on, compilation excluded (goal >= 3x)

    python benchmarks/memory.py [--model PATH] [--num-requests 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

PAGE = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (GGUF)")
    parser.add_argument("--num-requests", type=int, default=64, help="prefix-cache workload")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    sizes = dict(prompt=64, output=32, system=256, mix=8) if args.quick else \
        dict(prompt=512, output=256, system=1024, mix=32)
    report = {"machine": machine_info(), "sizes": sizes}
    report.update(kv_waste(args.model, sizes))
    report.update(parallel_sampling(args.model, sizes))
    report.update(prefix_cache(args.model, sizes, args.num_requests))
    print(json.dumps(report))
    write_outputs(report, Path(args.out_dir))
    return 0


def make_llm(model, **kwargs):
    from jpaged import LLM
    options = dict(dtype="float32", page_size=PAGE, max_model_len=1280, max_num_seqs=64,
                   max_num_batched_tokens=2048)
    return LLM(model, **{**options, **kwargs})


def filled_slots(engine) -> tuple[int, int]:
    """(allocated slots, slots holding a computed token) over the pages in use now."""
    filled: dict[int, int] = {}
    for seq in engine.scheduler.running:
        for i, page in enumerate(seq.block_table):
            tokens = min(PAGE, max(0, seq.num_computed_tokens - i * PAGE))
            filled[page] = max(filled.get(page, 0), tokens)
    bm = engine.block_manager
    used = bm.num_usable_pages - bm.num_free_pages
    return used * PAGE, sum(filled.values())


def drive(llm, add) -> dict:
    """Add requests with `add(engine)`, step to the end, and track pages: peak used pages and
    the step-averaged fraction of allocated slots that hold no computed token."""
    engine = llm.llm_engine
    add(engine)
    peak, wastes = 0, []
    while engine.has_unfinished_requests():
        engine.step()
        allocated, filled = filled_slots(engine)
        peak = max(peak, allocated // PAGE)
        if allocated:
            wastes.append(1 - filled / allocated)
    assert engine.block_manager.all_free(), "pages leaked"
    return {"peak_pages": peak, "waste": float(np.mean(wastes)) if wastes else 0.0}


def random_prompt(rng, length: int) -> dict:
    return {"prompt_token_ids": rng.integers(100, 49000, size=length).tolist()}


def kv_waste(model, sizes) -> dict:
    """ShareGPT-like lengths: log-normal prompts (median ~120) and outputs (median ~200)."""
    from jpaged import SamplingParams
    rng = np.random.default_rng(0)
    scale = sizes["prompt"] / 512
    prompts = np.clip(rng.lognormal(np.log(120 * scale), 0.9, sizes["mix"]), 4, 900).astype(int)
    outputs = np.clip(rng.lognormal(np.log(200 * scale), 0.8, sizes["mix"]), 4, 350).astype(int)
    llm = make_llm(model, enable_prefix_caching=False)

    def add(engine):
        for i, (p, o) in enumerate(zip(prompts, outputs)):
            engine.add_request(f"mix{i}", random_prompt(rng, int(p)),
                               SamplingParams(temperature=0, max_tokens=int(o), ignore_eos=True))
    result = drive(llm, add)
    return {"kv_waste_fraction": result["waste"],
            "kv_waste_mix": {"requests": sizes["mix"], "mean_prompt": float(prompts.mean()),
                             "mean_output": float(outputs.mean())}}


def parallel_sampling(model, sizes) -> dict:
    from jpaged import BeamSearchParams, SamplingParams
    rng = np.random.default_rng(1)
    prompt = random_prompt(rng, sizes["prompt"])
    out = sizes["output"]
    llm = make_llm(model, enable_prefix_caching=False)
    sampled = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=out, ignore_eos=True)
    shared = drive(llm, lambda e: e.add_request("n4", prompt, sampled))
    unshared = drive(llm, lambda e: [e.add_request(f"solo{i}", prompt, SamplingParams(
        temperature=1.0, seed=i, max_tokens=out, ignore_eos=True)) for i in range(4)])
    beams = drive(llm, lambda e: e.add_beam_request("beam", prompt, BeamSearchParams(
        beam_width=4, max_tokens=out, ignore_eos=True)))
    prompt_pages, total_pages = sizes["prompt"] / PAGE, (sizes["prompt"] + out) / PAGE
    return {
        "parallel_sampling_saving": 1 - shared["peak_pages"] / unshared["peak_pages"],
        "parallel_sampling_ideal": 1 - (prompt_pages + 4 * (total_pages - prompt_pages)) /
                                   (4 * total_pages),
        "beam_search_saving": 1 - beams["peak_pages"] / unshared["peak_pages"],
        "peak_pages": {"n4_forked": shared["peak_pages"], "4_unshared": unshared["peak_pages"],
                       "beam4": beams["peak_pages"]},
    }


def prefix_cache(model, sizes, num_requests: int) -> dict:
    from jpaged import SamplingParams
    rng = np.random.default_rng(2)
    system = rng.integers(100, 49000, size=sizes["system"]).tolist()
    prompts = [{"prompt_token_ids": system + rng.integers(100, 49000, size=16).tolist()}
               for _ in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seconds = {}
    for caching in (False, True):
        llm = make_llm(model, enable_prefix_caching=caching)
        llm.generate(prompts, params, use_tqdm=False)          # compile every bucket it uses
        llm.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds["on" if caching else "off"] = time.perf_counter() - start
        del llm
    return {"prefix_cache_speedup": seconds["off"] / seconds["on"],
            "prefix_cache_seconds": seconds, "prefix_cache_requests": num_requests}


def machine_info() -> dict:
    import os

    import jax
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "device": jax.devices()[0].device_kind, "load_avg": os.getloadavg()}


def write_outputs(report: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{report['machine']['device'].replace(' ', '_')}_jax{report['machine']['jax']}"
    (out_dir / f"memory_{tag}.json").write_text(json.dumps(report, indent=2))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["kv_waste_fraction", "parallel_sampling_saving", "beam_search_saving"]
    refs = [0.04, report["parallel_sampling_ideal"], 0.55]
    ax1.bar(names, [report[n] for n in names], color=["C0", "C1", "C2"])
    ax1.scatter(names, refs, color="k", marker="_", s=900, zorder=3, label="goal / ideal")
    for i, n in enumerate(names):
        ax1.text(i, report[n], f"{report[n]:.1%}", ha="center", va="bottom")
    ax1.set_ylabel("fraction")
    ax1.legend()
    ax1.tick_params(axis="x", labelsize=8)
    secs = report["prefix_cache_seconds"]
    ax2.bar(["prefix caching off", "on"], [secs["off"], secs["on"]], color=["C3", "C0"])
    ax2.set_ylabel("seconds")
    ax2.set_title(f"{report['prefix_cache_requests']} requests, shared "
                  f"{report['sizes']['system']}-token system prompt: "
                  f"{report['prefix_cache_speedup']:.1f}x")
    fig.suptitle(f"jpaged memory sharing ({report['machine']['device']}, JAX "
                 f"{report['machine']['jax']})")
    fig.tight_layout()
    fig.savefig(out_dir / f"memory_{tag}.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
