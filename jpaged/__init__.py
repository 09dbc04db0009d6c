"""jpaged: PagedAttention LLM inference natively in JAX.

The public names are imported lazily (PEP 562), so `import jpaged.core` or `jpaged.config` stays
free of jax and `import jpaged` is fast; `from jpaged import LLM` loads the engine.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "LLM": "jpaged.entrypoints.llm",
    "SamplingParams": "jpaged.sampling_params",
    "BeamSearchParams": "jpaged.sampling_params",
    "RequestOutputKind": "jpaged.sampling_params",
    "StructuredOutputsParams": "jpaged.sampling_params",
    "LoRARequest": "jpaged.lora",
    "BeamSearchOutput": "jpaged.outputs",
    "BeamSearchSequence": "jpaged.outputs",
    "RequestOutput": "jpaged.outputs",
    "CompletionOutput": "jpaged.outputs",
    "Logprob": "jpaged.outputs",
    "load": "jpaged.generation",
    "generate": "jpaged.generation",
    "GenerateOutput": "jpaged.generation",
    "quantize": "jpaged.models.weights",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


_RENAMED = {"quantize": "quantize_params"}     # the public name -> the module's


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'jpaged' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
