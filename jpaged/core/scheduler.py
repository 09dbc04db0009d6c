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


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int          # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last token, so its sample is kept."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

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
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._allocate_or_preempt(seq, seq.num_computed_tokens + n, preempted):
                scheduled.append(ScheduledSeq(seq, n))
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
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return SchedulerOutput(scheduled, preempted)

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
