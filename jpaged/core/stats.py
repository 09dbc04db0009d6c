"""The engine's counters and gauges: one dataclass, filled by the parts that own each number.

The engine makes one `Stats` and hands it to the block manager (prefix cache), the scheduler
(preemptions, swaps, requests) and the runner (compilations, stand-ins, device time), which count
into it as they work. `LLMEngine.stats()` returns a snapshot with the gauges (pages, queues) read at
that moment; `LLM.stats()`, the server's `/metrics` and the CLI all read that snapshot. Fields are
attributes, and also keys (`stats["kv_pages_used"]`) for code that treats it as a dict.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Stats:
    # KV pages (gauges, read by LLMEngine.stats())
    kv_pages_total: int = 0          # usable pages (page 0, the null page, is not counted)
    kv_pages_used: int = 0           # held by at least one sequence
    kv_pages_cached: int = 0         # free, but still holding a reusable prefix
    kv_pages_free: int = 0           # free and holding nothing reusable
    kv_page_size: int = 0            # tokens per page
    kv_cache_tokens: int = 0         # tokens the usable pages hold
    kv_cache_bytes: int = 0          # the pool's bytes (quantized caches hold more tokens in less)
    host_pages_used: int = 0         # the swap pool
    peak_kv_pages_used: int = 0
    # queues (gauges)
    num_requests_running: int = 0
    num_requests_waiting: int = 0    # waiting or swapped out
    num_seqs_running: int = 0
    num_seqs_waiting: int = 0
    num_seqs_swapped: int = 0
    # prefix cache (counters, block manager)
    prefix_cache_queries: int = 0    # full pages looked up
    prefix_cache_hits: int = 0       # of those, reused
    num_cached_tokens: int = 0       # prompt tokens served by the prefix cache
    # scheduler (counters)
    preemptions_recompute: int = 0
    preemptions_swap: int = 0
    swapped_out_pages: int = 0
    swapped_in_pages: int = 0
    # runner (counters)
    num_step_compilations: int = 0
    num_sampler_compilations: int = 0
    num_stand_in_steps: int = 0      # steps run in a larger compiled bucket while theirs compiled
    compile_seconds: float = 0.0     # spent compiling step buckets
    device_wait_seconds: float = 0.0  # host blocked on the device's results
    # engine (counters)
    num_steps: int = 0
    step_seconds: float = 0.0
    num_prompt_tokens: int = 0       # prompt tokens of requests added
    num_generation_tokens: int = 0   # tokens sampled and kept
    # speculative decoding (vLLM's spec_decode_* counters; scheduler, runner)
    spec_decode_num_drafts: int = 0          # rows that verified proposals
    spec_decode_num_draft_tokens: int = 0    # proposals verified
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()   # accepted at position j
    spec_decode_draft_seconds: float = 0.0   # draft model calls (layer_skip)
    spec_decode_verify_seconds: float = 0.0  # steps that verified proposals, end to end

    @property
    def num_compilations(self) -> int:
        return self.num_step_compilations + self.num_sampler_compilations

    @property
    def num_preemptions(self) -> int:
        return self.preemptions_recompute + self.preemptions_swap

    @property
    def spec_decode_acceptance_rate(self) -> float:
        """Accepted / verified proposals (0 when none)."""
        return self.spec_decode_num_accepted_tokens / max(self.spec_decode_num_draft_tokens, 1)

    @property
    def spec_decode_mean_accepted_length(self) -> float:
        """Tokens a speculating row gains per step: 1 + accepted proposals per draft (vLLM's
        mean acceptance length); 0 before any."""
        drafts = self.spec_decode_num_drafts
        return 1 + self.spec_decode_num_accepted_tokens / drafts if drafts else 0.0

    @property
    def host_seconds(self) -> float:
        """Step time that was neither compiling nor waiting on the device: scheduling, inputs,
        output processing, dispatch."""
        return self.step_seconds - self.compile_seconds - self.device_wait_seconds

    def __getitem__(self, name: str):
        return getattr(self, name)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(num_compilations=self.num_compilations, num_preemptions=self.num_preemptions,
                   spec_decode_acceptance_rate=self.spec_decode_acceptance_rate,
                   spec_decode_mean_accepted_length=self.spec_decode_mean_accepted_length)
        return out

    def copy(self) -> "Stats":
        return dataclasses.replace(self)
