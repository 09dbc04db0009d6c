"""Compile an engine's shape buckets before it serves, so the first clients do not stall on XLA.

With JAX's persistent compilation cache on (the engine turns it on), a restart loads these
executables from disk instead of compiling them again.

What is compiled (the step and the greedy and random samplers of each batch bucket):
  - every decode bucket: batch B (each `seq_buckets` size) x block-table width P (each
    `page_buckets` size up to max_model_len);
  - every prefill of one request alone: each (T, P) that a prompt of 1 .. min(max_model_len - 1,
    max_num_batched_tokens) tokens maps to.
NOTE: mixed batches (prefill chunks beside running decodes, B > 1) span a T x B x P grid too large
to compile up front; they compile on first use and the engine logs each one.
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
    return plan


def _fake_batch(batch: int, new_tokens: int, pages: int, page_size: int,
                params: SamplingParams) -> SchedulerOutput:
    context = new_tokens if new_tokens > 1 else pages * page_size
    token_ids = [0] * context
    seqs = [ScheduledSeq(seq_id=-1 - i, request_id=f"warmup-{i}",
                         num_computed_tokens=context - new_tokens, num_new_tokens=new_tokens,
                         token_ids=token_ids, num_prompt_tokens=context - 1,
                         block_table=(0,) * pages, params=params, seed=0)
            for i in range(batch)]
    return SchedulerOutput(seqs, [])


def warm_up(engine) -> int:
    """Run the plan's steps on `engine` (before it serves); returns the compilations it caused."""
    runner, config = engine.runner, engine.config
    before, start = engine.num_compilations, time.perf_counter()
    plan = warmup_plan(runner, engine.max_model_len, config.max_num_batched_tokens)
    logger.info("warm-up: compiling %d step buckets (decode B x P, single-request prefill T x P)",
                len(plan))
    for i, (kind, batch, new_tokens, pages) in enumerate(plan):
        for params in (_GREEDY, _RANDOM) if kind == "decode" else (_GREEDY,):
            runner.execute(_fake_batch(batch, new_tokens, pages, runner.page_size, params),
                           engine.eos_token_ids)
        if (i + 1) % 20 == 0:
            logger.info("warm-up: %d/%d buckets (%.0fs)", i + 1, len(plan),
                        time.perf_counter() - start)
    compiled = engine.num_compilations - before
    logger.info("warm-up: %d buckets ready in %.1fs (%d step and sampler variants compiled or "
                "loaded from the compilation cache)", len(plan), time.perf_counter() - start,
                compiled)
    return compiled
