"""jpaged: PagedAttention LLM inference natively in JAX."""

from jpaged.llm import LLM
from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
