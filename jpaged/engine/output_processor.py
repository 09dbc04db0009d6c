"""From sampled tokens to what callers see: stop checks, detokenized text, RequestOutputs.

Each step the engine hands every sampled token here; this decides whether its sequence stops
(vLLM's order: the length cap, EOS, stop token ids, then stop strings) and builds the step's
RequestOutputs according to each request's `output_kind` (vLLM's RequestOutputKind):
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

from jpaged.core.sequence import Sequence
from jpaged.engine.beam_search import BeamRequest
from jpaged.engine.detokenizer import IncrementalDetokenizer
from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import RequestOutputKind, SamplingParams


@dataclasses.dataclass
class Sent:
    """How much of one sample the caller has been given (for DELTA outputs)."""
    tokens: int = 0
    text: int = 0
    done: bool = False          # its final output (with the finish reason) went out


@dataclasses.dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None]   # per sample; None: decode once at the end
    sent: list[Sent]
    beam: BeamRequest | None = None        # a beam-search request (its seqs change every step)

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.search.done
        return all(seq.is_finished for seq in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        # NOTE: a fast tokenizer's encode mutates its Rust state (padding/truncation settings), so
        # encoding on a server's thread while this one decodes can fail ("Already borrowed"):
        # every use of the engine's tokenizer holds this lock.
        self.tokenizer_lock = threading.Lock()
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def new_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, seqs: list[Sequence]) -> RequestState:
        incremental = self.tokenizer is not None and (
            bool(params.stop) or params.output_kind is not RequestOutputKind.FINAL_ONLY)
        detokenizers = [IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                               params.skip_special_tokens, self.tokenizer_lock)
                        if incremental else None for _ in seqs]
        return RequestState(request_id, prompt, prompt_token_ids, params, seqs, detokenizers,
                            [Sent() for _ in seqs])

    def check_stop(self, seq: Sequence, token: int, detok: IncrementalDetokenizer | None
                   ) -> tuple[str, int | str | None] | None:
        """(finish_reason, stop_reason) when the token just appended to `seq` ends it, else None.
        EOS and stop ids are banned under min_tokens by the sampler; stop strings are searched
        only in the new text, only past min_tokens, and override a length finish."""
        p = seq.params
        finish = None
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            finish = ("length", None)
        elif (is_eos := not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            if detok is not None and p.include_stop_str_in_output:
                detok.add(token)                  # a stop token's text is output only if asked
            return ("stop", None if is_eos else token)
        if detok is None:
            return finish
        checked = len(detok.text)
        if not detok.add(token) or seq.num_output_tokens <= p.min_tokens:
            return finish
        for stop in p.stop:
            at = detok.text.find(stop, max(0, checked - len(stop) + 1))
            if at >= 0:
                detok.text = detok.text[:at + (len(stop) if p.include_stop_str_in_output else 0)]
                return ("stop", stop)
        return finish

    @staticmethod
    def record_logprobs(seq: Sequence, token: int, logprob: float, top_ids, top_logprobs) -> None:
        k = seq.params.logprobs
        if k is None:
            return
        seq.cumulative_logprob += logprob
        entry = {token: Logprob(logprob)}
        for rank, (tid, tlp) in enumerate(zip(top_ids[:k], top_logprobs[:k])):
            entry.setdefault(int(tid), Logprob(float(tlp), rank + 1))
        seq.logprobs.append(entry)

    def make_output(self, state: RequestState) -> RequestOutput | None:
        """This step's output for a request that produced tokens, as its output_kind asks."""
        if state.beam is not None:
            if not state.beam.search.done:
                return None
            return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids,
                                 state.beam.outputs(state.prompt_token_ids, self.decode),
                                 finished=True)
        kind = state.params.output_kind
        finished = state.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        outputs = [self._completion(seq, detok, sent, delta=delta)
                   for seq, detok, sent in zip(state.seqs, state.detokenizers, state.sent)
                   if not delta or (not sent.done and (seq.num_output_tokens > sent.tokens
                                                       or seq.is_finished))]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs,
                             finished=finished)

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
        stopped_by_token = seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str)
        if stopped_by_token and not p.include_stop_str_in_output:
            ids = ids[:-1]
        return self.decode(ids, p.skip_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str | None:
        if self.tokenizer is None:
            return None
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
