"""Logits parity with HF transformers (torch, float32) for every Llama-family flavour jpaged runs.

Each case builds a tiny random HF model, saves it as safetensors, loads it through
`jpaged.checkpoint.loader.load_checkpoint` (the in-memory HF conversion), then runs `CausalLM.apply` on a ragged
batch built by the engine's own input builder (jpaged/engine/step_inputs.py): 3 sequences of
different lengths prefilled together (plus padding tokens on the null page), then decode steps with
`decode_only=True`. Every step's last-token logits must match HF's full
forward over the same prefix. Pages: size 4, page 0 reserved as the null page, block tables drawn
from a shuffled free list so no sequence's pages are contiguous.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jpaged.checkpoint.loader import load_checkpoint  # noqa: E402
from jpaged.core.step import ScheduledSeq  # noqa: E402
from jpaged.engine.buckets import StepKey  # noqa: E402
from jpaged.engine.step_inputs import build_step_inputs  # noqa: E402
from jpaged.models import CausalLM, KVCache, arrange_layers  # noqa: E402
from jpaged.sampling_params import SamplingParams  # noqa: E402

TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Batch:
    """A ragged batch: sequences (prompt + the tokens fed at each decode step) and the page layout."""
    sequences: list[list[int]]
    prompt_lens: tuple[int, ...]
    num_decode_steps: int
    page_size: int = 4
    pages_per_seq: int = 4            # P
    num_pages: int = 24               # page 0 is the null page
    num_padding_tokens: int = 3


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64)
LLAMA3_ROPE = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)   # small, so all three llama3 bands show up

CASES = {
    "llama2_mha_untied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama31_gqa_rope_parameters": ("LlamaConfig", dict(
        num_key_value_heads=2, rope_parameters=dict(rope_theta=500000.0, **LLAMA3_ROPE))),
    "llama31_gqa_rope_scaling_legacy": ("LlamaConfig", dict(
        num_key_value_heads=2, rope_parameters=dict(rope_theta=500000.0, **LLAMA3_ROPE))),
    "mistral_gqa_sliding_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=32)),
    "mistral_short_sliding_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen2_bias_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mqa_tied": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
}


def randomize_(model, seed: int) -> None:
    """HF inits norms to 1 and biases to 0; give every parameter random values so that a mapping
    mistake in any of them (a bias, a norm, a transpose) shows up in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(noise * (0.1 if name.endswith("bias") else 0.15))


def to_legacy_rope_config(path) -> None:
    """Rewrite a transformers>=5 config.json (rope_parameters) in the published rope_theta/rope_scaling style."""
    config_path = path / "config.json"
    hf = json.loads(config_path.read_text())
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = params
    config_path.write_text(json.dumps(hf))


def build_hf_model(case: str, path):
    config_class, overrides = CASES[case]
    config = getattr(transformers, config_class)(**TINY, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    randomize_(model, seed=sum(map(ord, case)))
    model.save_pretrained(path, safe_serialization=True)
    if case.endswith("legacy"):
        to_legacy_rope_config(path)
    return model


def allocate_block_tables(batch: Batch, seed: int = 0) -> np.ndarray:
    """[B, P] int32 from a shuffled free list of pages 1..num_pages-1 (page 0 is the null page)."""
    free = np.random.default_rng(seed).permutation(np.arange(1, batch.num_pages))
    num_seqs = len(batch.sequences)
    return free[:num_seqs * batch.pages_per_seq].reshape(num_seqs, batch.pages_per_seq).astype(np.int32)


def rows(batch: Batch, block_tables: np.ndarray, computed: list[int], new: list[int]):
    """Each sequence's share of a step, as the scheduler would hand it to the runner."""
    return [ScheduledSeq(seq_id=i, request_id=str(i), num_computed_tokens=c, num_new_tokens=n,
                         token_ids=seq[:c + n], num_prompt_tokens=p,
                         block_table=tuple(int(x) for x in table), params=SamplingParams(),
                         seed=0)
            for i, (seq, table, p, c, n) in enumerate(zip(batch.sequences, block_tables,
                                                          batch.prompt_lens, computed, new))]


def prefill_inputs(batch: Batch, block_tables: np.ndarray):
    """One ragged batch of every sequence's prompt, then padding tokens (on the null page 0)."""
    num_seqs = len(batch.sequences)
    key = StepKey(sum(batch.prompt_lens) + batch.num_padding_tokens, num_seqs,
                  batch.pages_per_seq, decode_only=False)
    return build_step_inputs(rows(batch, block_tables, [0] * num_seqs, list(batch.prompt_lens)),
                             key, batch.page_size)


def decode_inputs(batch: Batch, block_tables: np.ndarray, step: int):
    """Decode step `step`: each sequence brings its next token, at position prompt_len + step."""
    num_seqs = len(batch.sequences)
    key = StepKey(num_seqs, num_seqs, batch.pages_per_seq, decode_only=True)
    return build_step_inputs(rows(batch, block_tables, [n + step for n in batch.prompt_lens],
                                  [1] * num_seqs), key, batch.page_size)


def run_jpaged(checkpoint, batch: Batch, params=None) -> list[np.ndarray]:
    """Prefill, then decode steps; returns each step's [B, V] last-token logits. `params`: another
    placement of the checkpoint's params (default: the checkpoint's own, stacked over layers)."""
    model = CausalLM(checkpoint.config, dtype=jnp.float32)
    params = checkpoint.params if params is None else params
    step = jax.jit(lambda params, cache, inputs: model.apply(
        {"params": params}, inputs.token_ids, inputs.positions, cache, inputs.metadata))
    cache = KVCache.zeros(checkpoint.config, batch.num_pages, batch.page_size, jnp.float32)
    block_tables = allocate_block_tables(batch)
    logits, cache = step(params, cache, prefill_inputs(batch, block_tables))
    outputs = [np.asarray(logits)[:len(batch.sequences)]]
    for i in range(batch.num_decode_steps):
        logits, cache = step(params, cache, decode_inputs(batch, block_tables, i))
        outputs.append(np.asarray(logits))
    return outputs


def run_hf(model, batch: Batch) -> list[np.ndarray]:
    """HF's full forward per sequence; step k's logits sit at position prompt_len - 1 + k."""
    with torch.no_grad():
        full = [model(torch.tensor([seq])).logits[0].numpy() for seq in batch.sequences]
    return [np.stack([f[n - 1 + k] for f, n in zip(full, batch.prompt_lens)])
            for k in range(batch.num_decode_steps + 1)]


def max_errors(expected, actual) -> list[float]:
    return [float(np.abs(want - got).max()) for want, got in zip(expected, actual)]


def random_batch(vocab_size: int, seed: int = 1) -> Batch:
    prompt_lens, num_decode_steps = (7, 2, 5), 4
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(0, vocab_size, n + num_decode_steps).tolist() for n in prompt_lens]
    return Batch(sequences, prompt_lens, num_decode_steps)


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_model_logits_match_hf(case, tmp_path):
    hf_model = build_hf_model(case, tmp_path)
    checkpoint = load_checkpoint(tmp_path, progress=False)
    assert checkpoint.source == "hf" and checkpoint.dtype == "float32"
    batch = random_batch(TINY["vocab_size"])
    expected, actual = run_hf(hf_model, batch), run_jpaged(checkpoint, batch)
    errors = max_errors(expected, actual)
    assert max(errors) <= TOLERANCE, f"{case}: max abs logit error per step {errors}"
    assert np.abs(expected[0]).max() > 1.0, "logits too small for the tolerance to mean anything"


@pytest.mark.parametrize("case", ["llama2_mha_untied", "qwen2_bias_tied", "mistral_gqa_sliding_window"])
def test_per_layer_placement_matches_stacked(case, tmp_path):
    """The engine's CPU placement (one buffer per layer for each matmul weight, arrange_layers)
    computes what the stacked layout computes, on the same ragged prefill + decodes."""
    build_hf_model(case, tmp_path)
    checkpoint = load_checkpoint(tmp_path, progress=False)
    per_layer = arrange_layers(checkpoint.params, per_layer=True)
    layers = per_layer["layers"]
    assert sorted(layers["attn"]) == sorted({"wqkv", "wo"} | ({"bqkv"} if case.startswith(
        "qwen2") else set()))
    assert isinstance(layers["mlp"]["w_gate_up"], tuple) and len(layers["mlp"]["w_gate_up"]) == 2
    assert not isinstance(layers["attn_norm"]["scale"], tuple)      # small leaves stay stacked
    batch = random_batch(TINY["vocab_size"])
    stacked, got = run_jpaged(checkpoint, batch), run_jpaged(checkpoint, batch, params=per_layer)
    for want, have in zip(stacked, got):
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-5)
    restacked = arrange_layers(per_layer, per_layer=False)
    jax.tree.map(np.testing.assert_array_equal, restacked, checkpoint.params)


def test_config_flags_reach_the_model(tmp_path):
    """The cases above really exercise what they are named after."""
    flags = {}
    for case in ("llama31_gqa_rope_scaling_legacy", "mistral_gqa_sliding_window", "qwen2_bias_tied"):
        build_hf_model(case, tmp_path / case)
        flags[case] = load_checkpoint(tmp_path / case, progress=False).config
    assert flags["llama31_gqa_rope_scaling_legacy"].rope_scaling["rope_type"] == "llama3"
    assert flags["mistral_gqa_sliding_window"].sliding_window == 32
    assert flags["qwen2_bias_tied"].qkv_bias and flags["qwen2_bias_tied"].tie_word_embeddings


# --- the real SmolLM2-135M-Instruct (30 layers), converted in memory from its GGUF ------------------

# Measured 5e-5..8.4e-5 here on logits of magnitude ~28 (30 layers of float32 accumulation, whose
# order differs between XLA and torch): 2e-4 is a relative error of ~7e-6, still float32 tolerance,
# with room for another CPU's vector width. Greedy argmax must match exactly regardless.
SMOLLM2_TOLERANCE = 2e-4
SMOLLM2_PROMPTS = ("What is the capital of France?", "Write a haiku about paged memory.")


@pytest.fixture(scope="module")
def smollm2_checkpoint(smollm2_path):
    return load_checkpoint(smollm2_path, progress=False)


def smollm2_batch(model, tokenizer, num_decode_steps: int) -> Batch:
    """Two chat prompts, each followed by HF's own greedy continuation (fed back in decode steps)."""
    sequences, prompt_lens = [], []
    for text in SMOLLM2_PROMPTS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=num_decode_steps,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        sequences.append(out[0].tolist())
        prompt_lens.append(len(ids))
    return Batch(sequences, tuple(prompt_lens), num_decode_steps, page_size=16, pages_per_seq=4,
                 num_pages=16)


def test_smollm2_chat_logits_match_hf(smollm2_hf, smollm2_checkpoint):
    model, tokenizer = smollm2_hf
    batch = smollm2_batch(model, tokenizer, num_decode_steps=3)
    assert max(n + 3 for n in batch.prompt_lens) <= batch.page_size * batch.pages_per_seq
    expected, actual = run_hf(model, batch), run_jpaged(smollm2_checkpoint, batch)
    errors = max_errors(expected, actual)
    assert max(errors) <= SMOLLM2_TOLERANCE, f"max abs logit error per step {errors}"
    for want, got in zip(expected, actual):
        np.testing.assert_array_equal(want.argmax(-1), got.argmax(-1))
