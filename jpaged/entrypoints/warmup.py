"""Compile an engine's shape buckets before it serves, so the first clients do not stall on XLA.

With JAX's persistent compilation cache on (the engine turns it on), a restart loads these
executables from disk instead of compiling them again.

What is compiled (the step of each bucket, and _SAMPLERS' variants for each batch size):
  - every decode bucket: batch B (each `seq_buckets` size) x block-table width P (each
    `page_buckets` size up to max_model_len);
  - every prefill of one request alone: each (T, P) that a prompt of 1 .. min(max_model_len - 1,
    max_num_batched_tokens) tokens maps to.
  - stand-ins for mixed batches (prefill chunks beside running decodes): the largest batch bucket
    at each power-of-two token count and power-of-two block-table width (and the largest of
    each), so every mixed batch has one with at most twice its tokens and pages.
NOTE: mixed batches span a T x B x P grid too large to compile up front. The server runs a mixed
batch whose bucket is not compiled in the cheapest stand-in that holds it
(ModelRunner.compile_in_background), so no client waits on XLA.
NOTE: the warm-up runs real steps on fake sequences whose block tables point only at the null
page 0, which absorbs their KV writes; no usable page is touched.
"""

from __future__ import annotations

import logging
import time

from jpaged.core.scheduler import ScheduledSeq, SchedulerOutput
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger("jpaged")

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)
_RANDOM = SamplingParams(temperature=1.0, max_tokens=1)
# The sampler variants compiled for every batch bucket: greedy and random, each with and without
# min_tokens' EOS ban (the fake rows have 1 output token), and top-p (what OpenAI clients send
# most).
_SAMPLERS = (_GREEDY, SamplingParams(temperature=0.0, max_tokens=2, min_tokens=2), _RANDOM,
             SamplingParams(temperature=1.0, max_tokens=2, min_tokens=2),
             SamplingParams(temperature=1.0, top_p=0.9, max_tokens=1))


def _pick(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


def warmup_plan(runner, max_model_len: int, max_num_batched_tokens: int
                ) -> list[tuple[str, int, int, int]]:
    """(kind, batch size, tokens per sequence, pages per sequence) of each step to run, one per
    bucket; decode buckets first (every request needs them), small before large."""
    page_size = runner.page_size
    pages = [p for p in runner.page_buckets if (p - 1) * page_size < max_model_len]
    plan = [("decode", b, 1, p) for p in pages for b in runner.seq_buckets]
    longest = {}       # (T, P) bucket -> the longest prompt in it (a 1-token prompt is a decode)
    for length in range(2, min(max_model_len - 1, max_num_batched_tokens) + 1):
        longest[(_pick(runner.token_buckets, length),
                 _pick(runner.page_buckets, -(-length // page_size)))] = length
    plan += [("prefill", 1, length, -(-length // page_size)) for length in longest.values()]
    batch = runner.seq_buckets[-1]
    if batch > 1:
        widths = sorted({p for p in pages if p & (p - 1) == 0} | {pages[-1]})
        tokens = [t for t in runner.token_buckets if t > batch and t & (t - 1) == 0]
        plan += [("mixed", batch, t, p) for p in widths for t in tokens + [runner.token_buckets[-1]]
                 if -(-t // batch) <= p * page_size]
    return list(dict.fromkeys(plan))


def _fake_batch(kind: str, batch: int, new_tokens: int, pages: int, page_size: int,
                params: SamplingParams) -> SchedulerOutput:
    """`batch` sequences of `new_tokens` each; "mixed": `new_tokens` in all, spread over the
    `batch` sequences (so at least one brings a chunk of several)."""
    def seq(i: int, new: int) -> ScheduledSeq:
        context = pages * page_size if kind != "prefill" else new
        return ScheduledSeq(seq_id=-1 - i, request_id=f"warmup-{i}",
                            num_computed_tokens=context - new, num_new_tokens=new,
                            token_ids=[0] * context, num_prompt_tokens=context - 1,
                            block_table=(0,) * pages, params=params, seed=0)
    if kind == "mixed":
        return SchedulerOutput([seq(i, new_tokens // batch + (i < new_tokens % batch))
                                for i in range(batch)], [])
    return SchedulerOutput([seq(i, new_tokens) for i in range(batch)], [])


def warm_up(engine, plan: list[tuple[str, int, int, int]] | None = None) -> int:
    """Run `plan`'s steps (default: warmup_plan's) on `engine` before it serves; returns the
    compilations it caused."""
    runner, config = engine.runner, engine.config
    before, start = engine.num_compilations, time.perf_counter()
    plan = plan or warmup_plan(runner, engine.max_model_len, config.max_num_batched_tokens)
    logger.info("warm-up: compiling %d step buckets (decode B x P, single-request prefill T x P, "
                "mixed-batch stand-ins)", len(plan))
    sampled = set()                  # batch buckets whose sampler variants are compiled
    for i, (kind, batch, new_tokens, pages) in enumerate(plan):
        for params in (_GREEDY,) if batch in sampled else _SAMPLERS:
            runner.execute(_fake_batch(kind, batch, new_tokens, pages, runner.page_size, params),
                           engine.eos_token_ids)
        sampled.add(batch)
        if (i + 1) % 20 == 0:
            logger.info("warm-up: %d/%d buckets (%.0fs)", i + 1, len(plan),
                        time.perf_counter() - start)
    compiled = engine.num_compilations - before
    logger.info("warm-up: %d buckets ready in %.1fs (%d step and sampler variants compiled or "
                "loaded from the compilation cache)", len(plan), time.perf_counter() - start,
                compiled)
    return compiled
