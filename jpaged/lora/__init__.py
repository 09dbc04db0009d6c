"""LoRA adapters (vLLM's API): `LoRARequest` names an adapter for a request; `peft.py` reads PEFT
adapters from disk into jpaged's LoRA layout (NumPy; no jax import here).

The layout (one adapter, stacked over the L layers; R = max_lora_rank, the adapter's rank r padded
with zeros; the scale alpha / r, or alpha / sqrt(r) with rsLoRA, folded into B):

  qkv_a     [L, D, 3, R]      A of q, k, v (they share their input x)
  q_b       [L, R, K, G, H]   B of q, its output grouped by KV head like wqkv's query part
  k_b, v_b  [L, R, K, H]
  o_a       [L, N*H, R]       o_b     [L, R, D]
  gate_up_a [L, D, 2, R]      gate_b, up_b [L, R, F]
  down_a    [L, F, R]         down_b  [L, R, D]

so a target's delta is x @ A @ B, added to the base matmul's output (jpaged/models/lora.py). A
target the adapter does not have is zeros. The engine stacks adapters into device slots (a slot
axis S next to R: jpaged/models/lora.py); `jpaged.generate(..., lora=...)` takes this dict as is.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: an adapter by name, a positive integer id, and its directory (PEFT's
    adapter_config.json + adapter_model.safetensors)."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty string, got "
                             f"{self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an int >= 1 (0 means no adapter in "
                             f"vLLM), got {self.lora_int_id!r}")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


def load_lora(path, config, max_rank: int | None = None, dtype="float32") -> dict:
    """A PEFT adapter directory as a LoRA params pytree (this layout, NumPy; rank `max_rank`, by
    default the adapter's own r) for `jpaged.generate(..., lora=...)` or `LLM.update_lora`.
    `config`: the model's ModelConfig (`model.config` of jpaged.load)."""
    from pathlib import Path

    from jpaged.lora.peft import load_peft_adapter, read_adapter_config
    path = Path(path)
    rank = max_rank or read_adapter_config(path, path.name)["r"]
    return load_peft_adapter(path, config, rank, dtype=dtype)


def stack_adapters(adapters: list[dict]) -> dict:
    """Several adapters (this layout, same rank) in the slotted layout for jpaged.generate's
    `lora` with `lora_index` (row b uses adapters[lora_index[b]])."""
    from jpaged.models.lora import stack_adapters as stack
    return stack(adapters)
