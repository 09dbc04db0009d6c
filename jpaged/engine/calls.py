"""The calls that reach an engine from outside its step thread, as typed records.

`add_request` / `abort_request` may be called from any thread; they validate at once (errors go to
the caller) and leave one of these in the engine's inbox, which `step()` drains before it
schedules. Under jax.distributed process 0 also broadcasts them (pickled) and the other
processes replay them (`replay`), so every process schedules the same batch. Fields are passed by
name in one place each (`replay`), so a renamed parameter fails loudly instead of shifting.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from jpaged.lora import LoRARequest
from jpaged.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from jpaged.engine.engine import LLMEngine


@dataclasses.dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt: dict                    # {"prompt": text or None, "prompt_token_ids": [...]}
    params: SamplingParams | BeamSearchParams   # sampling seeds resolved (same on every process)
    lora_request: LoRARequest | None = None

    def replay(self, engine: "LLMEngine") -> None:
        engine.add_request(request_id=self.request_id, prompt=self.prompt, params=self.params,
                           lora_request=self.lora_request)


@dataclasses.dataclass(frozen=True)
class AbortRequest:
    request_id: str

    def replay(self, engine: "LLMEngine") -> None:
        engine.abort_request(request_id=self.request_id)


@dataclasses.dataclass(frozen=True)
class UnloadLoRA:
    """Forget a LoRA adapter once no live request uses it (LLMEngine.unload_lora)."""
    lora_name: str

    def replay(self, engine: "LLMEngine") -> None:
        engine.unload_lora(self.lora_name)


@dataclasses.dataclass(frozen=True)
class StopFollowers:
    """Process 0 is done: the other processes leave `run_follower`."""

    def replay(self, engine: "LLMEngine") -> None:
        engine.stopped = True


EngineCall = AddRequest | AbortRequest | UnloadLoRA | StopFollowers
