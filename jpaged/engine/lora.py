"""The engine's LoRA adapters: the registry, a host LRU cache, and the device slots.

- registry: adapter name -> its LoRARequest (path) or, for adapters given as arrays
  (`update_lora`), nothing to reload from;
- host cache: up to `max_cpu_loras` adapters read from disk, in jpaged/lora's layout at rank
  max_lora_rank (NumPy), least recently used dropped first (re-read from disk when needed again;
  adapters given as arrays are never dropped);
- device slots: the slotted layout of jpaged/models/lora.py with S = max_loras, one argument of
  the jitted step. Which adapter is in which slot is the scheduler's (core/lora_slots.py); a
  placement arrives as a load (slot, name) in the SchedulerOutput and `apply_loads` writes that
  slot with one jitted update (the weights donated), compiled once: nothing else recompiles.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import jax
import numpy as np

from jpaged.core.step import ScheduledSeq
from jpaged.lora import LoRARequest
from jpaged.lora.peft import LoRAError, load_peft_adapter, lora_shapes
from jpaged.models.lora import LoRABatch, write_slot, zeros_slotted

logger = logging.getLogger("jpaged")


class LoRAManager:
    def __init__(self, model_config, *, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int | None, dtype, per_layer: bool, device=None):
        if max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {max_lora_rank}")
        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras "
                             f"({max_loras}), as in vLLM")
        self.config = model_config
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = (max_loras, max_lora_rank,
                                                                  max_cpu_loras)
        self.dtype = np.dtype(dtype)
        self.shapes = lora_shapes(model_config, max_lora_rank)
        self.weights = zeros_slotted(self.shapes, max_loras, self.dtype, per_layer, device)
        self.requests: dict[str, LoRARequest | None] = {}    # None: given as arrays
        self._host: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._pinned: set[str] = set()                       # given as arrays: never dropped
        self._write = jax.jit(write_slot, donate_argnums=0)
        self.num_loads = 0                                   # device slot writes so far

    # ---- the registry ---------------------------------------------------------------------
    def register(self, request: LoRARequest) -> None:
        """Know `request`'s adapter by its name, reading it from disk now if new (LoRAError
        names what does not fit). A name already known with another path is refused."""
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a jpaged.LoRARequest, got "
                             f"{type(request).__name__}")
        name = request.lora_name
        if name in self.requests:
            known = self.requests[name]
            if known is not None and request.lora_path and known.lora_path != request.lora_path:
                raise LoRAError(f"LoRA adapter {name!r} is loaded from {known.lora_path}; "
                                f"lora_path {request.lora_path} differs: unload it first or "
                                f"pick another lora_name")
            return
        if not request.lora_path:
            raise LoRAError(f"LoRA adapter {name!r} is not loaded and its LoRARequest has no "
                            f"lora_path; give the adapter's directory")
        self._cache(name, self._read(request))
        self.requests[name] = request
        logger.info("LoRA adapter %r registered from %s", name, request.lora_path)

    def set_weights(self, name: str, adapter: dict) -> None:
        """Register or replace adapter `name` with arrays in jpaged/lora's layout (rank <=
        max_lora_rank; padded here)."""
        self._cache(name, self.check(name, adapter), pinned=True)
        self.requests[name] = None

    def remove(self, name: str) -> None:
        self.requests.pop(name, None)
        self._host.pop(name, None)
        self._pinned.discard(name)

    def names(self) -> list[str]:
        return list(self.requests)

    # ---- device slots ---------------------------------------------------------------------
    def apply_loads(self, loads: list[tuple[int, str]]) -> None:
        """Write each (slot, name) into the device slots (slot 1.. = array index 0..)."""
        for slot, name in loads:
            self.weights = self._write(self.weights, self._adapter(name), np.int32(slot - 1))
            self.num_loads += 1
            logger.debug("LoRA adapter %r placed in device slot %d", name, slot)

    def batch(self, rows: list[ScheduledSeq], num_tokens: int) -> LoRABatch:
        """The step's LoRA argument: the slots and each of its `num_tokens` tokens' slot."""
        slots = np.zeros(num_tokens, np.int32)
        lens = [r.num_new_tokens for r in rows]
        real = sum(lens)
        if real:
            slots[:real] = np.repeat(np.array([r.lora_slot for r in rows], np.int32), lens)
        return LoRABatch(self.weights, slots)

    # ---- internals ------------------------------------------------------------------------
    def check(self, name: str, adapter: dict) -> dict[str, np.ndarray]:
        """`adapter` in the layout at rank max_lora_rank (zero-padded), or LoRAError naming the
        leaf that does not fit."""
        if not isinstance(adapter, dict) or set(adapter) != set(self.shapes):
            got = sorted(adapter) if isinstance(adapter, dict) else type(adapter).__name__
            raise LoRAError(f"LoRA adapter {name!r}: expected a dict with leaves "
                            f"{sorted(self.shapes)} (jpaged/lora's layout), got {got}")
        out = {}
        for leaf, shape in self.shapes.items():
            w = np.asarray(adapter[leaf], self.dtype)
            rank_axis = w.ndim - 1 if leaf.endswith("_a") else 1
            rank = w.shape[rank_axis] if w.ndim == len(shape) else -1
            fits = (w.ndim == len(shape) and rank <= shape[rank_axis] and
                    all(a == b for i, (a, b) in enumerate(zip(w.shape, shape)) if i != rank_axis))
            if not fits:
                raise LoRAError(f"LoRA adapter {name!r}: leaf {leaf!r} has shape "
                                f"{list(w.shape)}; this engine needs {list(shape)} with the rank "
                                f"axis ({rank_axis}) at most max_lora_rank={self.max_lora_rank}")
            pad = [(0, 0)] * w.ndim
            pad[rank_axis] = (0, shape[rank_axis] - rank)
            out[leaf] = np.pad(w, pad)
        return out

    def _read(self, request: LoRARequest) -> dict[str, np.ndarray]:
        return load_peft_adapter(request.lora_path, self.config, self.max_lora_rank,
                                 name=request.lora_name, dtype=self.dtype)

    def _adapter(self, name: str) -> dict[str, np.ndarray]:
        if name in self._host:
            self._host.move_to_end(name)
            return self._host[name]
        request = self.requests.get(name)
        if request is None:
            raise LoRAError(f"LoRA adapter {name!r} is not registered")
        adapter = self._read(request)                    # dropped from the host cache: re-read
        self._cache(name, adapter)
        return adapter

    def _cache(self, name: str, adapter: dict, pinned: bool = False) -> None:
        self._host[name] = adapter
        self._host.move_to_end(name)
        if pinned:
            self._pinned.add(name)
        while len(self._host) > self.max_cpu_loras:
            victim = next((n for n in self._host if n not in self._pinned and n != name), None)
            if victim is None:
                break
            del self._host[victim]
