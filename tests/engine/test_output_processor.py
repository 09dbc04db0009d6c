"""Detokenization and stop checks with SmolLM2's real tokenizer: the incremental detokenizer
against a whole decode, and stop strings / stop tokens / output kinds through a real scheduler's
update_from_output and the output processor, with made-up device results."""

import numpy as np
import pytest

from jpaged.checkpoint.sources import GGUFSource
from jpaged.core.block_manager import BlockManager
from jpaged.core.request import Request
from jpaged.core.scheduler import Scheduler, StepResult
from jpaged.engine.detokenizer import IncrementalDetokenizer
from jpaged.engine.output_processor import OutputProcessor
from jpaged.sampling_params import RequestOutputKind, SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return GGUFSource(smollm2_path).load_tokenizer()


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", ["The capital of France is Paris.", "héllo wörld: 東京 🌍🚀!",
                                  "  leading spaces\nand\ttabs", "x" * 40])
def test_incremental_text_equals_a_whole_decode(tokenizer, text):
    prompt = encode(tokenizer, "Say it:")
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)     # no half characters ever emitted


class Harness:
    """A real scheduler and output processor; steps feed chosen tokens as the device's result."""

    def __init__(self, tokenizer):
        self.bm = BlockManager(num_pages=32, page_size=4)
        self.sched = Scheduler(self.bm, max_num_seqs=4, max_num_batched_tokens=64,
                               eos_token_ids=(EOS,))
        self.processor = OutputProcessor(tokenizer)
        self.tokenizer = tokenizer

    def add(self, request_id, params, prompt="Answer:"):
        ids = encode(self.tokenizer, prompt)
        max_tokens = params.max_tokens or 64
        self.processor.add_request(request_id, prompt, ids, params, params.n)
        self.sched.add_request(Request.sampling(request_id, ids, params, 0, max_tokens))

    def step(self, tokens):
        out = self.sched.schedule()
        result = StepResult(token_ids=np.array(tokens, np.int32)[:, None])
        updates = self.sched.update_from_output(out, result)
        return self.processor.process(updates, self.sched.finish_sequence)


def run_one(h: Harness, params, ids):
    h.add("r", params)
    outputs = []
    for token in ids:
        outputs += h.step([token])
        if not h.processor.has("r"):
            break
    assert h.bm.all_free() and not h.sched.requests and not h.processor.states
    return outputs


def test_stop_string_split_over_tokens_is_cut_and_frees_the_pages(tokenizer):
    ids = encode(tokenizer, " Paris is lovely. STOP here")
    out = run_one(Harness(tokenizer), SamplingParams(stop=["STOP"], max_tokens=30,
                                                     output_kind=RequestOutputKind.FINAL_ONLY),
                  ids)
    [final] = out
    c = final.outputs[0]
    assert (c.text, c.finish_reason, c.stop_reason) == (" Paris is lovely. ", "stop", "STOP")
    assert c.token_ids == ids[:len(c.token_ids)] and len(c.token_ids) < len(ids)


def test_include_stop_str_and_min_tokens_gate(tokenizer):
    ids = encode(tokenizer, " a. b. c. d.")
    h = Harness(tokenizer)
    [out] = run_one(h, SamplingParams(stop=["."], include_stop_str_in_output=True,
                                      output_kind=RequestOutputKind.FINAL_ONLY), ids)
    assert (out.outputs[0].text, out.outputs[0].stop_reason) == (" a.", ".")
    # Stop strings count only past min_tokens: the first "." comes too early.
    [out] = run_one(Harness(tokenizer), SamplingParams(
        stop=["."], min_tokens=3, output_kind=RequestOutputKind.FINAL_ONLY), ids)
    assert out.outputs[0].text == " a. b"


def test_a_stop_string_overrides_a_length_finish(tokenizer):
    ids = encode(tokenizer, " one END")
    [out] = run_one(Harness(tokenizer), SamplingParams(stop=["END"], max_tokens=len(ids),
                                                       output_kind=RequestOutputKind.FINAL_ONLY),
                    ids)
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", "END")
    assert out.outputs[0].text == " one "


def test_eos_text_is_left_out_unless_asked(tokenizer):
    ids = encode(tokenizer, " Hi there") + [EOS]
    for include, text in ((False, " Hi there"), (True, " Hi there<|im_end|>")):
        [out] = run_one(Harness(tokenizer), SamplingParams(
            include_stop_str_in_output=include, skip_special_tokens=False, stop=["zzz"],
            output_kind=RequestOutputKind.FINAL_ONLY), ids)
        assert (out.outputs[0].text, out.outputs[0].finish_reason) == (text, "stop")
        assert out.outputs[0].token_ids[-1] == EOS


def test_delta_outputs_hold_back_a_possible_stop_string_start(tokenizer):
    ids = encode(tokenizer, " yes, maybe")
    out = run_one(Harness(tokenizer), SamplingParams(stop=["maybe not"], max_tokens=len(ids),
                                                     output_kind=RequestOutputKind.DELTA), ids)
    deltas = [o.outputs[0].text for o in out if o.outputs]
    assert "".join(deltas) == " yes, maybe"
    # while running, the last len("maybe not") - 1 characters were never sent
    sent_before_end = "".join(deltas[:-1])
    assert len(" yes, maybe") - len(sent_before_end) >= min(len("maybe not") - 1, len(" yes, maybe"))
    assert out[-1].finished and out[-1].outputs[0].finish_reason == "length"


def test_cumulative_and_n_samples(tokenizer):
    h = Harness(tokenizer)
    h.add("n", SamplingParams(n=2, max_tokens=3, seed=1))
    first = h.step([encode(tokenizer, " A")[0], encode(tokenizer, " B")[0]])
    assert [c.text for c in first[0].outputs] == [" A", " B"] and not first[0].finished
    second = h.step([encode(tokenizer, " C")[0], EOS])     # sample 1 stops at EOS
    assert [(c.text, c.finish_reason) for c in second[0].outputs] == [(" A C", None),
                                                                      (" B", "stop")]
    last = h.step([EOS])                # vLLM's order: the length cap comes before EOS
    assert [(c.text, c.finish_reason) for c in last[0].outputs] == [(" A C", "length"),
                                                                    (" B", "stop")]
    assert last[0].finished
    assert h.bm.all_free() and not h.processor.states
