"""Pre-quantized HF checkpoints (GPTQ, AWQ, compressed-tensors) written here from the tiny random
Llama in those libraries' exact safetensors layouts, by packers independent of jpaged's readers:

  - the reader's dequantization equals the integers' own (s (q - z), or q s) exactly;
  - loaded as stored (QuantizedWeights, no float detour) the model gives the prompt log-probs and
    greedy tokens of a float model built from those dequantized weights (1e-4);
  - GPTQ act-order (a shuffled g_idx) falls back to floats, still exact;
  - asking a GPTQ checkpoint for another quantization, or a float one for 'gptq', is an error
    naming both; every engine ends with every page free.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jpaged import LLM, SamplingParams
from jpaged.checkpoint.loader import load_checkpoint
from jpaged.checkpoint.sources import HFSource
from jpaged_kernels.quantization import QuantizedWeight

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENGINE = dict(page_size=8, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64,
              num_pages=48, dtype="float32")
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


# ---- the libraries' layouts, packed independently of jpaged ---------------------------------
def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """[R*n, C] -> [R, C] int32, value j of word r = row r*n + j (GPTQ's qweight)."""
    n = 32 // bits
    words = np.zeros((values.shape[0] // n, values.shape[1]), np.uint64)
    for j in range(n):
        words |= values[j::n].astype(np.uint64) << (bits * j)
    return words.astype(np.uint32).view(np.int32)


def pack_columns(values: np.ndarray, bits: int, order=None) -> np.ndarray:
    """[R, C*n] -> [R, C] int32, value i of word c = column c*n + order[i] (GPTQ's qzeros; AWQ
    with order 0 2 4 6 1 3 5 7)."""
    n = 32 // bits
    order = range(n) if order is None else order
    words = np.zeros((values.shape[0], values.shape[1] // n), np.uint64)
    for i, column in enumerate(order):
        words |= values[:, column::n].astype(np.uint64) << (bits * i)
    return words.astype(np.uint32).view(np.int32)


def affine_integers(w: np.ndarray, bits: int, g_idx: np.ndarray, num_groups: int):
    """w [out, in] -> q [in, out], z, s [G, out] (min/max per group, as GPTQ's quantizer)."""
    top = 2 ** bits - 1
    s = np.zeros((num_groups, w.shape[0]), np.float16)
    z = np.zeros((num_groups, w.shape[0]), np.int64)
    for g in range(num_groups):
        cols = w[:, g_idx == g]
        lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
        s[g] = np.maximum((hi - lo) / top, 1e-4)
        z[g] = np.clip(np.round(-lo / s[g].astype(np.float32)), 1, top)   # v1 stores z - 1
    q = np.clip(np.round(w.T / s[g_idx].astype(np.float32) + z[g_idx]), 0, top).astype(np.int64)
    return q, z, s


def write_gptq(src, out, *, bits=4, group=32, act_order=False, seed=0):
    rng = np.random.default_rng(seed)
    tensors, dequantized = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if not is_linear(name):
            tensors[name] = dequantized[name] = w
            continue
        prefix, d_in = name[:-len(".weight")], w.shape[1]
        g_idx = np.arange(d_in) // group
        if act_order:
            g_idx = g_idx[rng.permutation(d_in)]
        q, z, s = affine_integers(w, bits, g_idx, d_in // group)
        tensors[f"{prefix}.qweight"] = pack_rows(q, bits)
        tensors[f"{prefix}.qzeros"] = pack_columns(z - 1, bits)      # v1 format: z - 1
        tensors[f"{prefix}.scales"] = s
        tensors[f"{prefix}.g_idx"] = g_idx.astype(np.int32)
        dequantized[name] = np.ascontiguousarray((s[g_idx].astype(np.float32) * (q - z[g_idx])).T)
    quant = dict(quant_method="gptq", bits=bits, group_size=group, desc_act=act_order, sym=False,
                 checkpoint_format="gptq")
    return write_dir(src, out, tensors, quant), dequantized


def write_awq(src, out, *, group=32, seed=0):
    rng = np.random.default_rng(seed)
    tensors, dequantized = {}, {}
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for name, w in load_file(src / "model.safetensors").items():
        if not is_linear(name):
            tensors[name] = dequantized[name] = w
            continue
        prefix, d_in = name[:-len(".weight")], w.shape[1]
        g_idx = np.arange(d_in) // group
        q, z, s = affine_integers(w, 4, g_idx, d_in // group)
        tensors[f"{prefix}.qweight"] = pack_columns(q, 4, order)     # [in, out/8]
        tensors[f"{prefix}.qzeros"] = pack_columns(z, 4, order)
        tensors[f"{prefix}.scales"] = s
        dequantized[name] = np.ascontiguousarray((s[g_idx].astype(np.float32) * (q - z[g_idx])).T)
    quant = dict(quant_method="awq", bits=4, group_size=group, zero_point=True, version="gemm")
    return write_dir(src, out, tensors, quant), dequantized


def write_compressed_tensors(src, out, *, activations: bool):
    tensors, dequantized = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if not is_linear(name):
            tensors[name] = dequantized[name] = w
            continue
        prefix = name[:-len(".weight")]
        scale = (np.abs(w).max(1, keepdims=True) / 127).astype(np.float32)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"] = q, scale
        dequantized[name] = q.astype(np.float32) * scale
    scheme = dict(targets=["Linear"], weights=dict(num_bits=8, type="int", symmetric=True,
                                                   strategy="channel", dynamic=False),
                  input_activations=dict(num_bits=8, type="int", symmetric=True, strategy="token",
                                         dynamic=True) if activations else None)
    quant = dict(quant_method="compressed-tensors", format="int-quantized",
                 config_groups={"group_0": scheme}, ignore=["lm_head"])
    return write_dir(src, out, tensors, quant), dequantized


def write_dir(src, out, tensors, quant_config):
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, out / "model.safetensors")
    return out


def write_float(src, out, dequantized):
    out.mkdir()
    shutil.copyfile(src / "config.json", out / "config.json")
    save_file(dequantized, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [{"prompt_token_ids": rng.integers(2, 512, size=n).tolist()} for n in (5, 19, 33)]


def assert_all_pages_free(llm):
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)


def first_layer(leaf):
    """A params leaf in either placement (stacked, or a tuple per layer)."""
    return leaf[0] if isinstance(leaf, tuple) else leaf


def assert_same_model(quantized_dir, float_dir, prompts):
    """Prompt log-probs within 1e-4 and the same greedy tokens; returns the quantized params."""
    got_llm, want_llm = LLM(str(quantized_dir), **ENGINE), LLM(str(float_dir), **ENGINE)
    got = got_llm.generate(prompts, PARAMS, use_tqdm=False)
    want = want_llm.generate(prompts, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for g, w in zip(got, want):
        for g_pos, w_pos in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            for token in w_pos.keys() & g_pos.keys():
                assert abs(g_pos[token].logprob - w_pos[token].logprob) < 1e-4
    for llm in (got_llm, want_llm):
        assert_all_pages_free(llm)
    return got_llm.llm_engine.params


CASES = {
    "gptq-4bit": lambda src, out: write_gptq(src, out, bits=4, group=32),
    "gptq-8bit": lambda src, out: write_gptq(src, out, bits=8, group=64),
    "awq": lambda src, out: write_awq(src, out, group=32),
    "compressed-tensors-w8a16": lambda src, out: write_compressed_tensors(src, out,
                                                                          activations=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_prequantized_checkpoint_is_served_as_stored(tiny_llama_dir, tmp_path, prompts, case):
    quantized_dir, dequantized = CASES[case](tiny_llama_dir, tmp_path / case)
    source = HFSource(quantized_dir)
    for name, want in dequantized.items():                  # the reader's own dequantization
        if is_linear(name):
            np.testing.assert_allclose(source.read(name), want, rtol=0, atol=1e-6)
            assert source.stores_quantized(name)
    float_dir = write_float(tiny_llama_dir, tmp_path / f"{case}-float", dequantized)
    params = assert_same_model(quantized_dir, float_dir, prompts)
    assert isinstance(first_layer(params["layers"]["attn"]["wqkv"]), QuantizedWeight)
    stored = load_checkpoint(quantized_dir, progress=False).params["layers"]["attn"]["wqkv"]
    assert isinstance(stored, QuantizedWeight)              # as stored, not as floats
    assert stored.bits == (4 if case in ("gptq-4bit", "awq") else 8)   # (the engine widens
    # 4-bit values to int8 on CPU: jpaged_kernels.quantization.widened)


def test_w8a8_compressed_tensors_quantizes_activations(tiny_llama_dir, tmp_path, prompts):
    """Dynamic per-token int8 activations: no float twin; log-probs near the W8A16 model's."""
    w8a8, _ = write_compressed_tensors(tiny_llama_dir, tmp_path / "w8a8", activations=True)
    w8a16, _ = write_compressed_tensors(tiny_llama_dir, tmp_path / "w8a16", activations=False)
    llms = [LLM(str(path), **ENGINE) for path in (w8a8, w8a16)]
    assert first_layer(llms[0].llm_engine.params["layers"]["mlp"]["w_down"]).activation_bits == 8
    a, b = (llm.generate(prompts, PARAMS, use_tqdm=False) for llm in llms)
    for x, y in zip(a, b):
        for x_pos, y_pos in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:]):
            for token in x_pos.keys() & y_pos.keys():
                assert abs(x_pos[token].logprob - y_pos[token].logprob) < 0.2
    for llm in llms:
        assert_all_pages_free(llm)


def test_gptq_act_order_loads_exactly_as_floats(tiny_llama_dir, tmp_path, prompts):
    quantized_dir, dequantized = write_gptq(tiny_llama_dir, tmp_path / "act-order", act_order=True)
    name = next(n for n in dequantized if is_linear(n))
    assert not HFSource(quantized_dir).stores_quantized(name)
    float_dir = write_float(tiny_llama_dir, tmp_path / "act-order-float", dequantized)
    params = assert_same_model(quantized_dir, float_dir, prompts)
    assert not isinstance(first_layer(params["layers"]["attn"]["wqkv"]), QuantizedWeight)


def test_a_quantization_the_checkpoint_does_not_store_is_refused(tiny_llama_dir, tmp_path):
    quantized_dir, _ = write_gptq(tiny_llama_dir, tmp_path / "gptq")
    with pytest.raises(ValueError, match=r"stores gptq-quantized weights.*instead of 'int8'"):
        LLM(str(quantized_dir), quantization="int8", **ENGINE)
    with pytest.raises(ValueError, match="has no quantization_config"):
        LLM(str(tiny_llama_dir), quantization="awq", **ENGINE)
    config = json.loads((quantized_dir / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "bitsandbytes"
    (quantized_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quant_method='bitsandbytes'"):
        LLM(str(quantized_dir), **ENGINE)
