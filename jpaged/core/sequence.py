"""A sequence: one stream of tokens being generated, with its pages and progress.

NOTE: prefill and decode are one thing here (vLLM v1): `num_computed_tokens` catches up with
`num_tokens` a chunk at a time; a decode is a chunk of one token. Preemption by recompute just
resets `num_computed_tokens` to 0 after the pages are freed.
"""

from __future__ import annotations

import enum
import itertools

from jpaged.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"          # preempted with its pages moved to the host pool
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, seed: int, max_tokens: int,
                 lora_name: str | None = None):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index                      # which of the request's n outputs
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + output
        self.params = params
        self.seed = seed                        # per-sequence sampling seed
        self.max_tokens = max_tokens            # output budget after clamping to max_model_len
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_committed_pages = 0            # leading pages named in the prefix cache
        self.host_block_table: list[int] = []   # host pages while SWAPPED
        self.pending_forks: list[Sequence] = []  # n > 1: samples forked off when the prompt is done
        self.extra_seats = 0                    # seats held for beams not forked yet
        self._full_pages: list[tuple[bytes, tuple[int, ...]]] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict] = []
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict | None] = []   # with params.prompt_logprobs (vLLM's)
        self.lora_name = lora_name              # the LoRA adapter it runs with (None: the base)
        # with params.structured_outputs: its GrammarMatcher (core/structured.py), advanced by
        # each output token; it depends on the tokens only, so preemption leaves it as it is
        self.grammar = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def seats(self) -> int:
        """Scheduler seats (of max_num_seqs) this sequence holds: itself and the samples or
        beams it will fork."""
        return 1 + len(self.pending_forks) + self.extra_seats

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def full_pages(self, page_size: int, count: int) -> list[tuple[bytes, tuple[int, ...]]]:
        """(prefix-cache key, token ids) of the first `count` full pages; see page_key.

        NOTE: tokens are only ever appended, so the keys stay valid across preemption and forks
        and are computed once. The first page's parent is the LoRA adapter's name (None for the
        base model), so the KV of two adapters is never shared.
        """
        from jpaged.core.block_manager import page_key
        while len(self._full_pages) < count:
            i = len(self._full_pages)
            parent = self._full_pages[-1][0] if i else (
                None if self.lora_name is None else b"lora:" + self.lora_name.encode())
            tokens = tuple(self.token_ids[i * page_size:(i + 1) * page_size])
            self._full_pages.append((page_key(parent, tokens), tokens))
        return self._full_pages[:count]

    def inherit_prefix_keys(self, parent: "Sequence") -> None:
        """A fork has the parent's prompt: reuse its computed page keys."""
        self._full_pages = list(parent._full_pages)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, pages={self.block_table})")
