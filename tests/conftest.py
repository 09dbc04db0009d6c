"""Shared fixtures: a tiny random Llama checkpoint and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import os

import pytest

# NOTE: jpaged's persistent caches are off for the whole suite (and the subprocesses it starts): a
# compilation-cache hit would hide a compilation from `backend_compiles`, and a test run must not
# write to ~/.cache. The tests of the caches themselves pass temporary directories.
os.environ["JPAGED_COMPILATION_CACHE_DIR"] = "off"
os.environ["JPAGED_MODEL_CACHE_DIR"] = "off"

from jpaged.checkpoint.loader import default_model_path

# A tiny Llama: fast to compile and run, used by the engine tests (token-id prompts, no tokenizer).
TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=1,
                  bos_token_id=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """An HF directory (config.json + model.safetensors) of a random tiny Llama."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)   # peaky logits, so greedy never sits on a near-tie
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_llama_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).float().eval()


@pytest.fixture(scope="session")
def smollm2_path():
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """(model, tokenizer) of SmolLM2 loaded by transformers itself from the same GGUF, float32."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = dict(gguf_file=smollm2_path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32,
                                                              **kwargs).eval()
    return model, tokenizer


class BackendCompiles:
    """Counts XLA backend compilations as JAX itself reports them (jax.monitoring), independently
    of the engine's own counters."""
    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.names: list[str] = []          # the compiled functions' names, in order

    @property
    def count(self) -> int:
        return len(self.names)

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.names.append(str(kwargs.get("fun_name", "?")))


@pytest.fixture
def backend_compiles():
    import jax
    listener = BackendCompiles()
    jax.monitoring.register_event_duration_secs_listener(listener)
    yield listener
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="session")
def hf_greedy():
    """The function below, as a fixture (test modules cannot import from conftest reliably)."""
    return _hf_greedy


def _hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by HF transformers with its own KV cache, ignoring EOS."""
    import torch

    ids = torch.tensor([prompt_ids])
    out, past = [], None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            result = model(ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out
