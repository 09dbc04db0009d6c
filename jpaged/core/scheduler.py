"""Continuous batching: pick the sequences and token counts for each step, then apply its result.

The step's life cycle (vLLM v1's seam): `schedule()` picks the batch and reserves its pages;
`update_from_output(scheduler_output, step_result)` applies what the device produced: it advances
the computed tokens, names newly full pages in the prefix cache, appends the sampled tokens with
their log-probs, stops sequences at the token level (length, EOS, stop ids, in vLLM's order),
finishes them, and turns beam-search selections into forks and frees. Stop strings, which need
text, are the output processor's; it finishes a sequence through `finish_sequence`.

Every step first serves the running sequences in arrival order (a decode needs one token, a
sequence still in prefill takes a chunk), then brings back swapped-out ones, then admits waiting
ones, all within `max_num_batched_tokens` and `max_num_seqs`. An admitted sequence starts after its
longest cached prefix.
NOTE: forks. The samples of an n > 1 request wait inside sample 0 (`pending_forks`, holding their
seats). In the step that computes the last prompt token, each is forked off sample 0's block
table (refcounts up, nothing recomputed) and scheduled with zero new tokens right after it, so it
samples its first token from the same logits row. A shared page is copied only when a sequence is
about to write into it (`pages_to_copy`).
NOTE: speculative decoding (core/speculative.py). A running sequence that decodes brings up to
k proposals after its last token (n-gram proposals made here; a draft model's filled in by the
runner), within the token budget, its max_tokens and max_model_len; its pages cover them all.
The step returns the accepted proposals plus one token; they are appended with the usual
token-level stops, `num_computed_tokens` advances past the accepted ones only, and the pages of
the rejected slots are released (BlockManager.trim) before `commit`, so the prefix cache never
names an unverified token.
NOTE: preemption. When pages run out, the newest running sequence is preempted: by recompute (its
pages are freed, it returns to the front of the queue with num_computed_tokens = 0) or, in swap
mode, by moving its pages to the host pool (it keeps its progress and comes back before any
waiting request); a full host pool falls back to recompute.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

from jpaged.core.beam_search import select_beams
from jpaged.core.block_manager import BlockManager
from jpaged.core.lora_slots import LoRASlots
from jpaged.core.request import Request
from jpaged.core.sequence import Sequence, SequenceStatus
from jpaged.core.speculative import NgramProposer, SpeculativeConfig
from jpaged.core.stats import Stats
from jpaged.core.step import PromptLogprobs, ScheduledSeq, SchedulerOutput, SeqUpdate, StepResult
from jpaged.outputs import Logprob

logger = logging.getLogger("jpaged")
PREEMPTION_MODES = ("recompute", "swap")
__all__ = ["Scheduler", "SchedulerOutput", "ScheduledSeq", "StepResult", "SeqUpdate",
           "PREEMPTION_MODES"]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str = "recompute", *, eos_token_ids: tuple[int, ...] = (),
                 max_model_len: int | None = None, stats: Stats | None = None,
                 sliding_window: int | None = None, speculative: SpeculativeConfig | None = None):
        """`sliding_window`: the window every layer of the model shares, if one does; pages behind
        it are released as sequences advance (BlockManager.release_before). `speculative`: see
        the NOTE on speculative decoding."""
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode={preemption_mode!r} is not one of {PREEMPTION_MODES}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.eos_token_ids = tuple(eos_token_ids)   # stop a sequence (unless ignore_eos)
        self.max_model_len = max_model_len
        self.sliding_window = sliding_window
        self.speculative = speculative
        self.proposer = NgramProposer(speculative) \
            if speculative is not None and speculative.method == "ngram" else None
        self.stats = stats or block_manager.stats
        self.lora_slots: LoRASlots | None = None   # the engine's, with enable_lora
        self.requests: dict[str, Request] = {}     # the registry of live requests
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()

    # ---- requests in and out ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request.seqs[0])      # samples / beams come from it by forks

    def abort_request(self, request_id: str) -> Request | None:
        """Drop a request wherever its sequences are (with samples not forked yet) and free its
        pages; None when it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self._release(seq, "abort")
        return request

    def finish_sequence(self, seq: Sequence, reason: str,
                        stop_reason: int | str | None = None) -> None:
        """End a running sequence (a stop string found by the output processor, or a token-level
        stop here): its pages are freed; its request leaves the registry once all are done."""
        self._release(seq, reason, stop_reason)
        request = self.requests.get(seq.request_id)
        if request is not None and request.finished:
            del self.requests[seq.request_id]

    def _release(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Take `seq` (and the samples it has not forked yet) out of every queue and free its
        device and host pages."""
        for queue in (self.running, self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.free(seq)
        self.block_manager.drop_host_pages(seq)
        for child in [seq, *seq.pending_forks]:
            child.status = SequenceStatus.FINISHED
            child.finish_reason, child.stop_reason = reason, stop_reason
        seq.pending_forks = []

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
                               step, *self._proposals(seq, step.budget)):
                i += 1
        if not out.preempted:
            self._swap_in(step)
        if not out.preempted and not self.swapped:
            self._admit(step)
        if self.lora_slots is not None:
            self._set_lora_slots(out)
        return out

    def _set_lora_slots(self, out: SchedulerOutput) -> None:
        """Each row's adapter slot (resident: running adapters are never evicted)."""
        slot_of = self.lora_slots.slot_of
        for i, row in enumerate(out.scheduled):
            name = self.requests[row.request_id].seqs[0].lora_name
            if name is not None:
                out.scheduled[i] = dataclasses.replace(row, lora_slot=slot_of[name])

    def _lora_placed(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Whether `seq`'s adapter (if any) has a device slot now, placing it if needed (a load
        in `out`); False when every slot holds an adapter that live sequences use."""
        if seq.lora_name is None or self.lora_slots is None:
            return True
        in_use = {s.lora_name for s in (*self.running, *self.swapped) if s.lora_name is not None}
        placed = self.lora_slots.acquire(seq.lora_name, in_use)
        if placed is None:
            return False
        if placed[1]:
            out.lora_loads.append((placed[0], seq.lora_name))
        return True

    def _proposals(self, seq: Sequence, budget: int) -> tuple[int, tuple[int, ...]]:
        """(number of speculative slots, n-gram proposals) for a running sequence's step: none
        unless it decodes (one token to compute) with room left in the budget, its max_tokens
        and max_model_len. Beams (they need every step's top-k candidates) and structured
        outputs (the grammar advances token by token) are never speculated."""
        spec = self.speculative
        if spec is None or seq.num_tokens - seq.num_computed_tokens != 1 or \
                self.requests[seq.request_id].beam is not None or \
                getattr(seq.params, "structured_outputs", None) is not None:
            return 0, ()
        k = min(spec.num_speculative_tokens, budget - 1,
                seq.max_tokens - seq.num_output_tokens - 1)
        if self.max_model_len is not None:
            k = min(k, self.max_model_len - seq.num_tokens)
        if k <= 0:
            return 0, ()
        if self.proposer is None:
            return k, ()                       # a draft fills them in (the runner)
        ids = self.proposer.propose(seq.token_ids, k)
        return len(ids), ids

    def _reserve(self, seq: Sequence, n: int, step: "_Step", num_spec: int = 0,
                 spec_ids: tuple[int, ...] = ()) -> bool:
        """Pages (and private copies of shared ones) for `seq` to compute n more tokens (and
        `num_spec` proposals after them), preempting the newest running sequences; False if
        `seq` itself had to go."""
        bm, start, n_all = self.block_manager, seq.num_computed_tokens, n + num_spec
        while True:
            if bm.allocate(seq, start + n_all):
                copies = bm.make_writable(seq, start, start + n_all)
                if copies is not None:
                    step.out.pages_to_copy += copies
                    step.add(seq, n, num_spec, spec_ids)
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
            self.stats.swapped_in_pages += len(moves)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            assert bm.allocate(seq, seq.num_computed_tokens + n)
            step.add(seq, n)

    def _admit(self, step: "_Step") -> None:
        """Admit waiting sequences in order; one whose LoRA adapter cannot get a device slot
        (all held by live sequences' adapters) keeps its place and waits, the others go on."""
        bm = self.block_manager
        skipped: list[Sequence] = []
        while self.waiting and step.budget > 0:
            seq = self.waiting[0]
            if self._free_seats() < seq.seats or not step.has_rows_for(seq, self.max_num_seqs):
                break
            if not self._lora_placed(seq, step.out):
                skipped.append(self.waiting.popleft())
                continue
            cached = bm.match_prefix(seq)
            seq.num_computed_tokens += cached
            n = min(seq.num_tokens - seq.num_computed_tokens, step.budget)
            if not bm.allocate(seq, seq.num_computed_tokens + n):
                bm.free(seq)                                  # give the matched pages back
                seq.num_computed_tokens = 0
                break
            self.stats.num_cached_tokens += cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.add(seq, n)
            self._fork_if_prompt_done(seq, n, step)
        self.waiting.extendleft(reversed(skipped))

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

    def _fork(self, parent: Sequence, child: Sequence) -> Sequence:
        """Make `child` a copy of `parent` sharing its pages (beam search): same tokens and
        progress, refcounts up; it runs (or waits) where the parent does."""
        child.token_ids = list(parent.token_ids)
        child.prompt_token_ids = parent.prompt_token_ids
        child.lora_name = parent.lora_name
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
            self.stats.swapped_out_pages += len(moves)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.appendleft(seq)
            self.stats.preemptions_swap += 1
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
        self.stats.preemptions_recompute += 1

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

    # ---- applying a step's result ---------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, result: StepResult) -> list[SeqUpdate]:
        """Apply what the device produced for `out` (see the module docstring). Returns the
        sequences that received tokens, and the beam searches that advanced, in row order."""
        updates: list[SeqUpdate] = []
        beams: dict[str, Request] = {}
        for i, row in enumerate(out.scheduled):
            request = self.requests[row.request_id]
            seq = request.seq(row.seq_id)
            if result.prompt_logprobs is not None and result.prompt_logprobs[i] is not None:
                _record_prompt_logprobs(seq, row, result.prompt_logprobs[i])
            if row.num_spec_tokens:
                updates.append(SeqUpdate(request, seq, self._apply_speculative(seq, row, result, i)))
                continue
            seq.num_computed_tokens += row.num_new_tokens
            self.block_manager.commit(seq)
            if self.sliding_window is not None:   # the next token sees positions > its own - W
                self.block_manager.release_before(
                    seq, seq.num_computed_tokens - self.sliding_window + 1)
            if not row.samples:
                continue
            if request.beam is not None:          # candidates only: the selection appends
                k = request.beam.num_candidates
                request.candidates[seq.seq_id] = [
                    (int(t), float(lp)) for t, lp in zip(result.top_ids[i, 0, :k],
                                                         result.top_logprobs[i, 0, :k])]
                beams[request.request_id] = request
                continue
            updates.append(SeqUpdate(request, seq, self._append(seq, result, i)))
        for request in beams.values():
            if request.beams_ready:
                self._advance_beams(request)
                updates.append(SeqUpdate(request, None, []))
        return updates

    def _apply_speculative(self, seq: Sequence, row: ScheduledSeq, result: StepResult,
                           i: int) -> list[int]:
        """A row that verified proposals: append the accepted ones and the sampler's token (token
        stops apply to each), advance past the accepted ones only, give back the pages of the
        rejected slots, then name the newly full (verified) pages in the prefix cache."""
        accepted = len(result.tokens(i)) - 1
        stats = self.stats
        stats.spec_decode_num_drafts += 1
        stats.spec_decode_num_draft_tokens += row.num_spec_tokens
        stats.spec_decode_num_accepted_tokens += accepted
        per_pos = list(stats.spec_decode_num_accepted_tokens_per_pos)
        per_pos += [0] * (accepted - len(per_pos))
        for j in range(accepted):
            per_pos[j] += 1
        stats.spec_decode_num_accepted_tokens_per_pos = tuple(per_pos)
        appended = self._append(seq, result, i)
        if seq.is_finished:                     # its pages are freed already
            return appended
        seq.num_computed_tokens = row.num_computed_tokens + 1 + accepted
        self.block_manager.trim(seq, seq.num_computed_tokens)
        self.block_manager.commit(seq)
        if self.sliding_window is not None:
            self.block_manager.release_before(
                seq, seq.num_computed_tokens - self.sliding_window + 1)
        return appended

    def _append(self, seq: Sequence, result: StepResult, row: int) -> list[int]:
        """Append row `row`'s tokens to `seq` until one stops it; returns those appended."""
        appended = []
        for j, token in enumerate(result.tokens(row)):
            seq.token_ids.append(token)
            appended.append(token)
            self.stats.num_generation_tokens += 1
            if seq.params.logprobs is not None:
                _record_logprobs(seq, token, result, row, j)
            finish = self._token_stop(seq, token)
            if seq.grammar is not None and finish is None:
                finish = _grammar_stop(seq, token, self.eos_token_ids)
            if finish is not None:
                self.finish_sequence(seq, *finish)
                break
        return appended

    def _token_stop(self, seq: Sequence, token: int) -> tuple[str, int | None] | None:
        """vLLM's check_stop order: the length cap, then (past min_tokens) EOS, then stop ids.
        Under min_tokens the sampler has banned both, so they cannot appear there anyway."""
        p = seq.params
        if seq.num_output_tokens >= seq.max_tokens or \
                (self.max_model_len is not None and seq.num_tokens >= self.max_model_len):
            return ("length", None)
        if seq.num_output_tokens < p.min_tokens:
            return None
        if not p.ignore_eos and token in self.eos_token_ids:
            return ("stop", None)
        if token in p.stop_token_ids:
            return ("stop", token)
        return None

    def _advance_beams(self, request: Request) -> None:
        """Select a beam search's next beams (beam_search.select_beams) and make them: a parent
        chosen twice is forked (pages shared, copy-on-write later), a parent chosen by none is
        freed now. When the search is done every live beam is freed and the request retires."""
        beams = [(tuple(seq.output_token_ids), seq.cumulative_logprob) for seq in request.seqs]
        selection = select_beams(request.beam, request.finished_beams, beams,
                                 [request.candidates.pop(seq.seq_id) for seq in request.seqs])
        request.finished_beams = selection.finished
        first_pick, new = {}, []
        for c in selection.beams:               # forks first: they copy the parent's tokens
            parent = request.seqs[c.parent]
            if c.parent in first_pick:
                child = Sequence(parent.request_id, len(new), [], parent.params, parent.seed,
                                 parent.max_tokens)
                new.append((self._fork(parent, child), c))
            else:
                first_pick[c.parent] = c
        for i, seq in enumerate(request.seqs):
            if i not in first_pick:               # a beam no candidate extends
                self._release(seq, "abort")
        extended = [(request.seqs[i], c) for i, c in first_pick.items()] + new
        for seq, c in extended:
            seq.token_ids.append(c.token)
            seq.cumulative_logprob = c.score
            seq.extra_seats = 0                   # the beams exist now: no more seats held
        request.seqs = [seq for seq, _ in extended]
        if selection.done:
            request.beams_done = True
            del self.requests[request.request_id]


def _grammar_stop(seq: Sequence, token: int, eos_token_ids: tuple[int, ...]
                  ) -> tuple[str, None] | None:
    """Advance a structured sequence's matcher by `token`: once its grammar is complete (only
    EOS could follow) the sequence stops with "stop" right after this token, without spending a
    step on the EOS (the token's text is kept: `grammar.completed_by_text`)."""
    grammar = seq.grammar
    if not grammar.accept(token):
        logger.warning("sequence %d of request %r: token %d does not fit its %s grammar (%s); "
                       "stopping it", seq.seq_id, seq.request_id, token, grammar.kind,
                       grammar.error)
        return ("stop", None)
    if not grammar.is_stopped:
        return None
    grammar.completed_by_text = token not in eos_token_ids
    return ("stop", None)


def _record_prompt_logprobs(seq: Sequence, row: ScheduledSeq, data: PromptLogprobs) -> None:
    """vLLM's prompt_logprobs: None for the first prompt token, then for prompt position p the
    log-prob of its token given the ones before (new token j predicts position start + j + 1).
    Positions already recorded (a sequence recomputed after preemption) are skipped."""
    k = seq.params.prompt_logprobs
    if not seq.prompt_logprobs:
        seq.prompt_logprobs.append(None)
    for j in range(row.num_new_tokens):
        position = row.num_computed_tokens + j + 1
        if position >= seq.num_prompt_tokens or position != len(seq.prompt_logprobs):
            continue
        token = seq.prompt_token_ids[position]
        entry = {token: Logprob(float(data.logprobs[j]), int(data.ranks[j]))}
        for rank, (tid, tlp) in enumerate(zip(data.top_ids[j, :k], data.top_logprobs[j, :k])):
            entry.setdefault(int(tid), Logprob(float(tlp), rank + 1))
        seq.prompt_logprobs.append(entry)


def _record_logprobs(seq: Sequence, token: int, result: StepResult, row: int, j: int) -> None:
    """The sampled token's log-prob and the top `params.logprobs` (vLLM's entry: the sampled
    token first, then the top ones by rank)."""
    k = seq.params.logprobs
    logprob = float(result.logprobs[row, j])
    seq.cumulative_logprob += logprob
    entry = {token: Logprob(logprob)}
    for rank, (tid, tlp) in enumerate(zip(result.top_ids[row, j, :k],
                                          result.top_logprobs[row, j, :k])):
        entry.setdefault(int(tid), Logprob(float(tlp), rank + 1))
    seq.logprobs.append(entry)


@dataclasses.dataclass
class _Step:
    budget: int
    out: SchedulerOutput
    seq_ids: set[int] = dataclasses.field(default_factory=set)

    def has_rows_for(self, seq: Sequence, max_rows: int) -> bool:
        """Room in this step for `seq` and the samples it may fork (rows <= max_num_seqs)."""
        return len(self.out.scheduled) + 1 + len(seq.pending_forks) <= max_rows

    def add(self, seq: Sequence, n: int, num_spec: int = 0, spec_ids: tuple[int, ...] = ()) -> None:
        self.seq_ids.add(seq.seq_id)
        self.out.scheduled.append(ScheduledSeq(
            seq.seq_id, seq.request_id, seq.num_computed_tokens, n + num_spec, seq.token_ids,
            seq.num_prompt_tokens, tuple(seq.block_table), seq.params, seq.seed,
            grammar=seq.grammar, num_spec_tokens=num_spec, spec_token_ids=spec_ids))
        self.budget -= n + num_spec
