"""LoRA adapters (#19) on the real SmolLM2-135M-Instruct in float32, with PEFT adapters made here
(random A and B; several ranks, target sets, rsLoRA): greedy tokens equal HF transformers' with
the adapter merged (`merge_and_unload`); a batch mixing the base model and three adapters over two
device slots gives every request the tokens it gets alone (requests wait for a slot, adapters are
evicted and placed again); prefix caching never shares KV across adapters; n > 1, beam search,
and update_lora without a recompile. jpaged.generate's `lora`: tests/lora/test_lora_tiny.py."""

from __future__ import annotations

import copy

import pytest

from jpaged import LLM, LoRARequest, SamplingParams

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (r, lora_alpha, use_rslora, targets, std of the random A and B)
ADAPTERS = {"qv8": (8, 16, False, ["q_proj", "v_proj"], 0.05),
            "all16": (16, 32, True, ALL, 0.04),
            "mlp4": (4, 8, False, ["o_proj", "gate_proj", "up_proj", "down_proj"], 0.1)}
PROMPTS = ["The three primary colors are red, blue and yellow. Mixing them gives the secondary "
           "colors, which are",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Paris is the capital of France. Berlin is the capital of Germany. Madrid is"]
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SHORT = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)   # a prefix of GREEDY's


@pytest.fixture(scope="module")
def adapters(smollm2_hf, tmp_path_factory, hf_greedy_batch):
    """({name: (directory, HF merged greedy tokens per prompt)}, prompt ids); name None is the
    base model."""
    model, tokenizer = smollm2_hf
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    out = {None: (None, hf_greedy_batch(model, ids, MAX_TOKENS))}
    for k, (name, (r, alpha, rslora, targets, std)) in enumerate(ADAPTERS.items()):
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                 target_modules=targets, lora_dropout=0.0)
        wrapped = peft.get_peft_model(copy.deepcopy(model), config)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for pname, p in wrapped.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        wrapped.save_pretrained(root / name, safe_serialization=True)
        merged = wrapped.merge_and_unload().eval()
        out[name] = (str(root / name), hf_greedy_batch(merged, ids, MAX_TOKENS))
        del wrapped, merged
    return out, ids


@pytest.fixture(scope="module")
def llm(smollm2_path):
    # two device slots for three adapters: mixed batches wait for slots and evict adapters; 10
    # usable pages for 6 running sequences of 16 + 10 tokens (2 pages each): preemption
    return LLM(str(smollm2_path), dtype="float32", page_size=16, num_pages=11, max_model_len=128,
               max_num_seqs=8, max_num_batched_tokens=128, enable_lora=True, max_loras=2,
               max_lora_rank=16, max_cpu_loras=2)


def request(adapters, name):
    if name is None:
        return None
    return LoRARequest(name, list(ADAPTERS).index(name) + 1, adapters[0][name][0])


def run(llm, ids, loras, params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False,
                        lora_request=loras)
    return [o.outputs[0].token_ids for o in outs]


def assert_all_pages_free(llm):
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)


def test_each_adapter_equals_hf_merged(llm, adapters):
    expected, ids = adapters
    for name in [None, *ADAPTERS]:
        got = run(llm, ids, request(adapters, name))
        assert got == expected[name][1], name
    # the adapters change the tokens (so the comparisons above can fail)
    for name in ADAPTERS:
        assert expected[name][1] != expected[None][1], name
    assert_all_pages_free(llm)


def test_mixed_batch_equals_alone_over_two_slots(llm, adapters):
    expected, ids = adapters
    engine = llm.llm_engine
    names = [None, *ADAPTERS] * 2
    # prompt 2 is one full page: every sequence needs a second page while decoding
    prompts = [ids[2]] * len(names)
    loads_before = engine.lora.num_loads
    preempted_before = engine.stats().num_preemptions
    got = run(llm, prompts, [request(adapters, n) for n in names])
    for i, (name, tokens) in enumerate(zip(names, got)):
        assert tokens == expected[name][1][2], (i, name)
    # three adapters through two slots: some were evicted and placed again, and sequences
    # preempted by recompute came back with their adapter
    assert engine.lora.num_loads - loads_before >= 3
    assert engine.stats().num_preemptions > preempted_before
    # which adapter sits in which slot is data: the slot writer compiled once, for every load
    assert engine.lora._write._cache_size() == 1
    assert_all_pages_free(llm)


def test_evicted_and_reloaded_adapter_gives_same_tokens(llm, adapters):
    expected, ids = adapters
    engine = llm.llm_engine
    first = run(llm, ids[:1], request(adapters, "qv8"), SHORT)
    run(llm, ids[:1], request(adapters, "all16"), SHORT)
    run(llm, ids[:1], request(adapters, "mlp4"), SHORT)  # two slots: qv8 leaves the device
    assert "qv8" not in engine.scheduler.lora_slots.slot_of
    assert "qv8" not in engine.lora._host               # max_cpu_loras=2: read again from disk
    assert run(llm, ids[:1], request(adapters, "qv8"), SHORT) == first == \
        [expected["qv8"][1][0][:4]]
    assert_all_pages_free(llm)


def test_prefix_cache_is_per_adapter(llm, adapters):
    expected, ids = adapters
    engine = llm.llm_engine
    llm.reset_prefix_cache()
    run(llm, ids[:1], None, SHORT)
    cached = engine.stats().num_cached_tokens
    assert run(llm, ids[:1], request(adapters, "all16"), SHORT) == [expected["all16"][1][0][:4]]
    assert engine.stats().num_cached_tokens == cached          # the base model's pages unused
    assert run(llm, ids[:1], request(adapters, "all16"), SHORT) == [expected["all16"][1][0][:4]]
    assert engine.stats().num_cached_tokens > cached           # its own pages reused
    assert_all_pages_free(llm)


def test_n_samples_and_beam_search_with_adapter(llm, adapters):
    from jpaged import BeamSearchParams
    expected, ids = adapters
    params = SamplingParams(n=2, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": ids[0]}, params, use_tqdm=False,
                       lora_request=request(adapters, "mlp4"))[0]
    assert [o.token_ids for o in out.outputs] == [expected["mlp4"][1][0]] * 2
    beams = llm.llm_engine
    beams.add_beam_request("b", {"prompt_token_ids": ids[0]},
                           BeamSearchParams(beam_width=1, max_tokens=MAX_TOKENS, ignore_eos=True),
                           lora_request=request(adapters, "mlp4"))
    outs = []
    while beams.has_unfinished_requests():
        outs += beams.step()
    assert outs[0].outputs[0].token_ids == expected["mlp4"][1][0]   # width 1: greedy
    assert_all_pages_free(llm)


def test_update_lora_swaps_weights_without_recompiling(llm, adapters, smollm2_path):
    from jpaged.lora import load_lora
    expected, ids = adapters
    engine = llm.llm_engine
    config = engine.model_config
    run(llm, ids[:1], request(adapters, "qv8"), SHORT)           # buckets compiled
    compiled = engine.stats().num_step_compilations
    llm.update_lora("qv8", load_lora(adapters[0]["all16"][0], config))   # rank 16 into "qv8"
    assert run(llm, ids[:1], request(adapters, "qv8"), SHORT) == [expected["all16"][1][0][:4]]
    llm.update_lora("qv8", load_lora(adapters[0]["qv8"][0], config))
    assert run(llm, ids[:1], request(adapters, "qv8"), SHORT) == [expected["qv8"][1][0][:4]]
    assert engine.stats().num_step_compilations == compiled
    assert_all_pages_free(llm)
