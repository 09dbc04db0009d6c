"""What crosses the seam of one engine step, as plain data (vLLM v1's SchedulerOutput and
ModelRunnerOutput):

    Scheduler.schedule() -> SchedulerOutput ─► runner ─► StepResult
    Scheduler.update_from_output(SchedulerOutput, StepResult) -> list[SeqUpdate] ─► output processor
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from jpaged.sampling_params import SamplingParams

if TYPE_CHECKING:
    from jpaged.core.request import Request
    from jpaged.core.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step, as plain data for the runner and sampler.

    NOTE: `token_ids` is the sequence's own list (prompt + output so far), handed over without a
    copy; the runner and sampler only read it, and only before update_from_output appends this
    step's tokens (so everything derived from its length is fixed at scheduling time).
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
    # its LoRA adapter's device slot (0: none; core/lora_slots.py)
    lora_slot: int = dataclasses.field(default=0, kw_only=True)
    # its GrammarMatcher when it has structured outputs (the runner reads its next-token bitmask)
    grammar: object | None = dataclasses.field(default=None, kw_only=True)
    # speculative decoding: the last num_spec_tokens of the num_new_tokens are proposals that
    # follow the sequence's last token (spec_token_ids; empty until a draft model fills them)
    num_spec_tokens: int = 0
    spec_token_ids: tuple[int, ...] = ()
    # this step computes the sequence's last token, so its sample is kept (False for a chunk of
    # a prompt that goes on in the next step)
    samples: bool = dataclasses.field(init=False)
    num_output_tokens: int = dataclasses.field(init=False)   # before this step's tokens

    def __post_init__(self):
        object.__setattr__(self, "samples",
                           self.num_computed_tokens + self.num_new_tokens - self.num_spec_tokens
                           == len(self.token_ids))
        object.__setattr__(self, "num_output_tokens", len(self.token_ids) - self.num_prompt_tokens)


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[int]                       # seq ids preempted by this step
    # Page moves the runner applies before the step, in this order:
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (device, host)
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)   # (host, device)
    pages_to_copy: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst)
    # LoRA adapters placed in device slots for this step: (slot, adapter name), applied first
    lora_loads: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclasses.dataclass
class PromptLogprobs:
    """For each new token of a row (a prompt chunk): the log-prob of the prompt token that follows
    it, that token's rank (1 = the most likely), and the top K tokens with their log-probs."""
    logprobs: np.ndarray           # [n] float32
    ranks: np.ndarray              # [n] int32
    top_ids: np.ndarray            # [n, K] int32
    top_logprobs: np.ndarray       # [n, K] float32


@dataclasses.dataclass
class StepResult:
    """What the device produced for a SchedulerOutput, row for row (NumPy, B = its rows).

    NOTE: `token_ids` is [B, A] so that a step may accept several tokens per row (speculative
    decoding: the accepted proposals, then the sampler's own token): row i produced
    token_ids[i, :num_tokens[i]].
    """
    token_ids: np.ndarray                   # [B, A] int32
    num_tokens: np.ndarray | None = None    # [B] int32 (None: one token per row)
    logprobs: np.ndarray | None = None      # [B, A] float32, log-prob of each token (when asked)
    top_ids: np.ndarray | None = None       # [B, A, MAX_LOGPROBS] int32
    top_logprobs: np.ndarray | None = None  # [B, A, MAX_LOGPROBS] float32
    # per row, for rows of requests with prompt_logprobs that computed prompt tokens; else None
    prompt_logprobs: list[PromptLogprobs | None] | None = None

    def tokens(self, row: int) -> list[int]:
        count = 1 if self.num_tokens is None else int(self.num_tokens[row])
        return [int(t) for t in self.token_ids[row, :count]]


@dataclasses.dataclass
class SeqUpdate:
    """One sequence that received tokens in a step (`new_token_ids`, already appended and
    stop-checked at the token level), or, with `seq` None, a request whose beams advanced."""
    request: Request
    seq: Sequence | None
    new_token_ids: list[int]

