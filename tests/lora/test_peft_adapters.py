"""PEFT adapters on the tiny random Llama (#19): the loader's refusals (each names the adapter, the
field and the fix), a bad adapter leaves the engine serving, `jpaged.generate(..., lora=...)`
(one adapter, or stacked adapters with a per-row index) equals HF's merged model, and a quantized
base (QLoRA-style: int8 weights + float LoRA) gives the same tokens in the engine and in
jpaged.generate, different from the base's."""

from __future__ import annotations

import copy
import dataclasses

import jax
import numpy as np
import pytest

import jpaged
from jpaged import LLM, LoRARequest, SamplingParams
from jpaged.lora import load_lora, stack_adapters
from jpaged.lora.peft import LoRAError, load_peft_adapter
from jpaged.models import arrange_layers

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
           [300, 2, 71, 64, 8],
           [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
MAX_TOKENS = 8


def make_adapter(hf_model, path, seed, safe=True, **config):
    config = {"r": 4, "lora_alpha": 8, "target_modules": ALL, **config}
    wrapped = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    wrapped.save_pretrained(path, safe_serialization=safe)
    return wrapped.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_llama_hf, tmp_path_factory, hf_greedy_batch):
    """name -> (directory, HF merged greedy tokens of PROMPTS); None: the base model."""
    root = tmp_path_factory.mktemp("tiny_lora")
    out = {None: (None, hf_greedy_batch(tiny_llama_hf, PROMPTS, MAX_TOKENS))}
    for seed, (name, config) in enumerate({"all4": {}, "qv8": {"r": 8, "target_modules": [
            "q_proj", "v_proj"], "use_rslora": True}}.items()):
        merged = make_adapter(tiny_llama_hf, root / name, seed, **config)
        out[name] = (str(root / name), hf_greedy_batch(merged, PROMPTS, MAX_TOKENS))
    return out


@pytest.fixture(scope="module")
def config(tiny_llama_dir):
    model, _, _ = jpaged.load(str(tiny_llama_dir), dtype="float32")
    return model.config


def test_refusals_name_adapter_field_and_fix(tiny_llama_hf, adapters, config, tmp_path):
    with pytest.raises(LoRAError, match=r"'qv8'.*r=8 is above max_lora_rank=4.*--max-lora-rank 8"):
        load_peft_adapter(adapters["qv8"][0], config, max_rank=4, name="qv8")
    make_adapter(tiny_llama_hf, tmp_path / "head", 0, target_modules=["q_proj", "lm_head"])
    with pytest.raises(LoRAError, match=r"'head'.*lm_head.*target_modules"):
        load_peft_adapter(tmp_path / "head", config, max_rank=8)
    make_adapter(tiny_llama_hf, tmp_path / "pickled", 0, safe=False)
    with pytest.raises(LoRAError, match=r"'pickled'.*adapter_model.bin.*safe_serialization=True"):
        load_peft_adapter(tmp_path / "pickled", config, max_rank=8)
    other = dataclasses.replace(config, intermediate_size=2 * config.intermediate_size)
    with pytest.raises(LoRAError, match=r"'all4'.*_proj.*has shape.*another base model"):
        load_peft_adapter(adapters["all4"][0], other, max_rank=8, name="all4")
    with pytest.raises(LoRAError, match=r"'nowhere'.*no adapter_config.json"):
        load_peft_adapter(tmp_path / "nowhere", config, max_rank=8)


def test_bad_adapter_leaves_engine_serving(tiny_llama_dir, adapters, tmp_path):
    llm = LLM(str(tiny_llama_dir), dtype="float32", page_size=8, num_pages=64, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=64, enable_lora=True, max_loras=1,
              max_lora_rank=4)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    good = LoRARequest("all4", 1, adapters["all4"][0])
    with pytest.raises(LoRAError, match="max_lora_rank=4"):
        llm.generate(prompts, params, use_tqdm=False,
                     lora_request=[good, LoRARequest("qv8", 2, adapters["qv8"][0])])
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=[good, None])
    assert [o.outputs[0].token_ids for o in outs] == [adapters["all4"][1][0], adapters[None][1][1]]
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)
    plain = LLM(str(tiny_llama_dir), dtype="float32", num_pages=64, max_model_len=128)
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.generate(prompts, params, use_tqdm=False, lora_request=good)


def _generate(model, params, **lora):
    width = max(map(len, PROMPTS))
    tokens = np.zeros((len(PROMPTS), width), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    out = jax.jit(jpaged.generate, static_argnames=("model", "max_new_tokens"))(
        model, params, tokens, lengths, max_new_tokens=MAX_TOKENS, rng=jax.random.key(0), **lora)
    return np.asarray(out.tokens).tolist()


def test_research_generate_takes_lora_pytree(tiny_llama_dir, adapters):
    model, params, _ = jpaged.load(str(tiny_llama_dir), dtype="float32")
    one = load_lora(adapters["qv8"][0], model.config)
    assert _generate(model, params, lora=one) == adapters["qv8"][1]
    stacked = stack_adapters([load_lora(adapters[n][0], model.config, max_rank=8)
                              for n in ("all4", "qv8")])
    got = _generate(model, params, lora=stacked, lora_index=np.array([1, -1, 0], np.int32))
    assert got == [adapters["qv8"][1][0], adapters[None][1][1], adapters["all4"][1][2]]
    assert _generate(model, params) == adapters[None][1]


def test_quantized_base_with_float_lora(tiny_llama_dir, adapters):
    model, params, _ = jpaged.load(str(tiny_llama_dir), dtype="float32")
    int8 = arrange_layers(jpaged.quantize(arrange_layers(params, per_layer=False), "int8"))
    lora = load_lora(adapters["all4"][0], model.config)
    want = _generate(model, int8, lora=lora)
    assert want != _generate(model, int8)
    llm = LLM(str(tiny_llama_dir), dtype="float32", quantization="int8", page_size=8,
              num_pages=64, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
              enable_lora=True, max_loras=1, max_lora_rank=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        use_tqdm=False, lora_request=LoRARequest("all4", 1, adapters["all4"][0]))
    assert [o.outputs[0].token_ids for o in outs] == want
