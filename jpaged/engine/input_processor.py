"""Requests checked and tokenized on the caller's thread, before anything reaches the scheduler:
every refusal is a ValueError naming the field, the value and the fix, and leaves the engine and
its other requests untouched."""

from __future__ import annotations

import threading

import numpy as np

from jpaged.core.beam_search import BeamSearch
from jpaged.sampling_params import MAX_LOGPROBS, SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, tokenizer_lock: threading.Lock, *, vocab_size: int,
                 max_model_len: int, max_num_seqs: int):
        self.tokenizer = tokenizer
        self.tokenizer_lock = tokenizer_lock
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs

    def prompt(self, prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt: a string, or a dict with "prompt_token_ids"
        (and optionally its "prompt" text) or with "prompt"."""
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("The decoder prompt cannot be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"The decoder prompt (length {len(token_ids)}) is longer than the "
                             f"maximum model length of {self.max_model_len}, leaving no room to "
                             f"generate; shorten the prompt or raise max_model_len")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (vocab size "
                             f"{self.vocab_size})")
        return text, token_ids

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, (int, np.integer))
                                                                 for t in ids):
                    raise ValueError("prompt_token_ids must be a list of ints")
                return prompt.get("prompt"), [int(t) for t in ids]
            if "prompt" not in prompt:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids'; got keys "
                                 f"{sorted(prompt)}")
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids'; got "
                             f"{type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer, so text prompts cannot be encoded; "
                             "pass {'prompt_token_ids': [...]} instead")
        with self.tokenizer_lock:
            return prompt, list(self.tokenizer(prompt).input_ids)

    def sampling_params(self, params) -> SamplingParams:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if params.n > self.max_num_seqs:
            raise ValueError(f"SamplingParams: n={params.n} is more than max_num_seqs="
                             f"{self.max_num_seqs} (all n samples run together); lower n or "
                             f"raise max_num_seqs")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"SamplingParams: stop_token_ids {params.stop_token_ids} has ids outside "
                             f"the vocabulary (vocab size {self.vocab_size}); give ids below "
                             f"{self.vocab_size}")
        bad = [t for t in params.logit_bias or () if t >= self.vocab_size]
        if bad:
            raise ValueError(f"SamplingParams: logit_bias has token id {bad[0]} outside the "
                             f"vocabulary (vocab size {self.vocab_size}); give ids below "
                             f"{self.vocab_size}")
        return params

    def beam_search(self, search: BeamSearch) -> BeamSearch:
        if search.num_candidates > MAX_LOGPROBS:
            raise ValueError(f"BeamSearchParams: beam_width={search.beam_width} needs the top "
                             f"{search.num_candidates} log-probs per beam "
                             f"({len(search.eos_token_ids)} EOS ids), more than {MAX_LOGPROBS}; "
                             f"lower beam_width")
        if search.beam_width > self.max_num_seqs:
            raise ValueError(f"BeamSearchParams: beam_width={search.beam_width} is more than "
                             f"max_num_seqs={self.max_num_seqs}; lower it or raise max_num_seqs")
        return search
