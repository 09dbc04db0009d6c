"""Continuous batching: pick the sequences and token counts for each step.

Every step first serves the running sequences in arrival order (a decode needs one token, a
sequence still in prefill takes a chunk), then brings back swapped-out ones, then admits waiting
ones, all within `max_num_batched_tokens` and `max_num_seqs`. An admitted sequence starts after its
longest cached prefix.
NOTE: forks. The samples of an n > 1 request wait inside sample 0 (`pending_forks`, holding their
seats). In the step that computes the last prompt token, each is forked off sample 0's block
table (refcounts up, nothing recomputed) and scheduled with zero new tokens right after it, so it
samples its first token from the same logits row. A shared page is copied only when a sequence is
about to write into it (`pages_to_copy`).
NOTE: preemption. When pages run out, the newest running sequence is preempted: by recompute (its
pages are freed, it returns to the front of the queue with num_computed_tokens = 0) or, in swap
mode, by moving its pages to the host pool (it keeps its progress and comes back before any
waiting request); a full host pool falls back to recompute.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

from jpaged.core.block_manager import BlockManager
from jpaged.core.sequence import Sequence, SequenceStatus
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger("jpaged")
PREEMPTION_MODES = ("recompute", "swap")


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step, as plain data for the runner and sampler.

    NOTE: `token_ids` is the sequence's own list (prompt + output so far), handed over without a
    copy; the runner and sampler only read it, and only before the engine appends this step's token.
    """
    seq_id: int
    request_id: str
    num_computed_tokens: int     # positions num_computed_tokens .. + num_new_tokens - 1 run now
    num_new_tokens: int          # 0 for a sample forked this step: it reuses the row before it
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
    # Page moves the runner applies before the step, in this order:
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (device, host)
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)   # (host, device)
    pages_to_copy: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str = "recompute"):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode={preemption_mode!r} is not one of {PREEMPTION_MODES}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = {"recompute": 0, "swap": 0}
        self.num_swapped_out_pages = 0
        self.num_swapped_in_pages = 0
        self.num_cached_tokens = 0               # prompt tokens served by the prefix cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [])
        step = _Step(self.max_num_batched_tokens, out)
        i = 0
        while i < len(self.running) and step.budget > 0:
            seq = self.running[i]
            if seq.seq_id in step.seq_ids or seq.num_computed_tokens == seq.num_tokens or \
                    not step.has_rows_for(seq, self.max_num_seqs):
                i += 1              # forked in this step, a beam waiting for its siblings, or
                                    # (beams forked past max_num_seqs) no row left this step
            elif self._reserve(seq, min(seq.num_tokens - seq.num_computed_tokens, step.budget),
                               step):
                i += 1
        if not out.preempted:
            self._swap_in(step)
        if not out.preempted and not self.swapped:
            self._admit(step)
        return out

    def _reserve(self, seq: Sequence, n: int, step: "_Step") -> bool:
        """Pages (and private copies of shared ones) for `seq` to compute n more tokens,
        preempting the newest running sequences; False if `seq` itself had to go."""
        bm, start = self.block_manager, seq.num_computed_tokens
        while True:
            if bm.allocate(seq, start + n):
                copies = bm.make_writable(seq, start, start + n)
                if copies is not None:
                    step.out.pages_to_copy += copies
                    step.add(seq, n)
                    self._fork_if_prompt_done(seq, n, step)
                    return True
            victim = self.running.pop()
            self._preempt(victim, step.out)
            if victim is seq:
                return False

    def _swap_in(self, step: "_Step") -> None:
        bm = self.block_manager
        while self.swapped and step.budget > 0 and self._free_seats() >= 1:
            seq = self.swapped[0]
            if not step.has_rows_for(seq, self.max_num_seqs):
                return
            n = min(seq.num_tokens - seq.num_computed_tokens, step.budget)
            if bm.pages_needed(seq, seq.num_computed_tokens + n) > bm.num_free_pages:
                return                      # (its table is empty: this counts the host pages too)
            self.swapped.popleft()
            moves = bm.swap_in(seq)
            step.out.swap_in += moves
            self.num_swapped_in_pages += len(moves)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            assert bm.allocate(seq, seq.num_computed_tokens + n)
            step.add(seq, n)

    def _admit(self, step: "_Step") -> None:
        bm = self.block_manager
        while self.waiting and step.budget > 0:
            seq = self.waiting[0]
            if self._free_seats() < seq.seats or not step.has_rows_for(seq, self.max_num_seqs):
                return
            cached = bm.match_prefix(seq)
            seq.num_computed_tokens += cached
            n = min(seq.num_tokens - seq.num_computed_tokens, step.budget)
            if not bm.allocate(seq, seq.num_computed_tokens + n):
                bm.free(seq)                                  # give the matched pages back
                seq.num_computed_tokens = 0
                return
            self.num_cached_tokens += cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.add(seq, n)
            self._fork_if_prompt_done(seq, n, step)

    def _fork_if_prompt_done(self, seq: Sequence, n: int, step: "_Step") -> None:
        """In the step that computes sample 0's last prompt token, fork its pending samples."""
        if not seq.pending_forks or seq.num_computed_tokens + n < seq.num_prompt_tokens:
            return
        for child in seq.pending_forks:
            self.block_manager.fork(seq, child)
            child.num_computed_tokens = seq.num_prompt_tokens
            child.inherit_prefix_keys(seq)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            step.add(child, 0)
        seq.pending_forks = []

    def fork(self, parent: Sequence, child: Sequence) -> Sequence:
        """Make `child` a copy of `parent` sharing its pages (beam search): same tokens and
        progress, refcounts up; it runs (or waits) where the parent does."""
        child.token_ids = list(parent.token_ids)
        child.prompt_token_ids = parent.prompt_token_ids
        child.inherit_prefix_keys(parent)
        if parent.status is SequenceStatus.RUNNING:
            child.num_computed_tokens = parent.num_computed_tokens
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:                                   # a preempted parent: the child recomputes too
            child.status = SequenceStatus.WAITING
            self.waiting.append(child)
        return child

    def _free_seats(self) -> int:
        """max_num_seqs minus the running sequences and the samples they will fork."""
        return self.max_num_seqs - sum(s.seats for s in self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        out.preempted.append(seq.seq_id)
        out.scheduled[:] = [r for r in out.scheduled if r.seq_id != seq.seq_id]   # a fork of this step
        bm = self.block_manager
        if self.preemption_mode == "swap" and bm.can_swap_out(seq):
            moves = bm.swap_out(seq)
            out.swap_out += moves
            self.num_swapped_out_pages += len(moves)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.appendleft(seq)
            self.num_preemptions["swap"] += 1
            return
        if self.preemption_mode == "swap":
            logger.warning("swap space full (%d free host pages, sequence %d needs %d): preempting "
                           "it by recompute instead", len(bm.free_host_pages), seq.seq_id,
                           len(seq.block_table))
        self._recompute(seq)

    def _recompute(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self.block_manager.drop_host_pages(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions["recompute"] += 1

    def preempt_all_running(self) -> list[int]:
        """Preempt every running and swapped sequence by recompute (their KV went stale, e.g. new
        weights); they return to the front of the queue in their order. Returns their seq ids."""
        preempted = [seq.seq_id for seq in (*self.running, *self.swapped)]
        for seq in reversed(self.swapped):
            self._recompute(seq)
        self.swapped.clear()
        while self.running:
            self._recompute(self.running.pop())
        return preempted

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (e.g. a request cancelled by the caller), with the
        samples it has not forked yet."""
        for queue in (self.running, self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.free(seq)
        self.block_manager.drop_host_pages(seq)
        for child in [seq, *seq.pending_forks]:
            child.status = SequenceStatus.FINISHED
            child.finish_reason = "abort"
        seq.pending_forks = []


@dataclasses.dataclass
class _Step:
    budget: int
    out: SchedulerOutput
    seq_ids: set[int] = dataclasses.field(default_factory=set)

    def has_rows_for(self, seq: Sequence, max_rows: int) -> bool:
        """Room in this step for `seq` and the samples it may fork (rows <= max_num_seqs)."""
        return len(self.out.scheduled) + 1 + len(seq.pending_forks) <= max_rows

    def add(self, seq: Sequence, n: int) -> None:
        self.seq_ids.add(seq.seq_id)
        self.out.scheduled.append(ScheduledSeq(
            seq.seq_id, seq.request_id, seq.num_computed_tokens, n, seq.token_ids,
            seq.num_prompt_tokens, tuple(seq.block_table), seq.params, seq.seed))
        self.budget -= n
