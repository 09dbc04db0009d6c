"""Which LoRA adapter sits in which device slot: the scheduler's side of the adapter slots.

Slots 1..max_loras hold adapters (0 is "no adapter" and holds none). An adapter a running or
swapped sequence uses stays in its slot; a waiting sequence whose adapter is not resident takes
a free slot, else the least recently used slot no live sequence uses (its adapter is evicted from
the device, not forgotten: the engine keeps a host copy), else it waits: it is never failed.
A placement is reported as a load, (slot, adapter name), which the runner applies before the step.
"""

from __future__ import annotations

from collections import OrderedDict


class LoRASlots:
    def __init__(self, max_loras: int):
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        self.max_loras = max_loras
        self.slot_of: dict[str, int] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()   # resident adapters, oldest use first

    def acquire(self, name: str, in_use: set[str]) -> tuple[int, bool] | None:
        """(slot, newly placed) for adapter `name`, evicting the least recently used adapter
        outside `in_use` if no slot is free; None when every slot is in use (the caller waits)."""
        if name in self.slot_of:
            self._lru.move_to_end(name)
            return self.slot_of[name], False
        taken = set(self.slot_of.values())
        free = [s for s in range(1, self.max_loras + 1) if s not in taken]
        if free:
            slot = free[0]
        else:
            victim = next((n for n in self._lru if n not in in_use), None)
            if victim is None:
                return None
            slot = self.slot_of.pop(victim)
            del self._lru[victim]
        self.slot_of[name] = slot
        self._lru[name] = None
        return slot, True

    def forget(self, name: str) -> None:
        """Drop `name` from its slot (unloaded or updated: it is placed again when next needed)."""
        if self.slot_of.pop(name, None) is not None:
            del self._lru[name]
