"""Request outputs with vLLM's names."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None       # "stop" | "length" | None while running
    stop_reason: int | str | None = None   # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # with SamplingParams.prompt_logprobs: None for the first prompt token, then per token a dict
    # {token id: Logprob} holding the prompt token (its rank among all) and the top k (vLLM's)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclasses.dataclass
class BeamSearchSequence:
    """One finished beam (vLLM's names): `tokens` holds the prompt and the output."""
    tokens: list[int]
    text: str | None
    cum_logprob: float
    score: float                      # the ranking score: cum_logprob / len(output) ** length_penalty
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclasses.dataclass
class BeamSearchOutput:
    """Per prompt: its beams, best first (vLLM's `BeamSearchOutput`)."""
    sequences: list[BeamSearchSequence]
