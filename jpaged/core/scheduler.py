"""Continuous batching: pick the sequences and token counts for each step.

Every step first serves the running sequences in arrival order (a decode needs one token, a
sequence still in prefill takes a chunk), then admits waiting ones, all within `max_num_batched_tokens`
and `max_num_seqs`. An admitted sequence starts after its longest cached prefix; the other samples of
an n > 1 request are admitted once the first has computed the prompt, so they share its pages. When the pages run out, the newest running sequence is preempted by recompute:
its pages are freed and it goes back to the front of the queue with `num_computed_tokens = 0`.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from jpaged.core.block_manager import BlockManager
from jpaged.core.sequence import Sequence, SequenceStatus
from jpaged.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step, as plain data for the runner and sampler.

    NOTE: `token_ids` is the sequence's own list (prompt + output so far), handed over without a
    copy; the runner and sampler only read it, and only before the engine appends this step's token.
    """
    seq_id: int
    request_id: str
    num_computed_tokens: int     # positions num_computed_tokens .. + num_new_tokens - 1 run now
    num_new_tokens: int
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: tuple[int, ...]  # page ids covering every token computed so far and now
    params: SamplingParams
    seed: int                    # per-sequence sampling seed

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last token, so its sample is kept."""
        return self.num_computed_tokens + self.num_new_tokens == len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[int]                       # seq ids preempted by this step
    # (src, dst) page copies to apply before the step (copy-on-write); empty until forks exist
    pages_to_copy: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0               # prompt tokens served by the prefix cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._allocate_or_preempt(seq, seq.num_computed_tokens + n, preempted):
                scheduled.append((seq, n))
                budget -= n
                i += 1
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and not preempted):
            seq = self.waiting[0]
            if self._prompt_pending(seq):
                break
            cached = self.block_manager.match_prefix(seq)
            seq.num_computed_tokens += cached
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                self.block_manager.free(seq)                  # give the matched pages back
                seq.num_computed_tokens = 0
                break
            self.num_cached_tokens += cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return SchedulerOutput([_plain(seq, n) for seq, n in scheduled],
                               [seq.seq_id for seq in preempted])

    def _prompt_pending(self, seq: Sequence) -> bool:
        """NOTE: the samples of an n > 1 request wait until sample 0 has computed the shared
        prompt, then take its full pages from the prefix cache instead of computing it again."""
        first = seq.first_sibling
        return (first is not None and self.block_manager.enable_prefix_caching
                and first.status is SequenceStatus.RUNNING
                and first.num_computed_tokens < first.num_prompt_tokens)

    def _allocate_or_preempt(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Find pages for `seq`, preempting the newest running sequences; False if `seq` itself
        had to go."""
        while not self.block_manager.allocate(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (e.g. a request cancelled by the caller)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"


def _plain(seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
    return ScheduledSeq(seq.seq_id, seq.request_id, seq.num_computed_tokens, num_new_tokens,
                        seq.token_ids, seq.num_prompt_tokens, tuple(seq.block_table), seq.params,
                        seq.seed)
