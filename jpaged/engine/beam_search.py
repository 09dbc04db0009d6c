"""Beam search inside the engine: the host-side selection of each step's beams.

Each live beam is a sequence in the engine; a step computes its last token and the sampler returns,
on device, the top K = max(2, 1 + #EOS ids) x beam_width token log-probs of every beam (enough: any
candidate in the global top K is in its own beam's top K). `BeamSearch.select` then does what
HF transformers' `generate(num_beams=k, do_sample=False, early_stopping=True)` does per step:
  * rank all candidates by accumulated log-prob; keep the top K;
  * a candidate that ends (an EOS id, unless ignore_eos, or the max_tokens-th token) and ranks in
    the top k becomes a finished hypothesis scored cum_logprob / length ** length_penalty
    (length = output tokens, EOS included); the k best finished ones are kept;
  * the best k candidates that do not end are the next beams;
  * the search stops when k hypotheses have finished (early_stopping=True) or every top
    candidate ends (max_tokens).
The engine turns the chosen (parent, token) pairs into forks: a parent chosen twice shares its
pages with its new sibling (copy-on-write); a parent chosen by none is freed in the same step.
NOTE: vLLM's own `LLM.beam_search` runs all max_tokens steps and ranks by cum_logprob /
(prompt + output length) ** length_penalty; jpaged follows HF's scoring, which the issue's
correctness check uses, and says so in the README.
"""

from __future__ import annotations

import dataclasses

from jpaged.core.scheduler import Scheduler
from jpaged.core.sequence import Sequence
from jpaged.outputs import CompletionOutput


@dataclasses.dataclass(frozen=True)
class Candidate:
    score: float          # accumulated log-prob with this token
    parent: int           # index of the beam it extends
    token: int


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    output_tokens: tuple[int, ...]
    cum_logprob: float
    score: float          # cum_logprob / len(output_tokens) ** length_penalty


class BeamSearch:
    def __init__(self, beam_width: int, max_tokens: int, eos_token_ids: tuple[int, ...],
                 ignore_eos: bool, length_penalty: float):
        self.beam_width = beam_width
        self.max_tokens = max_tokens
        self.eos_token_ids = () if ignore_eos else tuple(eos_token_ids)
        self.length_penalty = length_penalty
        self.num_candidates = max(2, 1 + len(self.eos_token_ids)) * beam_width
        self.finished: list[Hypothesis] = []
        self.done = False

    def select(self, beams: list[tuple[tuple[int, ...], float]],
               candidates: list[list[tuple[int, float]]]) -> list[Candidate]:
        """One step. beams[i] = (output tokens so far, cum log-prob); candidates[i] = that beam's
        top (token, log-prob) pairs, best first. Returns the next beams (empty when done)."""
        ranked = sorted((Candidate(cum + lp, i, token)
                         for i, (_, cum) in enumerate(beams)
                         for token, lp in candidates[i][:self.num_candidates]),
                        key=lambda c: (-c.score, c.parent))[:self.num_candidates]
        length = len(beams[0][0]) + 1
        ends = [c.token in self.eos_token_ids or length >= self.max_tokens for c in ranked]
        new_finished = [Hypothesis((*beams[c.parent][0], c.token), c.score,
                                   c.score / length ** self.length_penalty)
                        for c, end in zip(ranked[:self.beam_width], ends) if end]
        self.finished = sorted(self.finished + new_finished,
                               key=lambda h: -h.score)[:self.beam_width]
        running = [c for c, end in zip(ranked, ends) if not end][:self.beam_width]
        self.done = len(self.finished) >= self.beam_width or all(ends)
        return [] if self.done else running


class BeamRequest:
    """The engine side of one beam-search request: its live beam sequences, their candidates
    as they arrive, and the forks and frees that each selection turns into."""

    def __init__(self, search: BeamSearch, first: Sequence):
        self.search = search
        self.seqs = [first]
        self.candidates: dict[int, list[tuple[int, float]]] = {}   # seq id -> this step's top K

    def record(self, seq: Sequence, top_ids, top_logprobs) -> None:
        k = self.search.num_candidates
        self.candidates[seq.seq_id] = [(int(t), float(lp))
                                       for t, lp in zip(top_ids[:k], top_logprobs[:k])]

    @property
    def ready(self) -> bool:
        """Every live beam has its candidates for the current length."""
        return all(seq.seq_id in self.candidates for seq in self.seqs)

    def advance(self, scheduler: Scheduler) -> tuple[list[Sequence], list[Sequence]]:
        """Select the next beams and make them: returns (new sequences, dropped sequences). When
        the search is done every live beam is dropped and `search.done` is set."""
        beams = [(tuple(seq.output_token_ids), seq.cumulative_logprob) for seq in self.seqs]
        chosen = self.search.select(beams, [self.candidates.pop(seq.seq_id) for seq in self.seqs])
        first_pick = {}
        new = []
        for c in chosen:                       # forks first: they copy the parent's tokens
            parent = self.seqs[c.parent]
            if c.parent in first_pick:
                child = scheduler.fork(parent, Sequence(parent.request_id, len(new), [],
                                                        parent.params, parent.seed,
                                                        parent.max_tokens))
                new.append((child, c))
            else:
                first_pick[c.parent] = c
        kept = [(self.seqs[i], c) for i, c in first_pick.items()]
        dropped = [seq for i, seq in enumerate(self.seqs) if i not in first_pick]
        for seq in dropped:                    # a beam no candidate extends: pages freed now
            scheduler.abort(seq)
        for seq, c in kept + new:
            seq.token_ids.append(c.token)
            seq.cumulative_logprob = c.score
        self.seqs = [seq for seq, _ in kept + new]
        for seq in self.seqs:                  # the beams exist now: no more seats held
            seq.extra_seats = 0
        return [seq for seq, _ in new], dropped

    def outputs(self, prompt_token_ids: list[int], decode) -> list[CompletionOutput]:
        """The finished hypotheses, best first, as CompletionOutputs (vLLM leaves a final EOS
        out of the text)."""
        out = []
        for rank, h in enumerate(self.search.finished):
            ends_in_eos = h.output_tokens[-1] in self.search.eos_token_ids
            text_ids = h.output_tokens[:-1] if ends_in_eos else h.output_tokens
            out.append(CompletionOutput(rank, decode(list(text_ids)), list(h.output_tokens),
                                        h.cum_logprob, None, "stop" if ends_in_eos else "length"))
        return out
