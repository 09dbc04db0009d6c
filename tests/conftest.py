"""Shared fixtures: a tiny random Llama checkpoint and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# NOTE: XLA's LLVM backend at optimisation level 0. Compiling dominates this suite (hundreds of
# step buckets over tiny and small models); level 0 compiles ~3x faster and the steps stay fast
# enough (measured here: the tiny-model engine tests 148 s -> 101 s, the SmolLM2 engine tests
# 215 s -> 186 s). The HLO passes (fusion, layout) are the same as in production; benchmarks and
# users run at XLA's default level.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
# NOTE: caches. A test run must not write to ~/.cache. Both of jpaged's caches point at one
# temporary directory for the whole session (and the subprocesses it starts): JAX's compilation
# cache, so the many engines built over the same models compile each step bucket once per session
# instead of once per engine (JAX still reports a hit as a backend compilation, so
# `backend_compiles` counts are unchanged), and the model cache, so the SmolLM2 GGUF is dequantized
# once per session. The converter's tests turn the model cache off (tests/checkpoint), and the
# tests of the caches themselves pass their own directories. Under pytest-xdist the workers inherit
# the controller's environment and share its directory (both caches are safe for concurrent
# processes: atomic renames), so a bucket or a conversion one worker made serves the other; only
# the process that made the directory removes it.
if "JPAGED_TEST_CACHE_DIR" not in os.environ:
    os.environ["JPAGED_TEST_CACHE_DIR"] = tempfile.mkdtemp(prefix="jpaged-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JPAGED_TEST_CACHE_DIR"], ignore_errors=True)
_CACHE = os.environ["JPAGED_TEST_CACHE_DIR"]
os.environ["JPAGED_COMPILATION_CACHE_DIR"] = os.path.join(_CACHE, "xla")
os.environ["JPAGED_MODEL_CACHE_DIR"] = os.path.join(_CACHE, "models")

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
def hf_greedy_batch():
    """The function below, as a fixture."""
    return _hf_greedy_batch


def _hf_greedy_batch(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of several prompts by one HF `generate` call (left-padded batch,
    EOS ignored as the engine's ignore_eos does: it may be generated, and does not stop)."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                             eos_token_id=None, max_new_tokens=max_new_tokens)
    return [row[width:].tolist() for row in out]


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
