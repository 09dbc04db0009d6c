"""Speculative decoding, host side: the validated `speculative_config` and the n-gram proposer.

A running sequence that decodes may bring k proposed tokens into its step besides its last
sampled one (k + 1 query tokens through the ragged step); the step returns logits at all k + 1
positions, the sampler verifies the proposals (engine/speculative.py) and keeps the accepted
ones plus one token of its own; the scheduler appends them and rolls the KV of the rejected
positions back (BlockManager.trim).

Methods (vLLM's names):
  - "ngram": prompt lookup. The longest suffix of the sequence (prompt_lookup_max down to
    prompt_lookup_min tokens) that occurred earlier proposes the tokens that followed it there;
    proposed on the host while scheduling, so a sequence with no match brings no extra tokens.
  - "layer_skip": self-speculation. The target's first `num_layers` layers, its final norm and
    LM head propose k tokens greedily, in one jitted draft call for every speculating sequence.
  - "draft_model": a smaller checkpoint with the target's vocabulary proposes k tokens greedily
    (one jitted call), over its own KV pool that mirrors the target's page for page.
NOTE: every proposer here is deterministic, i.e. a point-mass draft, so verification accepts a
proposal x with probability p(x) and resamples from p with x removed (vLLM's n-gram rule): the
output distribution is the target's exactly, whatever the proposer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

METHODS = ("ngram", "layer_skip", "draft_model")
_KEYS = {
    "ngram": {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"},
    "layer_skip": {"method", "num_speculative_tokens", "num_layers"},
    "draft_model": {"method", "num_speculative_tokens", "model"},
}


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int          # k: proposals per sequence and step
    prompt_lookup_max: int = 5           # ngram
    prompt_lookup_min: int = 2           # ngram
    num_layers: int = 0                  # layer_skip: the target's first m layers propose
    model: str | None = None             # draft_model: the draft checkpoint's path

    @classmethod
    def from_dict(cls, config: dict, num_model_layers: int | None = None) -> "SpeculativeConfig":
        """vLLM's speculative_config dict, validated; ValueError names the key, value and fix."""
        if isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict such as {{'method': 'ngram', "
                             f"'num_speculative_tokens': 3}}, got {type(config).__name__}")
        method = config.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config['method'] must be one of {list(METHODS)}, got "
                             f"{method!r}")
        unknown = set(config) - _KEYS[method]
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) {sorted(unknown)} for method "
                             f"{method!r}; allowed keys: {sorted(_KEYS[method])}")
        k = config.get("num_speculative_tokens")
        _check_int("num_speculative_tokens", k, 1, 16)
        out = cls(method, k)
        if method == "ngram":
            hi, lo = config.get("prompt_lookup_max", 5), config.get("prompt_lookup_min", 2)
            _check_int("prompt_lookup_max", hi, 1, 64)
            _check_int("prompt_lookup_min", lo, 1, hi)
            out = dataclasses.replace(out, prompt_lookup_max=hi, prompt_lookup_min=lo)
        elif method == "draft_model":
            path = config.get("model")
            if not isinstance(path, str) or not path:
                raise ValueError(f"speculative_config['model'] must be the path of the draft "
                                 f"checkpoint (same tokenizer as the target), got {path!r}")
            out = dataclasses.replace(out, model=path)
        else:
            m = config.get("num_layers")
            top = (num_model_layers - 1) if num_model_layers else 1 << 20
            _check_int("num_layers", m, 1, top)
            out = dataclasses.replace(out, num_layers=m)
        return out


def _check_int(key: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"speculative_config[{key!r}] must be an integer in [{lo}, {hi}], got "
                         f"{value!r}")


class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    longest suffix n-gram (n from prompt_lookup_max down to prompt_lookup_min)."""

    def __init__(self, config: SpeculativeConfig):
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, token_ids: list[int], k: int) -> tuple[int, ...]:
        num = len(token_ids)
        if k <= 0 or num <= self.min_n:
            return ()
        tokens = np.asarray(token_ids, np.int64)
        for n in range(min(self.max_n, num - 1), self.min_n - 1, -1):
            suffix = tokens[num - n:]
            # windows starting at 0 .. num - n - 1 (the suffix itself excluded)
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:num - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return tuple(int(t) for t in tokens[start:start + k])
        return ()
