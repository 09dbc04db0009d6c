"""From a step's sequence updates to what callers see: stop strings, detokenized text,
RequestOutputs.

The scheduler has already appended each step's tokens and applied the token-level stops (length,
EOS, stop ids: update_from_output). Here each new token is detokenized, stop strings are searched
(only in the new text, only past min_tokens; a stop string overrides a length finish), a sequence
that hits one is finished through the scheduler, and each request's RequestOutput is built as its
`output_kind` asks (vLLM's RequestOutputKind):
  CUMULATIVE  every step that produced tokens: all text and token ids so far;
  DELTA       every step that produced tokens: only what is new since the last output;
  FINAL_ONLY  once, when the request finishes (what `LLM.generate` uses).
NOTE: streamed text holds back the last max(len(stop)) - 1 characters of a sequence that has stop
strings (unless include_stop_str_in_output), so a client never sees the start of a stop string
that is cut away a token later.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable

from jpaged.core.request import Request
from jpaged.core.sequence import Sequence
from jpaged.core.step import SeqUpdate
from jpaged.engine.detokenizer import IncrementalDetokenizer
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import RequestOutputKind, SamplingParams

FinishFn = Callable[[Sequence, str, "int | str | None"], None]


@dataclasses.dataclass
class Sent:
    """How much of one sample the caller has been given (for DELTA outputs)."""
    tokens: int = 0
    text: int = 0
    done: bool = False          # its final output (with the finish reason) went out


@dataclasses.dataclass
class RequestState:
    """What the caller side knows of a request: its prompt text and, per sample, the incremental
    detokenizer (None: decode once at the end) and how much was sent."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizers: list[IncrementalDetokenizer | None]
    sent: list[Sent]
    prompt_logprobs_sent: bool = False   # DELTA: they go out once, in the first output (vLLM)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # NOTE: a fast tokenizer's encode mutates its Rust state (padding/truncation settings), so
        # encoding on a server's thread while this one decodes can fail ("Already borrowed"):
        # every use of the engine's tokenizer holds this lock.
        self.tokenizer_lock = threading.Lock()
        self._lock = threading.Lock()
        self.states: dict[str, RequestState] = {}      # requests whose caller awaits outputs

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, num_samples: int) -> None:
        """Register a request (any thread); ValueError when its id is in use."""
        incremental = self.tokenizer is not None and (
            bool(params.stop) or params.output_kind is not RequestOutputKind.FINAL_ONLY)
        detokenizers = [IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                               params.skip_special_tokens, self.tokenizer_lock)
                        if incremental else None for _ in range(num_samples)]
        state = RequestState(request_id, prompt, prompt_token_ids, params, detokenizers,
                             [Sent() for _ in range(num_samples)])
        with self._lock:
            if request_id in self.states:
                raise ValueError(f"request_id {request_id!r} is already in use; give each "
                                 f"request a unique id")
            self.states[request_id] = state

    def remove(self, request_id: str) -> None:
        with self._lock:
            self.states.pop(request_id, None)

    def has(self, request_id: str) -> bool:
        return request_id in self.states

    def process(self, updates: list[SeqUpdate], finish: FinishFn) -> list[RequestOutput]:
        """Text and stop strings for every update, then one output per request that moved."""
        touched: dict[str, Request] = {}
        for update in updates:
            state = self.states[update.request.request_id]
            touched[state.request_id] = update.request
            if update.seq is not None:
                self._detokenize(update.seq, update.new_token_ids,
                                 state.detokenizers[update.seq.index], finish)
        outputs = []
        for request_id, request in touched.items():
            output = self._make_output(self.states[request_id], request)
            if output is not None:
                outputs.append(output)
            if request.finished:
                self.remove(request_id)
        return outputs

    def _detokenize(self, seq: Sequence, new_tokens: list[int],
                    detok: IncrementalDetokenizer | None, finish: FinishFn) -> None:
        """Add the new tokens' text; finish `seq` at the first stop string in it. A stop token's
        own text (EOS, a stop id) is added only with include_stop_str_in_output."""
        p = seq.params
        if detok is None:
            return
        for j, token in enumerate(new_tokens):
            if j == len(new_tokens) - 1 and _stopped_by_token(seq):
                if p.include_stop_str_in_output:
                    detok.add(token)
                return
            checked = len(detok.text)
            num_output = seq.num_output_tokens - (len(new_tokens) - 1 - j)
            if not detok.add(token) or num_output <= p.min_tokens:
                continue
            for stop in p.stop:
                at = detok.text.find(stop, max(0, checked - len(stop) + 1))
                if at >= 0:
                    _drop_last(seq, len(new_tokens) - 1 - j)
                    detok.text = detok.text[:at + (len(stop) if p.include_stop_str_in_output
                                                   else 0)]
                    if seq.is_finished:                # it overrides a length finish
                        seq.finish_reason, seq.stop_reason = "stop", stop
                    else:
                        finish(seq, "stop", stop)
                    return

    def _make_output(self, state: RequestState, request: Request) -> RequestOutput | None:
        """This step's output for a request that produced tokens, as its output_kind asks."""
        if request.beam is not None:
            if not request.finished:
                return None
            return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids,
                                 self._beam_outputs(request), finished=True)
        kind = state.params.output_kind
        finished = request.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        outputs = [self._completion(seq, detok, sent, delta=delta)
                   for seq, detok, sent in zip(request.seqs, state.detokenizers, state.sent)
                   if not delta or (not sent.done and (seq.num_output_tokens > sent.tokens
                                                       or seq.is_finished))]
        prompt_logprobs = None
        if state.params.prompt_logprobs is not None and not (delta and state.prompt_logprobs_sent):
            prompt_logprobs, state.prompt_logprobs_sent = request.seqs[0].prompt_logprobs, True
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs,
                             finished=finished, prompt_logprobs=prompt_logprobs)

    def _completion(self, seq: Sequence, detok, sent: Sent, *, delta: bool) -> CompletionOutput:
        text = self._text(seq, detok)
        first_token, first_char = (sent.tokens, sent.text) if delta else (0, 0)
        token_ids = seq.output_token_ids
        sent.tokens, sent.text, sent.done = len(token_ids), len(text), seq.is_finished
        logprobs = seq.logprobs[first_token:] if seq.params.logprobs is not None else None
        return CompletionOutput(
            index=seq.index, text=text[first_char:], token_ids=token_ids[first_token:],
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

    def _text(self, seq: Sequence, detok: IncrementalDetokenizer | None) -> str:
        """The output text so far. A stop token's own text is left out (vLLM), unless
        include_stop_str_in_output; so is a special token's with skip_special_tokens. A running
        sequence with stop strings holds back their possible start."""
        if self.tokenizer is None:
            return ""
        p = seq.params
        if detok is not None:
            if not seq.is_finished:
                hold = max((len(s) for s in p.stop), default=1) - 1
                return detok.text[:len(detok.text) - hold] if hold and \
                    not p.include_stop_str_in_output else detok.text
            if not isinstance(seq.stop_reason, str):      # a stop string's cut text is final
                detok.flush()
            return detok.text
        ids = seq.output_token_ids
        if _stopped_by_token(seq) and not p.include_stop_str_in_output:
            ids = ids[:-1]
        return self.decode(ids, p.skip_special_tokens)

    def _beam_outputs(self, request: Request) -> list[CompletionOutput]:
        """The finished hypotheses, best first (vLLM leaves a final EOS out of the text)."""
        out = []
        for rank, h in enumerate(request.finished_beams):
            ends_in_eos = h.output_tokens[-1] in request.beam.eos_token_ids
            text_ids = h.output_tokens[:-1] if ends_in_eos else h.output_tokens
            out.append(CompletionOutput(rank, self.decode(list(text_ids)), list(h.output_tokens),
                                        h.cum_logprob, None, "stop" if ends_in_eos else "length"))
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str | None:
        if self.tokenizer is None:
            return None
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _stopped_by_token(seq: Sequence) -> bool:
    """Finished by a stop token (EOS or a stop id: its text is left out), not by a stop string
    nor by a structured output's grammar completing on a text token (core/structured.py)."""
    return seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str) and not (
        seq.grammar is not None and seq.grammar.completed_by_text)


def _drop_last(seq: Sequence, count: int) -> None:
    """Drop the tokens a step appended after the one that completed a stop string (speculative
    decoding appends several per step; one at a time, they would never have been made)."""
    if not count:
        return
    dropped = seq.token_ids[-count:]
    del seq.token_ids[-count:]
    if seq.logprobs:
        for token, entry in zip(dropped, seq.logprobs[-count:]):
            seq.cumulative_logprob -= entry[token].logprob
        del seq.logprobs[-count:]
