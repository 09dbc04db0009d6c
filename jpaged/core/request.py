"""A request in the engine's core: its sequences and its status, in one place.

A request holds either its n samples (sample 0 runs the prompt; the others wait in its
`pending_forks` until the prompt is computed) or, for a beam search, its live beams (they change
every step: forked, extended, dropped) plus the hypotheses finished so far. The scheduler keeps the
registry of live requests (`Scheduler.requests`); nothing else keeps lists of their sequences.
"""

from __future__ import annotations

from jpaged.core.beam_search import BeamSearch, Hypothesis
from jpaged.core.sequence import Sequence
from jpaged.sampling_params import SamplingParams


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seqs: list[Sequence], beam: BeamSearch | None = None):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params                    # what every sequence samples with
        self.seqs = seqs                        # the samples, or the live beams
        self.beam = beam                        # set for a beam search
        self.finished_beams: list[Hypothesis] = []
        self.beams_done = False
        self.candidates: dict[int, list[tuple[int, float]]] = {}   # beam seq id -> top K this step

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beams_done
        return all(seq.is_finished for seq in self.seqs)

    def seq(self, seq_id: int) -> Sequence:
        return next(seq for seq in self.seqs if seq.seq_id == seq_id)

    @property
    def beams_ready(self) -> bool:
        """Every live beam has its candidates for the current length."""
        return all(seq.seq_id in self.candidates for seq in self.seqs)

    @classmethod
    def sampling(cls, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 base_seed: int, max_tokens: int, lora_name: str | None = None) -> "Request":
        """n samples of one prompt; sample i draws with seed base_seed + i * 0x9E3779B9."""
        seqs = [Sequence(request_id, i, prompt_token_ids, params,
                         (base_seed + i * 0x9E3779B9) % 2**32, max_tokens, lora_name)
                for i in range(params.n)]
        seqs[0].pending_forks = seqs[1:]       # forked off sample 0 when its prompt is computed
        return cls(request_id, prompt_token_ids, params, seqs)

    @classmethod
    def beam_search(cls, request_id: str, prompt_token_ids: list[int], search: BeamSearch,
                    params: SamplingParams, lora_name: str | None = None) -> "Request":
        """A beam search: one sequence runs the prompt holding the seats of all its beams."""
        first = Sequence(request_id, 0, prompt_token_ids, params, 0, search.max_tokens, lora_name)
        first.extra_seats = search.beam_width - 1
        return cls(request_id, prompt_token_ids, params, [first], beam=search)

    def __repr__(self) -> str:
        kind = f"beam_width={self.beam.beam_width}" if self.beam else f"n={len(self.seqs)}"
        return f"Request({self.request_id!r}, {kind}, finished={self.finished})"
