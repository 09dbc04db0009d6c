"""`jpaged.load` + the pure, jittable `jpaged.generate`: tokens equal to HF transformers' on tiny
random models of each family and to the engine's on SmolLM2, per-sequence EOS, rng semantics under
vmap, one compilation for repeated shapes, and params sharded by heads over a 4-device CPU mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpaged
from jpaged.checkpoint.loader import LoadedCheckpoint
from jpaged.generation import GenerateOutput, generate
from jpaged.models import CausalLM, arrange_layers
from jpaged.models.random_weights import random_checkpoint

STATIC = ("model", "max_new_tokens", "page_size", "num_pages", "eos_token_id",
          "min_new_tokens")
GEN = jax.jit(generate, static_argnames=STATIC)            # temperature etc. traced
GEN_STATIC_T = jax.jit(generate, static_argnames=STATIC + ("temperature",))

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128)
FAMILIES = {
    "llama31_gqa_untied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                               rope_parameters=dict(
                                                   rope_type="llama3", rope_theta=500000.0,
                                                   factor=4.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0,
                                                   original_max_position_embeddings=16))),
    "mistral_sliding_window_4": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen2_bias_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}
PROMPTS = [[5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 200], [250, 1]]
MAX_NEW = 8



def with_devices(count: int) -> str:
    """XLA_FLAGS for a subprocess with `count` CPU devices, keeping the suite's own flags."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"

def padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """[B, W] right-padded with garbage (which generate must ignore), and the lengths [B]."""
    width = max(map(len, prompts))
    tokens = np.full((len(prompts), width), 77, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def build_hf(config_class: str, overrides: dict, path, seed: int = 0):
    """A tiny random HF model saved to `path` (every weight random, peaky logits)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_class)(**{**TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else
                        noise * (0.1 if name.endswith("bias") else 0.3))
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_greedy_with_logprobs(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """HF's full forward over the whole prefix at every step (no cache): tokens and logprobs."""
    import torch

    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
            ids.append(int(lp.argmax()))
            logprobs.append(float(lp[ids[-1]]))
    return ids[len(prompt):], logprobs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_jitted_greedy_matches_hf_on_each_family(family, tmp_path):
    config_class, overrides = FAMILIES[family]
    hf_model = build_hf(config_class, overrides, tmp_path)
    model, params, tokenizer = jpaged.load(tmp_path)
    assert isinstance(model, CausalLM) and tokenizer is None
    assert model.config.architecture == config_class[:-len("Config")].lower()
    tokens, lengths = padded(PROMPTS)
    # temperature traced (not static): the sampler's per-row greedy branch, still exact argmax
    out = GEN(model, params, tokens, lengths, max_new_tokens=MAX_NEW, rng=jax.random.key(0),
              temperature=0.0, page_size=4)
    assert isinstance(out, GenerateOutput) and out.tokens.shape == (3, MAX_NEW)
    for b, prompt in enumerate(PROMPTS):
        want_tokens, want_logprobs = hf_greedy_with_logprobs(hf_model, prompt, MAX_NEW)
        assert out.tokens[b].tolist() == want_tokens, f"{family} row {b}"
        np.testing.assert_allclose(np.asarray(out.logprobs[b]), want_logprobs, atol=1e-4)
    assert out.lengths.tolist() == [MAX_NEW] * 3


@pytest.fixture(scope="module")
def random_model():
    """Small random weights (std 0.02): near-uniform next-token distributions, so samplings vary."""
    checkpoint = random_checkpoint(dict(architectures=["LlamaForCausalLM"], **TINY,
                                        num_key_value_heads=2), "float32", seed=3)
    return CausalLM(checkpoint.config), checkpoint.params


def test_same_rng_same_tokens_and_vmap_over_rngs_gives_distinct_samplings(random_model):
    model, params = random_model
    tokens, lengths = padded(PROMPTS)
    call = dict(max_new_tokens=MAX_NEW, temperature=1.0, page_size=4)
    first = GEN(model, params, tokens, lengths, rng=jax.random.key(7), **call)
    again = GEN(model, params, tokens, lengths, rng=jax.random.key(7), **call)
    assert first.tokens.tolist() == again.tokens.tolist()
    keys = jax.random.split(jax.random.key(1), 4)
    batched = jax.jit(jax.vmap(lambda k: generate(model, params, tokens, lengths, rng=k, **call)))(keys)
    assert batched.tokens.shape == (4, 3, MAX_NEW)
    samplings = {tuple(batched.tokens[k].ravel().tolist()) for k in range(4)}
    assert len(samplings) == 4
    # Each vmapped row is exactly the unbatched call with that key.
    single = GEN(model, params, tokens, lengths, rng=keys[2], **call)
    assert batched.tokens[2].tolist() == single.tokens.tolist()
    np.testing.assert_allclose(np.asarray(batched.logprobs[2]), np.asarray(single.logprobs), atol=1e-5)
    # top_k=1 leaves one candidate: temperature 1 then samples the greedy tokens.
    greedy = GEN(model, params, tokens, lengths, rng=jax.random.key(0), max_new_tokens=MAX_NEW,
                 temperature=0.0, page_size=4)
    top1 = GEN(model, params, tokens, lengths, rng=jax.random.key(5), top_k=1, **call)
    assert top1.tokens.tolist() == greedy.tokens.tolist() != first.tokens.tolist()


def test_per_sequence_stop_at_eos_pads_with_zero(random_model):
    model, params = random_model
    tokens, lengths = padded(PROMPTS)
    full = GEN(model, params, tokens, lengths, max_new_tokens=MAX_NEW, rng=jax.random.key(0),
               temperature=0.0, page_size=4)
    eos = int(full.tokens[1, 3])                      # row 1 stops at its 4th token
    out = GEN(model, params, tokens, lengths, max_new_tokens=MAX_NEW, rng=jax.random.key(0),
              temperature=0.0, page_size=4, eos_token_id=(eos, 255))
    for b in range(3):
        row = full.tokens[b].tolist()
        n = next((i + 1 for i, t in enumerate(row) if t in (eos, 255)), MAX_NEW)
        assert int(out.lengths[b]) == n
        assert out.tokens[b].tolist() == row[:n] + [0] * (MAX_NEW - n)
        np.testing.assert_allclose(np.asarray(out.logprobs[b, :n]), np.asarray(full.logprobs[b, :n]),
                                   atol=1e-6)
        assert not np.asarray(out.logprobs[b, n:]).any()
    assert int(out.lengths[1]) == 4
    # min_new_tokens bans the EOS ids (vLLM's min_tokens): no stop, and row 1's 4th token changes.
    banned = GEN(model, params, tokens, lengths, max_new_tokens=MAX_NEW, rng=jax.random.key(0),
                 temperature=0.0, page_size=4, eos_token_id=(eos, 255), min_new_tokens=MAX_NEW)
    assert banned.lengths.tolist() == [MAX_NEW] * 3
    assert not np.isin(np.asarray(banned.tokens), [eos, 255]).any()
    assert banned.tokens[1, :3].tolist() == full.tokens[1, :3].tolist()
    assert float(banned.logprobs[1, 3]) < float(full.logprobs[1, 3])     # the runner-up


def test_both_placements_give_the_same_tokens(random_model):
    """The layer stack per layer (the CPU placement) and stacked, through generate."""
    model, params = random_model
    tokens, lengths = padded(PROMPTS)
    call = dict(max_new_tokens=MAX_NEW, rng=jax.random.key(2), temperature=1.0, page_size=4)
    split = GEN(model, arrange_layers(params, per_layer=True), tokens, lengths, **call)
    stacked = GEN(model, arrange_layers(params, per_layer=False), tokens, lengths, **call)
    assert split.tokens.tolist() == stacked.tokens.tolist()
    np.testing.assert_allclose(np.asarray(split.logprobs), np.asarray(stacked.logprobs), atol=1e-5)


def test_second_call_with_same_shapes_does_not_compile(random_model, backend_compiles):
    model, params = random_model
    tokens, lengths = padded(PROMPTS)
    GEN(model, params, tokens, lengths, max_new_tokens=5, rng=jax.random.key(0), temperature=0.0,
        page_size=8).tokens.block_until_ready()
    assert backend_compiles.count > 0
    before = backend_compiles.count
    other, other_lengths = padded([[3] * 11, [4, 5], [6, 7, 8]])
    out = GEN(CausalLM(model.config), params, other, other_lengths, max_new_tokens=5,
              rng=jax.random.key(9), temperature=0.5, page_size=8)
    out.tokens.block_until_ready()
    assert backend_compiles.count == before


def test_bad_arguments_raise_naming_the_field(random_model):
    model, params = random_model
    tokens, lengths = padded(PROMPTS)
    with pytest.raises(ValueError, match=r"num_pages=10 is too small: 3 sequences x 5 pages of 4 "
                                         r"tokens \+ the null page need 16"):
        generate(model, params, tokens, lengths, max_new_tokens=8, rng=jax.random.key(0),
                 page_size=4, num_pages=10)
    with pytest.raises(ValueError, match=r"prompt_lengths has shape \(2,\), but prompt_tokens holds 3"):
        generate(model, params, tokens, lengths[:2], max_new_tokens=8, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings \\(128\\)"):
        generate(model, params, tokens, lengths, max_new_tokens=200, rng=jax.random.key(0))


def test_public_names():
    import jpaged.generation
    assert jpaged.generate is jpaged.generation.generate      # not shadowed by a submodule
    assert jpaged.load is jpaged.generation.load
    assert {"load", "generate", "GenerateOutput"} <= set(jpaged.__all__)


# --- the real SmolLM2: generate equals the engine ---------------------------------------------------

def test_jitted_generate_equals_engine_on_smollm2(smollm2_path):
    model, params, tokenizer = jpaged.load(smollm2_path)
    assert model.config.eos_token_ids == (2,) and model.dtype == jnp.float32
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
               for q in ("What is the capital of France?", "Why is the sky blue?",
                         "Name three painters.")]
    checkpoint = LoadedCheckpoint(model.config, params, "float32", tokenizer,
                                  model.config.eos_token_ids, "gguf", smollm2_path)
    llm = jpaged.LLM.from_checkpoint(checkpoint, num_pages=64, max_model_len=256, max_num_seqs=4)
    requests = [{"prompt_token_ids": p} for p in prompts]
    tokens, lengths = padded(prompts)
    for eos, ignore_eos in ((None, True), (model.config.eos_token_ids, False)):
        engine_out = llm.generate(requests, jpaged.SamplingParams(
            temperature=0.0, max_tokens=20, ignore_eos=ignore_eos), use_tqdm=False)
        out = GEN_STATIC_T(model, params, tokens, lengths, max_new_tokens=20,
                           rng=jax.random.key(0), eos_token_id=eos)
        for b, request in enumerate(engine_out):
            want = request.outputs[0].token_ids
            assert int(out.lengths[b]) == len(want)
            assert out.tokens[b].tolist() == want + [0] * (20 - len(want)), f"eos={eos} row {b}"
    assert out.lengths.tolist()[0] == 8 and out.tokens[0, 7] == 2       # "...is Paris." <|im_end|>
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)


# --- params sharded by heads over a 4-device CPU mesh -----------------------------------------------

MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jpaged
    from jpaged.generation import generate
    from jpaged.models import arrange_layers

    assert jax.device_count() == 4, jax.devices()
    model, params, _ = jpaged.load(sys.argv[1])
    params = arrange_layers(params, per_layer=False)      # stacked [L, ...] leaves, to shard
    tokens, lengths = (np.asarray(x, np.int32) for x in json.loads(sys.argv[2]))
    mesh = Mesh(np.array(jax.devices()), ("heads",))
    HEAD_AXIS = {"wqkv": 2, "bqkv": 1, "wo": 1}   # wqkv [L, D, K, G+2, H] by KV head, wo by rows

    def spec(path, leaf):
        name = jax.tree_util.keystr(path[-1:])[2:-2]
        axes = [None] * leaf.ndim
        if "attn" in jax.tree_util.keystr(path) and name in HEAD_AXIS:
            axes[HEAD_AXIS[name]] = "heads"
        return NamedSharding(mesh, P(*axes))
    sharded = jax.device_put(params, jax.tree_util.tree_map_with_path(spec, params))
    gen = jax.jit(generate, static_argnames=("model", "max_new_tokens", "page_size"))
    args = dict(max_new_tokens=int(sys.argv[3]), rng=jax.random.key(0), page_size=4)
    hlo = gen.lower(model, sharded, tokens, lengths, **args).compile().as_text()
    out = {"sharded": gen(model, sharded, tokens, lengths, **args).tokens.tolist(),
           "unsharded": gen(model, params, tokens, lengths, **args).tokens.tolist(),
           "wqkv_spec": list(sharded["layers"]["attn"]["wqkv"].sharding.spec),
           "all_reduce": "all-reduce" in hlo}
    print("RESULT " + json.dumps(out))
""")


def test_params_sharded_by_heads_on_a_4_device_mesh_give_the_same_tokens(tmp_path):
    # 8 query and 4 KV heads: both split evenly over 4 devices.
    hf_model = build_hf("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=4,
                                            head_dim=8), tmp_path, seed=4)
    env = dict(os.environ, XLA_FLAGS=with_devices(4),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path),
                           json.dumps([t.tolist() for t in padded(PROMPTS)]), str(MAX_NEW)],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["wqkv_spec"] == [None, None, "heads", None, None]   # wqkv [L, D, K, G+2, H]
    assert result["all_reduce"], "the compiled step is not partitioned over the heads"
    assert result["sharded"] == result["unsharded"]
    for b, prompt in enumerate(PROMPTS):
        assert result["sharded"][b] == hf_greedy_with_logprobs(hf_model, prompt, MAX_NEW)[0]
