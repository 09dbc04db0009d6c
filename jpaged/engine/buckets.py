"""Shape buckets of the step, and the warm-up plan that compiles them before serving.

NOTE: padding buckets. T (tokens), B (sequences) and P (block-table width, pages per sequence) are
padded up to a few fixed sizes so that, after warm-up, no step compiles again. Every padded token
costs a full forward and the reference attention reads every padded page of the block table, so
tokens and pages get finer buckets (4 per octave) than sequences (2 per octave), whose padding only
costs LM-head rows. A batch where every sequence brings one token is a decode (T = B).

The warm-up plans (`BucketPolicy.warmup_plan`), decode buckets first (every request needs them).
"full" compiles every bucket a request can meet alone:
  - every decode bucket: B x P for each page bucket up to max_model_len;
  - every prefill of one request alone: each (T, P) a prompt of 1 .. min(max_model_len - 1,
    max_num_batched_tokens) tokens maps to;
  - stand-ins for mixed batches (prefill chunks beside running decodes): the largest batch bucket
    at each power-of-two token count and power-of-two width (and the largest of each), so every
    mixed batch has one with at most twice its tokens and pages (ModelRunner's stand-ins).
"auto" (`jpaged serve`'s default) compiles a coarse grid of stand-ins, so that any step can run
at once in a compiled bucket at most ~4-8x its size while its own compiles in the background
(ModelRunner's stand-ins), and start-up takes seconds rather than minutes:
  - decode: B in {1, 8, 64, ...} up to max_num_seqs (x8 apart) x P every 4x down from the widest;
  - prefill of one request: T every 4x down from the longest prompt's bucket;
  - mixed: the largest batch bucket at T every 4x down from max_num_batched_tokens, full width.
With speculative decoding (k proposals) both plans add, for each decode B x P they hold, a batch
of B decodes that each verify k proposals (T = B(k + 1), logits at k + 1 positions per row).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jpaged.core.step import ScheduledSeq
from jpaged.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class StepKey:
    """One shape bucket of the step: one compiled executable each."""
    num_tokens: int      # T, padded
    num_seqs: int        # B, padded
    num_pages: int       # P, block-table width, padded
    decode_only: bool
    prompt_logprobs: bool = False   # the step also scores prompt tokens (wants_prompt_logprobs)
    # A = 1 + k: logits at A positions per sequence (some row verifies speculative proposals)
    spec_width: int = 1


@dataclasses.dataclass(frozen=True)
class WarmupStep:
    """A fake batch that lands in one bucket: `num_seqs` sequences with `num_pages`-page block
    tables (every entry the null page, which absorbs their KV writes) bringing `num_tokens` new
    tokens in all."""
    kind: Literal["decode", "prefill", "mixed", "speculative"]
    num_seqs: int
    num_tokens: int
    num_pages: int

    def rows(self, page_size: int, params: SamplingParams) -> list[ScheduledSeq]:
        """The batch as scheduled rows ("mixed": the tokens spread over the sequences, so at
        least one brings a chunk of several; "speculative": each row a decode with the rest of
        its tokens as proposals)."""
        def row(i: int, new: int) -> ScheduledSeq:
            context = self.num_pages * page_size if self.kind != "prefill" else new
            spec = new - 1 if self.kind == "speculative" else 0
            return ScheduledSeq(seq_id=-1 - i, request_id=f"warmup-{i}",
                                num_computed_tokens=context - new, num_new_tokens=new,
                                token_ids=[0] * (context - spec),
                                num_prompt_tokens=context - spec - 1,
                                block_table=(0,) * self.num_pages, params=params, seed=0,
                                num_spec_tokens=spec, spec_token_ids=(0,) * spec)
        base, extra = divmod(self.num_tokens, self.num_seqs)
        return [row(i, base + (i < extra)) for i in range(self.num_seqs)]


def wants_prompt_logprobs(row: ScheduledSeq) -> bool:
    """The row computes prompt tokens that are followed by prompt tokens it must score."""
    return row.params.prompt_logprobs is not None and \
        row.num_computed_tokens < row.num_prompt_tokens - 1 and row.num_new_tokens > 0


def geometric_buckets(smallest: int, largest: int, per_octave: int = 2) -> list[int]:
    """`per_octave` sizes between consecutive powers of two (1x, 1.5x for 2; 1x, 1.25x, 1.5x,
    1.75x for 4), from `smallest` up to and including `largest`."""
    out, size = set(), smallest
    while size < largest:
        out.update(size + size * i // per_octave for i in range(per_octave))
        size *= 2
    return sorted(b for b in out | {largest} if b <= largest)


def pick(buckets: list[int], n: int) -> int:
    """The smallest bucket that holds n."""
    return next(b for b in buckets if b >= n)


def thinned(buckets: list[int], ratio: int) -> list[int]:
    """The largest bucket, then the bucket holding each `ratio`-th fraction of it, down to about
    twice the smallest (so any size has a bucket at most ~`ratio` times its own)."""
    out, bound = {buckets[-1]}, buckets[-1]
    while bound > 2 * buckets[0]:
        bound = max(bound // ratio, buckets[0])
        out.add(pick(buckets, bound))
    return sorted(out)


class BucketPolicy:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 page_size: int, num_speculative_tokens: int = 0):
        self.page_size = page_size
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.seqs = geometric_buckets(1, max_num_seqs)
        self.tokens = geometric_buckets(16, max(16, max_num_batched_tokens), per_octave=4)
        self.pages = geometric_buckets(1, -(-max_model_len // page_size), per_octave=4)

    def key_for(self, rows: list[ScheduledSeq]) -> StepKey:
        """The smallest bucket that holds these rows."""
        decode_only = all(r.num_new_tokens == 1 for r in rows)
        num_seqs = pick(self.seqs, len(rows))
        return StepKey(
            num_tokens=num_seqs if decode_only else pick(self.tokens,
                                                         sum(r.num_new_tokens for r in rows)),
            num_seqs=num_seqs,
            num_pages=pick(self.pages, max(len(r.block_table) for r in rows)),
            decode_only=decode_only,
            prompt_logprobs=any(wants_prompt_logprobs(r) for r in rows),
            spec_width=1 + self.num_speculative_tokens if any(r.num_spec_tokens for r in rows)
            else 1)

    def warmup_plan(self, mode: Literal["full", "auto"] = "full") -> list[WarmupStep]:
        """One fake batch per bucket to compile before serving (see the module docstring)."""
        if mode == "auto":
            return self._coarse_plan()
        size = self.page_size
        pages = [p for p in self.pages if (p - 1) * size < self.max_model_len]
        plan = [WarmupStep("decode", b, b, p) for p in pages for b in self.seqs]
        longest = {}   # (T, P) bucket -> the longest prompt in it (a 1-token prompt is a decode)
        for length in range(2, min(self.max_model_len - 1, self.max_num_batched_tokens) + 1):
            longest[(pick(self.tokens, length), pick(self.pages, -(-length // size)))] = length
        plan += [WarmupStep("prefill", 1, length, -(-length // size))
                 for length in longest.values()]
        batch = self.seqs[-1]
        if batch > 1:
            widths = sorted({p for p in pages if p & (p - 1) == 0} | {pages[-1]})
            tokens = [t for t in self.tokens if t > batch and t & (t - 1) == 0]
            plan += [WarmupStep("mixed", batch, t, p) for p in widths
                     for t in tokens + [self.tokens[-1]] if -(-t // batch) <= p * size]
        return list(dict.fromkeys(plan + self._speculative_plan(self.seqs, pages)))

    def _coarse_plan(self) -> list[WarmupStep]:
        """The "auto" plan: a coarse grid of stand-ins (see the module docstring)."""
        size = self.page_size
        pages = thinned([p for p in self.pages if (p - 1) * size < self.max_model_len], 4)
        plan = [WarmupStep("decode", b, b, p) for p in pages for b in thinned(self.seqs, 8)]
        longest = min(self.max_model_len - 1, self.max_num_batched_tokens)
        reachable = [t for t in self.tokens if t <= pick(self.tokens, longest)]
        for t in thinned(reachable, 4):
            length = min(t, longest)
            plan.append(WarmupStep("prefill", 1, length, -(-length // size)))
        batch, widest = self.seqs[-1], pages[-1]
        if batch > 1:
            mixed = [t for t in self.tokens if t > batch]
            plan += [WarmupStep("mixed", batch, t, widest) for t in thinned(mixed, 4)
                     if -(-t // batch) <= widest * size] if mixed else []
        return list(dict.fromkeys(plan + self._speculative_plan(thinned(self.seqs, 8), pages)))

    def _speculative_plan(self, seqs: list[int], pages: list[int]) -> list[WarmupStep]:
        """With speculative decoding: B decodes that each verify k proposals, for every B and P
        of the decode grid (last: the samplers are warmed by the plain decodes of the same B)."""
        width = 1 + self.num_speculative_tokens
        if width == 1:
            return []
        return [WarmupStep("speculative", b, b * width, p) for p in pages for b in seqs
                if b * width <= self.max_num_batched_tokens and width <= p * self.page_size]
