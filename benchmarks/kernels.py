"""Decode-attention kernel benchmark: jpaged's Triton kernel vs JAX's bundled Pallas paged attention
vs the XLA (pure-jnp) reference.

    python benchmarks/kernels.py                 # on a GPU: Llama-3-8B heads, bf16, page 16
    python benchmarks/kernels.py --smoke         # anywhere: tiny shapes, interpret mode (CPU check)

Shapes: Llama-3-8B attention (32 query heads, 8 KV heads, head dim 128), page size 16, bfloat16,
batch 1..256 x context 512..32k, one layer of cache; shapes that do not fit in device memory are
skipped. Every sequence has the full context; block tables are a random permutation of pages.

Timing: each call is jitted and warmed up; a run times `inner` back-to-back calls (so host dispatch
overlaps device work) ending in block_until_ready, and the median over runs is reported in
microseconds per call. Small caches are replicated and rotated so calls do not hit a warm L2.
Bandwidth counts the bytes a decode step must move: the K/V pages attended to, q, the output and
the block tables. Results (JSON + PNG) go to benchmarks/results/kernels_<device>_jax<version>.*
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jpaged_kernels import reference                                      # noqa: E402
from jpaged_kernels.triton_paged_attention import (default_num_splits,  # noqa: E402
                                                    paged_attention)

try:
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
except ImportError:                                   # JAX without the bundled Triton ops
    jax_paged = None

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROTATE_BYTES = 128 << 20            # rotate cache copies until this much is touched (> L2)
MAX_COPIES = 64
# Peak HBM bandwidth (GB/s) by device; matched against jax's device_kind.
PEAK_GBPS = [
    (r"H200", 4800.0),
    (r"H100.*(SXM|HBM3)", 3350.0),
    (r"A100.*80GB", 2039.0),
    (r"\bL4\b", 300.0),
]


def peak_gbps(device_kind):
    for pattern, gbps in PEAK_GBPS:
        if re.search(pattern, device_kind):
            return gbps
    return None


def make_inputs(rng, batch, context, *, heads, kv_heads, head_dim, page_size, dtype, copies):
    """q [B, N, H]; `copies` caches [K, num_pages, S, H] (page 0 the null page); tables [B, P]."""
    pages_per_seq = math.ceil(context / page_size)
    num_pages = batch * pages_per_seq + 1
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
    tables = jnp.asarray((rng.permutation(num_pages - 1) + 1).reshape(batch, pages_per_seq),
                         jnp.int32)
    lens = jnp.full((batch,), context, jnp.int32)
    shape = (kv_heads, num_pages, page_size, head_dim)
    caches = []
    for i in range(copies):
        key_k, key_v = jax.random.split(jax.random.key(i))
        caches.append((jax.random.normal(key_k, shape, dtype), jax.random.normal(key_v, shape,
                                                                                  dtype)))
    return q, caches, tables, lens


def time_us(fn, q, caches, tables, lens, *, runs, budget_s):
    """Median microseconds per call over `runs` runs of back-to-back calls (see module doc)."""
    for k, v in caches[:2]:
        fn(q, k, v, tables, lens).block_until_ready()                     # compile + warm up
    start = time.perf_counter()
    fn(q, *caches[0], tables, lens).block_until_ready()
    one = max(time.perf_counter() - start, 1e-6)
    inner = max(len(caches), min(200, int(budget_s / runs / one)))
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for i in range(inner):
            out = fn(q, *caches[i % len(caches)], tables, lens)
        out.block_until_ready()
        samples.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(samples)


def implementations(args, pages_per_seq):
    """name -> jitted fn(q, k, v, tables, lens). JAX's kernel applies no softmax scale, so all
    three run with scale 1 on the same q."""
    interpret = args.smoke
    impls = {"jpaged_triton": jax.jit(lambda q, k, v, t, n: paged_attention(
        q, k, v, t, n, scale=1.0, interpret=interpret))}
    if jax_paged is not None and not args.skip_jax:
        k_splits = math.gcd(args.jax_k_splits, pages_per_seq)
        impls["jax_pallas"] = jax.jit(lambda q, k, v, t, n: jax_paged.paged_attention(
            q, k, v, t, n, k_splits=k_splits,
            pages_per_compute_block=min(8, pages_per_seq // k_splits), interpret=interpret))
    if not args.skip_reference:
        impls["xla_reference"] = jax.jit(lambda q, k, v, t, n: reference.paged_attention(
            q, k, v, t, n, scale=1.0))
    return impls


def tune(args, q, caches, tables, lens):
    """Time jpaged's kernel over a small config sweep; sorted fastest first."""
    results = []
    for ppb, warps, stages, splits in itertools.product(
            (4, 8, 16), (4, 8), (2, 3), (None, "x2", "x4")):
        cfg = dict(pages_per_block=ppb, num_warps=warps, num_stages=stages)
        if splits is not None:
            default = default_num_splits(q.shape[0], caches[0][0].shape[0],
                                         math.ceil(tables.shape[1] / ppb))
            cfg["num_splits"] = default * int(splits[1:])
        fn = jax.jit(functools.partial(paged_attention, scale=1.0, interpret=args.smoke, **cfg))
        try:
            us = time_us(fn, q, caches, tables, lens, runs=args.runs, budget_s=args.budget_s / 4)
            results.append({**cfg, "us": round(us, 2)})
        except Exception as e:
            results.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})
    return sorted(results, key=lambda r: r.get("us", math.inf))


def bench_shape(args, rng, batch, context, memory_limit):
    itemsize = jnp.dtype(args.dtype).itemsize
    pages_per_seq = math.ceil(context / args.page_size)
    kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * itemsize
    copies = 1 if args.smoke else min(MAX_COPIES, max(1, math.ceil(ROTATE_BYTES / kv_bytes)))
    row = {"batch": batch, "context": context, "kv_bytes": kv_bytes, "copies": copies}
    if memory_limit and kv_bytes * (copies + 0.5) > 0.8 * memory_limit:
        return {**row, "skipped": "does not fit in device memory"}
    try:
        q, caches, tables, lens = make_inputs(
            rng, batch, context, heads=args.heads, kv_heads=args.kv_heads,
            head_dim=args.head_dim, page_size=args.page_size, dtype=args.dtype, copies=copies)
    except Exception as e:                            # e.g. out of memory while allocating
        gc.collect()
        return {**row, "skipped": f"{type(e).__name__}: {str(e)[:200]}"}
    moved = kv_bytes + 2 * q.size * itemsize + tables.size * 4
    row["bytes_moved"] = moved
    outputs = {}
    for name, fn in implementations(args, pages_per_seq).items():
        try:
            us = time_us(fn, q, caches, tables, lens, runs=args.runs, budget_s=args.budget_s)
        except Exception as e:                        # report, keep benchmarking the others
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        outputs[name] = np.asarray(fn(q, *caches[0], tables, lens), np.float32)
        gbps = moved / us / 1e3
        row[name] = {"us": round(us, 2), "gbps": round(gbps, 1)}
        if args.peak:
            row[name]["pct_peak"] = round(100 * gbps / args.peak, 1)
    if args.tune:
        row["jpaged_triton_tuning"] = tune(args, q, caches, tables, lens)
    if "jpaged_triton" in outputs:
        for other in ("jax_pallas", "xla_reference"):
            if other in outputs:
                row[f"max_abs_diff_vs_{other}"] = float(
                    np.abs(outputs["jpaged_triton"] - outputs[other]).max())
    ours, theirs = row.get("jpaged_triton", {}), row.get("jax_pallas", {})
    if "us" in ours and "us" in theirs:
        row["speedup_vs_jax_pallas"] = round(theirs["us"] / ours["us"], 3)
    del q, caches, tables, lens
    gc.collect()
    return row


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, (ax_bw, ax_sp) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(batches)))
    for color, batch in zip(colors, batches):
        mine = [r for r in rows if r["batch"] == batch and "skipped" not in r]
        for name, style in (("jpaged_triton", "-o"), ("jax_pallas", "--x"),
                            ("xla_reference", ":.")):
            pts = [(r["context"], r[name]["gbps"]) for r in mine if "gbps" in r.get(name, {})]
            if pts:
                ax_bw.plot(*zip(*pts), style, color=color,
                           label=f"{name} B={batch}" if name == "jpaged_triton" else None)
        pts = [(r["context"], r["speedup_vs_jax_pallas"]) for r in mine
               if "speedup_vs_jax_pallas" in r]
        if pts:
            ax_sp.plot(*zip(*pts), "-o", color=color, label=f"B={batch}")
    for ax in (ax_bw, ax_sp):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    ax_bw.set_ylabel("achieved GB/s  (solid jpaged, dashed JAX Pallas, dotted XLA)")
    ax_sp.set_ylabel("speedup of jpaged over JAX's Pallas kernel")
    ax_sp.axhline(1.0, color="gray", lw=0.8)
    ax_bw.legend(fontsize=7)
    ax_sp.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes in Pallas interpret mode (runs on CPU)")
    p.add_argument("--batches", type=int, nargs="+", help="default 1 4 16 64 256 (smoke: 1 2)")
    p.add_argument("--contexts", type=int, nargs="+",
                   help="default 512 2048 8192 32768 (smoke: 32 64)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--budget-s", type=float, default=1.0, help="rough seconds per measurement")
    p.add_argument("--jax-k-splits", type=int, default=16, help="k_splits for JAX's kernel")
    p.add_argument("--skip-reference", action="store_true", help="do not time the XLA reference")
    p.add_argument("--skip-jax", action="store_true", help="do not time JAX's bundled kernel")
    p.add_argument("--tune", action="store_true",
                   help="also sweep jpaged's pages_per_block / num_warps / num_stages / "
                        "num_splits (36 configs per shape: pick a few shapes)")
    p.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    args = p.parse_args(argv)
    args.heads, args.kv_heads, args.head_dim, args.page_size = 32, 8, 128, 16
    args.dtype = jnp.bfloat16
    batches, contexts = [1, 4, 16, 64, 256], [512, 2048, 8192, 32768]
    if args.smoke:
        args.heads, args.kv_heads, args.head_dim = 8, 2, 64
        args.dtype = jnp.float32
        batches, contexts, args.runs, args.budget_s = [1, 2], [32, 64], 3, 0.05
    args.batches = args.batches or batches
    args.contexts = args.contexts or contexts
    return args


def main(argv=None):
    """Run the grid, print one JSON line per shape, write JSON + PNG; returns the result dict."""
    args = parse_args(argv)
    device = jax.devices()[0]
    args.peak = peak_gbps(device.device_kind)
    stats = device.memory_stats() or {}
    memory_limit = stats.get("bytes_limit")
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            row = bench_shape(args, rng, batch, context, memory_limit)
            rows.append(row)
            print(json.dumps(row), flush=True)

    meta = {
        "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
        "peak_gbps": args.peak if args.peak else "unknown", "smoke": args.smoke,
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "page_size": args.page_size, "dtype": jnp.dtype(args.dtype).name,
        "timing": f"median of {args.runs} runs of back-to-back calls, us per call",
    }
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device.device_kind).strip("-").lower()
    stem = f"kernels_{slug}_jax{jax.__version__}" + ("_smoke" if args.smoke else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "rows": rows}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out_dir / f"{stem}.png",
         f"paged decode attention, {device.device_kind}, JAX {jax.__version__}, "
         f"N={args.heads} K={args.kv_heads} H={args.head_dim} S={args.page_size} "
         f"{meta['dtype']} (peak {meta['peak_gbps']} GB/s)")
    print(json.dumps(meta))
    print(f"wrote {args.out_dir / stem}.json and .png")
    return result


if __name__ == "__main__":
    main()
