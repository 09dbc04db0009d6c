"""Incremental detokenization: each new token's text in O(1) tokens of work, not a re-decode of
the whole output every step.

NOTE: a token's text can depend on its neighbours (SentencePiece drops the leading space of the
first token it decodes; byte-level BPE splits one UTF-8 character over several tokens). So, as in
vLLM, we decode a short window twice, `ids[prefix:read]` and `ids[prefix:]`, and emit the
difference; text ending in U+FFFD (an incomplete character) is held back until the next token
completes it. The window starts a few prompt tokens back, so the first output token decodes with
its real left context (" Paris" after "is", not "Paris").
"""

from __future__ import annotations

import contextlib

_CONTEXT = 5          # prompt tokens of left context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 lock=None):
        self.tokenizer = tokenizer
        self.lock = lock or contextlib.nullcontext()   # serialises use of a shared tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix = 0                 # window start
        self.read = len(self.ids)       # ids before `read` have been emitted as text
        self.text = ""                  # the output text so far

    def add(self, token_id: int) -> str:
        """Append one output token; return the text it completes (possibly "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""
        new = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """At the end: the text still held back (an incomplete character), as the tokenizer
        decodes it."""
        before = self._decode(self.ids[self.prefix:self.read])
        rest = self._decode(self.ids[self.prefix:])[len(before):]
        self.prefix = self.read = len(self.ids)
        self.text += rest
        return rest

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
