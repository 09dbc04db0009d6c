"""GGUF files of issue #18's families, written the way llama.cpp's convert_hf_to_gguf.py writes
them (its tensor names and metadata keys; q/k rows permuted for the `llama` architecture only;
Gemma's norm weights stored as 1 + w; experts stacked [E, ...]; Phi-3's fused qkv and gate/up
kept fused, LongRoPE factors as `rope_factors_long/short` tensors), from the tiny HF models of
tests/models/tiny_archs.py; loaded by jpaged, their logits equal HF's within 1e-4 relative."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_llama_parity import Batch, run_hf, run_jpaged  # noqa: E402
from tiny_archs import VOCAB, build_hf_model  # noqa: E402

from jpaged.checkpoint.loader import load_checkpoint  # noqa: E402
from jpaged.config import ModelConfig  # noqa: E402

# HF layer tensor -> llama.cpp's name (gguf-py's tensor map), per family where they differ.
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",                 # Phi-3
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",             # routers
}
GEMMA_NAMES = {"post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
           "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
GGUF_ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3",
             "mixtral": "llama", "qwen3_moe": "qwen3moe"}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """HF's tiny models on one torch thread: with two, on this shared 2-core machine, torch's
    threads spin against XLA's (measured: 32 greedy steps of a tiny MoE 16 s -> 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_metadata(writer, arch: str, c) -> None:
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch in ("gemma2", "gemma3", "phi3"):
        writer.add_sliding_window(c.sliding_window or 0)
    if arch == "gemma3" and rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if arch == "phi3":
        original = rope["original_max_position_embeddings"]
        scale = c.max_position_embeddings / original
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    if arch in ("mixtral", "qwen3_moe"):
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen3_moe":
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)


def write_gguf(model, hf_dir: Path, arch: str, path: Path) -> Path:
    """The GGUF of the HF checkpoint saved in hf_dir (its published tensor names: per-expert)."""
    from safetensors.numpy import load_file
    c = model.config
    sd = load_file(str(hf_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH[arch])
    write_metadata(writer, arch, c)
    shift = 1.0 if arch.startswith("gemma") else 0.0        # Gemma norms stored as 1 + w

    def add(name, w):
        writer.add_tensor(name, (w + shift if name.endswith("norm.weight") else w).astype(
            np.float32))
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    if arch == "phi3":
        rope = c.rope_parameters
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    names = {**LAYER_NAMES, **(GEMMA_NAMES if arch.startswith("gemma") else {})}
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        experts: dict[str, list] = {}
        for key, w in sd.items():
            if not key.startswith(prefix):
                continue
            hf = key[len(prefix):-len(".weight")]
            if ".experts." in hf:
                experts.setdefault(EXPERTS[hf.rsplit(".", 1)[1]], []).append(
                    (int(hf.split(".")[-2]), w))
                continue
            if arch == "mixtral" and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                w = permute(w, c.num_attention_heads if "q_" in hf else c.num_key_value_heads)
            add(f"blk.{i}.{names[hf]}.weight", w)
        for name, parts in experts.items():
            add(f"blk.{i}.{name}.weight", np.stack([w for _, w in sorted(parts)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", list(GGUF_ARCH))
def test_gguf_logits_match_hf(arch, tmp_path):
    # What a GGUF can hold: llama.cpp's qwen3moe has MoE on every layer (no dense layer here), and
    # it stores no query_pre_attn_scalar (the scale is 1/sqrt(H) below 27B, where the published
    # scalar equals H: so here too)
    overrides = {"qwen3_moe": {"mlp_only_layers": []}, "gemma2": {"query_pre_attn_scalar": 32},
                 "gemma3": {"query_pre_attn_scalar": 32}}.get(arch, {})
    hf = build_hf_model(arch, tmp_path / "hf", seed=2, **overrides)
    checkpoint = load_checkpoint(write_gguf(hf, tmp_path / "hf", arch, tmp_path / f"{arch}.gguf"),
                                 progress=False)
    reference = ModelConfig.from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    got = checkpoint.config
    for field in ("architecture", "num_kv_heads", "head_dim", "layer_types", "sliding_window",
                  "rope_scaling", "local_rope_theta", "attn_scale", "attn_soft_cap",
                  "final_soft_cap", "norm_offset", "num_experts", "moe_layers", "norm_topk_prob",
                  "tie_word_embeddings", "embed_scale", "hidden_act"):
        assert _float32(getattr(got, field)) == _float32(getattr(reference, field)), field
    rng = np.random.default_rng(3)
    lens = (7, 12)                                  # one ragged prefill: the weights are the point
    batch = Batch([rng.integers(3, VOCAB, n).tolist() for n in lens], lens, 0)
    if arch == "phi3":                      # the short LongRoPE factors, as HF on these lengths
        import dataclasses
        checkpoint = dataclasses.replace(checkpoint, config=dataclasses.replace(got,
                                                                                 max_model_len=64))
    want, have = run_hf(hf, batch), run_jpaged(checkpoint, batch)
    errors = [float(np.abs(w - h).max() / np.abs(w).max()) for w, h in zip(want, have)]
    assert max(errors) <= 1e-4, errors


def _float32(value):
    """LongRoPE's factors as float32 (GGUF stores them so; the model computes in float32)."""
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    if isinstance(value, list):
        return np.asarray(value, np.float32).tolist()
    return value
