"""Tiny random HF models built from the shapes of real published configs (issue #18's families).

Layers and widths are reduced (hidden 64-128, 2-6 layers, vocab 512); head ratios, RoPE bases and
scalings, soft caps, query_pre_attn_scalar, the sliding/global layer pattern and the MoE routing
settings are the published ones. Two settings are reduced with the widths and say so: the sliding
windows of the Gemma cases (so that prompts of a few dozen tokens cross them; the real Gemma 3
window is checked separately, test_architectures.py) and LongRoPE's original context (4096 -> 64,
with max_position_embeddings kept 32x it, so both factor sets can be reached).

Every parameter is random: normal(0, 0.3), norms around their unit value, so logits are peaky and
greedy decoding never sits on a near-tie that summation order could flip.
"""

from __future__ import annotations

import numpy as np

SLIDING, FULL = "sliding_attention", "full_attention"
VOCAB = 512


def _longrope_factors(n: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """Short factors near 1 and long ones growing to ~40, the shape of Phi-3-mini-128k's."""
    rng = np.random.default_rng(seed)
    short = np.round(1.0 + 0.1 * np.sort(rng.random(n)), 4)
    long = np.round(np.geomspace(1.0, 40.0, n) * (1 + 0.05 * rng.random(n)), 4)
    return short.tolist(), long.tolist()


SHORT_FACTORS, LONG_FACTORS = _longrope_factors(16)
PHI3_ORIGINAL_CONTEXT = 64

# name -> (transformers config class, its arguments, the published model the shapes come from)
ARCHS = {
    "qwen3": ("Qwen3Config", dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
        max_position_embeddings=40960, tie_word_embeddings=False, rms_norm_eps=1e-6),
        "Qwen/Qwen3-8B: 32 q / 8 kv heads, q/k RMSNorm, rope 1e6, untied"),
    "gemma2": ("Gemma2Config", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=16,
        rope_theta=10000.0, max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0, bos_token_id=2, eos_token_id=1),
        "google/gemma-2-2b: 8 q / 4 kv heads, query_pre_attn_scalar 256, soft caps 50 / 30, "
        "sliding and global layers alternating (window 4096 -> 16), GeGLU, tied"),
    "gemma3": ("Gemma3TextConfig", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=256,
        sliding_window=16, max_position_embeddings=131072,
        rope_parameters={FULL: dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                         SLIDING: dict(rope_type="default", rope_theta=1e4)},
        pad_token_id=0, bos_token_id=2, eos_token_id=1),
        "google/gemma-3-4b-it (text): 8 q / 4 kv heads, 5 sliding : 1 global layers (window "
        "1024 -> 16), local RoPE base 1e4, global 1e6 with linear x8, q/k norm, tied"),
    "phi3": ("Phi3Config", dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=32 * PHI3_ORIGINAL_CONTEXT,
        original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=SHORT_FACTORS,
                             long_factor=LONG_FACTORS,
                             original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT),
        sliding_window=None, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        tie_word_embeddings=False),
        "microsoft/Phi-3-mini-128k-instruct: MHA, fused qkv_proj / gate_up_proj, LongRoPE "
        "(original context 4096 -> 64 of 32x it)"),
    "mixtral": ("MixtralConfig", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_local_experts=8,
        num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=4096),
        "mistralai/Mixtral-8x7B-v0.1: 32 q / 8 kv heads, 8 experts top-2, rope 1e6"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=1, head_dim=16, num_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=1e6,
        max_position_embeddings=40960, tie_word_embeddings=False),
        "Qwen/Qwen3-30B-A3B: 32 q / 4 kv heads, 128 experts top-8 (-> 16 top-4), "
        "norm_topk_prob, q/k norm; layer 1 made dense (mlp_only_layers) to mix the two"),
}


def build_hf_model(arch: str, path, seed: int = 0, **overrides):
    """The tiny random HF model of `arch`, saved as safetensors into `path`; returns it (eval)."""
    config_class, kwargs, _ = ARCHS[arch]
    return build_hf(config_class, {**kwargs, **overrides}, path, seed)


def build_hf(config_class: str, kwargs: dict, path, seed: int = 0):
    """A random HF model of a transformers config class (see the module docstring), saved."""
    import torch
    import transformers
    config = getattr(transformers, config_class)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    gen = torch.Generator().manual_seed(seed)
    unit = 0.0 if config_class.startswith("Gemma") else 1.0  # Gemma norms multiply by (1 + w)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(unit + 0.2 * noise if "norm" in name else 0.3 * noise)
    model.save_pretrained(path, safe_serialization=True)
    return model
