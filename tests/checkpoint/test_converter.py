"""Converter and loader: HF safetensors (single file, sharded), GGUF (the real SmolLM2 and tiny
hand-written ones), tokenizers, dtypes, and the error messages.

Params are compared against the source state dict passed through transforms written out here by
hand (not through jpaged/checkpoint/weight_map.py), so the tables are checked, not restated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from jpaged.checkpoint.convert import convert, main  # noqa: E402
from jpaged.checkpoint.params import flatten  # noqa: E402
from jpaged.checkpoint.loader import load_checkpoint  # noqa: E402
from jpaged.checkpoint import model_cache  # noqa: E402
from jpaged.checkpoint.model_cache import file_sha256  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(autouse=True)
def _no_model_cache(monkeypatch):
    """These tests are about the conversion itself: no cached copy may stand in for it (tests of
    the model cache set their own directory)."""
    monkeypatch.setenv("JPAGED_MODEL_CACHE_DIR", "off")


# --- tiny HF checkpoints --------------------------------------------------------------------------

def tiny_model(config_class="LlamaConfig", seed=0, **overrides):
    config = getattr(transformers, config_class)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)     # norms and biases too: HF inits them to constants
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE)


def save_hf(model, path: Path, tokenizer=None, **kwargs) -> Path:
    model.generation_config.eos_token_id = [2, 7]
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama():
    return tiny_model()


@pytest.fixture(scope="module")
def llama_dir(llama, tmp_path_factory):
    return save_hf(llama, tmp_path_factory.mktemp("llama"), tiny_tokenizer())


@pytest.fixture(scope="module")
def sharded_llama_dir(llama, tmp_path_factory):
    path = save_hf(llama, tmp_path_factory.mktemp("llama_sharded"), tiny_tokenizer(),
                   max_shard_size="8KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def expected_params(state_dict: dict, hf_config) -> dict[str, np.ndarray]:
    """The jpaged params, written out by hand from the HF state dict: flattened "a/b" -> array."""
    sd = {k: v.detach().float().numpy() for k, v in state_dict.items()}
    c = hf_config
    d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def stack(name, fn=lambda w: w):
        return np.stack([fn(sd[f"model.layers.{i}.{name}"]) for i in range(c.num_hidden_layers)])

    def grouped(q, k_, v):
        """q [..., N, H], k and v [..., K, H] -> [..., K, G+2, H]: each KV head after its queries."""
        lead = q.shape[:-2]
        return np.concatenate([q.reshape(*lead, k, n // k, h), k_[..., None, :], v[..., None, :]],
                              axis=-2)

    def qkv(kind, fn):
        return grouped(*(stack(f"self_attn.{p}_proj.{kind}", fn(p)) for p in "qkv"))

    out = {
        "embed/embedding": sd["model.embed_tokens.weight"],
        "norm/scale": sd["model.norm.weight"],
        "layers/attn_norm/scale": stack("input_layernorm.weight"),
        "layers/mlp_norm/scale": stack("post_attention_layernorm.weight"),
        "layers/attn/wqkv": qkv("weight", lambda p: lambda w: w.T.reshape(d, -1, h)),
        "layers/attn/wo": stack("self_attn.o_proj.weight", lambda w: w.T),
        "layers/mlp/w_gate_up": np.stack([stack("mlp.gate_proj.weight", lambda w: w.T),
                                          stack("mlp.up_proj.weight", lambda w: w.T)], axis=-2),
        "layers/mlp/w_down": stack("mlp.down_proj.weight", lambda w: w.T),
    }
    if "model.layers.0.self_attn.q_proj.bias" in sd:
        out["layers/attn/bqkv"] = qkv("bias", lambda p: lambda b: b.reshape(-1, h))
    if not c.tie_word_embeddings:
        out["lm_head"] = sd["lm_head.weight"].T
    return out


def assert_params_equal(params, expected: dict[str, np.ndarray], atol: float = 0.0) -> None:
    flat = flatten(params)
    assert sorted(flat) == sorted(expected)
    for path, want in expected.items():
        got = np.asarray(flat[path], dtype=np.float32)
        assert got.shape == want.shape, path
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=path)


def assert_tokenizer_matches(tokenizer, reference, texts) -> None:
    for text in texts:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert tokenizer.chat_template == reference.chat_template


# --- HF directories -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["jpaged convert", "python -m converters.hf_to_jpaged"])
def test_cli_converts_sharded_checkpoint(llama, sharded_llama_dir, tmp_path, command):
    """The installed `jpaged convert` runs anywhere (here outside the checkout, where the top-level
    `converters` package is not importable); `python -m converters.hf_to_jpaged` from a checkout."""
    out = tmp_path / "out"
    if command == "jpaged convert":
        argv, cwd = [sys.executable, "-m", "jpaged.entrypoints.cli", "convert"], tmp_path
    else:
        argv, cwd = [sys.executable, "-m", "converters.hf_to_jpaged"], REPO_ROOT
    result = subprocess.run([*argv, str(sharded_llama_dir), str(out)], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("params", "jpaged_config.json", "config.json", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    checkpoint = load_checkpoint(out)
    assert checkpoint.source == "jpaged" and checkpoint.dtype == "float32"
    assert_params_equal(checkpoint.params, expected_params(llama.state_dict(), llama.config))
    assert_tokenizer_matches(checkpoint.tokenizer, tiny_tokenizer(), ["w1 w2 w60", "w3 nope </s>"])
    assert checkpoint.eos_token_ids == (2, 7)       # config 2 ∪ generation_config [2, 7] ∪ tokenizer 2


def test_convert_function_and_in_memory_load_agree(llama, llama_dir, tmp_path):
    expected = expected_params(llama.state_dict(), llama.config)
    in_memory = load_checkpoint(llama_dir, progress=False)
    assert in_memory.source == "hf" and in_memory.eos_token_ids == (2, 7)
    assert_params_equal(in_memory.params, expected)
    assert in_memory.tokenizer("w5 w6")["input_ids"] == [8, 9]

    convert(llama_dir, tmp_path / "f32", progress=False)
    assert_params_equal(load_checkpoint(tmp_path / "f32").params, expected)
    assert json.loads((tmp_path / "f32" / "config.json").read_text()) == \
        json.loads((llama_dir / "config.json").read_text())


def test_dtypes(llama, llama_dir, tmp_path):
    """bfloat16 on disk equals torch's own bf16 cast; loading can cast back to float32."""
    convert(llama_dir, tmp_path / "bf16", dtype="bfloat16", progress=False)
    checkpoint = load_checkpoint(tmp_path / "bf16")
    assert checkpoint.dtype == "bfloat16"
    assert {str(leaf.dtype) for leaf in flatten(checkpoint.params).values()} == {"bfloat16"}
    bf16 = {name: value.to(torch.bfloat16) for name, value in llama.state_dict().items()}
    expected = expected_params(bf16, llama.config)
    assert_params_equal(checkpoint.params, expected)
    as_f32 = load_checkpoint(tmp_path / "bf16", dtype="float32")
    assert {str(leaf.dtype) for leaf in flatten(as_f32.params).values()} == {"float32"}
    assert_params_equal(as_f32.params, expected)
    assert load_checkpoint(llama_dir, dtype="float16", progress=False).dtype == "float16"


def test_qwen2_without_tokenizer(tmp_path):
    model = tiny_model("Qwen2Config", seed=1, tie_word_embeddings=True)
    path = save_hf(model, tmp_path / "qwen2")
    convert(path, tmp_path / "out", progress=False)
    for checkpoint in (load_checkpoint(path, progress=False), load_checkpoint(tmp_path / "out")):
        assert checkpoint.tokenizer is None
        assert checkpoint.config.qkv_bias and checkpoint.config.tie_word_embeddings
        assert_params_equal(checkpoint.params, expected_params(model.state_dict(), model.config))
        assert checkpoint.eos_token_ids == (2, 7)


# --- the real SmolLM2 GGUF ------------------------------------------------------------------------

def test_smollm2_gguf_matches_transformers(smollm2_path, smollm2_hf, tmp_path):
    model, hf_tokenizer = smollm2_hf
    out = convert(smollm2_path, tmp_path / "smollm2", progress=False)
    checkpoint = load_checkpoint(out)
    assert checkpoint.source == "jpaged" and checkpoint.dtype == "float32"
    assert checkpoint.config.num_layers == 30 and checkpoint.config.tie_word_embeddings
    # Both sides dequantize with gguf-py and undo the same q/k permutation: equal to the bit.
    assert_params_equal(checkpoint.params, expected_params(model.state_dict(), model.config))

    texts = ["Hello, world!", "  The capital of France is Paris.\n", "<|im_start|>user\nhi<|im_end|>"]
    assert_tokenizer_matches(checkpoint.tokenizer, hf_tokenizer, texts)
    assert "<|im_start|>" in checkpoint.tokenizer.chat_template
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert checkpoint.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == \
        hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert checkpoint.tokenizer.eos_token_id == hf_tokenizer.eos_token_id == 2
    assert checkpoint.tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert checkpoint.eos_token_ids == (2,)

    synthesized = transformers.AutoConfig.from_pretrained(out)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(synthesized, key) == getattr(model.config, key), key
    assert synthesized.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]


WITHOUT_TORCH = """
import importlib.abc, importlib.util, json, sys
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: (
    None if name.split(".")[0] == "torch" else _find_spec(name, *a, **k))

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("No module named 'torch' (hidden by the test)")

sys.meta_path.insert(0, NoTorch())
from jpaged.checkpoint.loader import load_checkpoint
fresh = load_checkpoint(sys.argv[1], progress=False)        # dequantized, then stored in the cache
checkpoint = load_checkpoint(sys.argv[1], progress=False)   # from the model cache
texts = json.loads(sys.argv[2])
assert [fresh.tokenizer(t)["input_ids"] for t in texts] == [checkpoint.tokenizer(t)["input_ids"]
                                                            for t in texts]
print(json.dumps({"ids": [checkpoint.tokenizer(t)["input_ids"] for t in texts],
                  "chat_template": checkpoint.tokenizer.chat_template,
                  "eos_token_ids": checkpoint.eos_token_ids, "torch": "torch" in sys.modules,
                  "converters": "converters" in sys.modules}))
"""


def test_smollm2_gguf_loads_without_torch(smollm2_path, smollm2_hf, tmp_path):
    """torch is a test-only dependency: the GGUF path, tokenizer included, must not need it
    (transformers' own GGUF metadata reader imports torch, so the loader falls back to gguf-py),
    and neither must the model cache's copy of it (stored by the first load, read by the second)."""
    _, hf_tokenizer = smollm2_hf
    texts = ["Hello, world!", "  The capital\n of <|im_start|>x", "héllo 123456"]
    env = dict(os.environ, JPAGED_MODEL_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(smollm2_path), json.dumps(texts)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == [
        f"{smollm2_path.stem}-{file_sha256(smollm2_path)[:16]}-float32-layout2"]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    assert got["converters"] is False               # loading never goes through the converter CLI
    assert got["ids"] == [hf_tokenizer(t)["input_ids"] for t in texts]
    assert got["chat_template"] == hf_tokenizer.chat_template
    assert got["eos_token_ids"] == [2]


# --- tiny hand-written GGUFs ----------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def write_tiny_gguf(model, path: Path, rope_theta=None, rope_freqs=None) -> Path:
    """The way llama.cpp writes a Llama: permuted q/k rows, no tokenizer metadata, one F16 tensor."""
    c = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta or c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"].astype(np.float16))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for i in range(c.num_hidden_layers):
        for gguf_name, hf_name in GGUF_NAMES.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                w = llama_cpp_permute(w, c.num_attention_heads)
            elif gguf_name == "attn_k":
                w = llama_cpp_permute(w, c.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_without_tokenizer(llama, tmp_path):
    path = write_tiny_gguf(llama, tmp_path / "tiny.gguf")
    expected = expected_params(llama.state_dict(), llama.config)
    expected["lm_head"] = expected["lm_head"].astype(np.float16).astype(np.float32)
    in_memory = load_checkpoint(path, progress=False)
    assert in_memory.source == "gguf" and in_memory.tokenizer is None
    assert in_memory.config.rope_scaling is None and not in_memory.config.tie_word_embeddings
    assert_params_equal(in_memory.params, expected)      # the q/k permutation is undone exactly
    out = convert(path, tmp_path / "out", progress=False)
    assert not (out / "tokenizer.json").exists()
    assert load_checkpoint(out).tokenizer is None


def test_gguf_model_cache(llama, tmp_path, monkeypatch, caplog):
    """A GGUF's conversion is stored once per (file content, dtype) and then loaded from there."""
    path = write_tiny_gguf(llama, tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("JPAGED_MODEL_CACHE_DIR", str(cache))
    entry = cache / f"tiny-{file_sha256(path)[:16]}-float32-layout2"
    (entry / "params").mkdir(parents=True)               # a stale entry (older layout): replaced
    fresh = load_checkpoint(path, progress=False)
    model_cache.wait()                                   # the copy is written in the background
    assert [p.name for p in cache.iterdir()] == [entry.name]        # no partial directory left
    assert model_cache.is_complete(entry) and not (entry / "params").exists()
    with caplog.at_level(logging.INFO, logger="jpaged"):
        cached = load_checkpoint(path, progress=False)
    assert f"model cache: loading the converted copy of tiny.gguf from {entry}" in caplog.text
    assert (cached.source, cached.path, cached.config) == ("gguf", path, fresh.config)
    assert cached.eos_token_ids == fresh.eos_token_ids and cached.tokenizer is None
    assert_params_equal(cached.params, {k: np.asarray(v) for k, v in flatten(fresh.params).items()})
    assert load_checkpoint(path, dtype="bfloat16", progress=False).dtype == "bfloat16"
    model_cache.wait()
    assert (cache / f"tiny-{file_sha256(path)[:16]}-bfloat16-layout2").is_dir()    # keyed by dtype too

    llama_changed = tiny_model(seed=1)                  # same name, other content: a new entry
    write_tiny_gguf(llama_changed, path)
    assert len(list(cache.iterdir())) == 2
    load_checkpoint(path, progress=False)
    model_cache.wait()
    assert len(list(cache.iterdir())) == 3
    monkeypatch.setenv("JPAGED_MODEL_CACHE_DIR", "off")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jpaged"):
        load_checkpoint(path, progress=False)
    assert "model cache" not in caplog.text and len(list(cache.iterdir())) == 3


def test_gguf_llama3_rope_freqs(llama, tmp_path):
    """llama.cpp stores Llama 3.1 RoPE scaling as per-frequency divisors; they become `llama3` again."""
    from jpaged.config import ModelConfig
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    probe = ModelConfig(architecture="llama", vocab_size=1, hidden_size=8, intermediate_size=1,
                        num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, rope_theta=500000.0)
    freqs = probe.rope_inv_freq() / dataclasses.replace(probe, rope_scaling=scaling).rope_inv_freq()
    assert freqs[0] == 1.0 and 1.0 < freqs[2] < 8.0 and freqs[3] == 8.0   # all three llama3 bands
    path = write_tiny_gguf(llama, tmp_path / "l3.gguf", rope_theta=500000.0, rope_freqs=freqs)
    assert load_checkpoint(path, progress=False).config.rope_scaling == scaling

    odd = write_tiny_gguf(llama, tmp_path / "odd.gguf", rope_theta=500000.0, rope_freqs=freqs[::-1])
    with pytest.raises(ValueError, match="rope_freqs.weight does not match llama3"):
        load_checkpoint(odd, progress=False)


# --- errors ---------------------------------------------------------------------------------------

def test_unsupported_architecture(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError) as error:
        load_checkpoint(tmp_path / "gpt2")
    message = str(error.value)
    assert "GPT2LMHeadModel" in message
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert name in message

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'.*llama, qwen2"):
        load_checkpoint(tmp_path / "gpt2.gguf")


def test_missing_files(llama, sharded_llama_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(llama.config.to_json_string())
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights in .*bare"):
        load_checkpoint(bare)

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in sharded_llama_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} not found.*lists it as a shard"):
        load_checkpoint(broken)

    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        convert(tmp_path, tmp_path / "out", progress=False)      # a directory with no config.json

    jpaged_dir = tmp_path / "half_jpaged"
    jpaged_dir.mkdir()
    (jpaged_dir / "jpaged_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="params not found"):
        load_checkpoint(jpaged_dir)


def test_missing_tensor(llama, tmp_path):
    from safetensors.numpy import save_file
    path = save_hf(llama, tmp_path / "hf")
    tensors = {k: v.detach().numpy() for k, v in llama.state_dict().items()
               if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(path, progress=False)


def test_wrong_tensor_shape(llama, tmp_path):
    path = save_hf(llama, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 40
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_checkpoint(path, progress=False)
    message = str(error.value)
    assert "model.layers.0.mlp.down_proj.weight has shape [32, 48], expected [32, 40] = [D, F]" \
        in message


def test_bad_paths(llama_dir, tmp_path, capsys):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError) as error:
        load_checkpoint(missing)
    message = str(error.value)
    assert str(missing) in message
    for form in ("jpaged checkpoint directory", "HF model directory", ".gguf file"):
        assert form in message

    assert main([str(missing), str(tmp_path / "out")]) == 1
    assert str(missing) in capsys.readouterr().err

    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_checkpoint(llama_dir, dtype="int8")


def test_refuses_to_overwrite(llama_dir, tmp_path):
    convert(llama_dir, tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        convert(llama_dir, tmp_path / "out", progress=False)


def test_a_checkpoint_in_an_older_params_layout_is_refused_with_the_fix(llama_dir, tmp_path):
    out = convert(llama_dir, tmp_path / "ckpt", dtype="float32", progress=False)
    config = json.loads((out / "jpaged_config.json").read_text())
    assert config.pop("params_layout") == 2
    (out / "jpaged_config.json").write_text(json.dumps(config))      # as jpaged wrote it before
    with pytest.raises(ValueError, match=r"params layout 1; this one reads layout 2\); convert "
                                         r"the source again with `jpaged convert SRC OUT`"):
        load_checkpoint(out)
