"""Speculative decoding on the device: verifying proposals, and the layer-skip draft.

Verification (`Verifier`): a speculative step's logits are [B * A, V] (A = 1 + k; row b's
position j at b * A + j, the logits after its j-th new token). Position j is sampled as if it were
the row's own decode with the first j proposals appended (penalties, min_tokens bans, its output
index for the seed all shift by j: `position_rows`). Then, per row:
  - greedy: accept proposals while each equals the argmax; the first mismatch takes the argmax;
  - random: a proposal x (a point mass: every proposer here is deterministic) is accepted with
    probability p(x) (the target's distribution after temperature and filters); on rejection the
    token is drawn from p with x removed, renormalised. So each output token is distributed
    exactly as p (vLLM's rejection sampler with a one-hot draft).
  - when every proposal is accepted the last position's sample is the bonus token.
NOTE: randomness. Position j of a row draws from the same per-sequence stream as a plain step
(fold_in(key(seed), output index)); its acceptance uniform is fold_in of that key with 1. A seeded
request is reproducible, and a row with no proposals samples exactly as the plain sampler. A
position whose result is discarded (after a rejection) leaves its uniforms unread, so the next
step may use them again without correlation with anything kept.

Layer-skip draft (`LayerSkipDrafter`): the target's first m layers, final norm and LM head,
greedy, k decode steps in one jitted call for every speculating row.
NOTE: shared KV. Layer l's keys and values at a position depend only on the tokens up to it and
layers < l, so the draft's layers 0..m-1 KV of every verified token IS the target's: the draft
reads the target's cache as it is. Its own writes (layers < m at the proposal positions) land in
slots the verify step then rewrites for every layer, or that are rolled back; nothing is copied
and no page is added.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.core.stats import Stats
from jpaged.core.step import ScheduledSeq
from jpaged.engine import sampler
from jpaged.engine.sampler import (SamplerFlags, SamplingTensors, _apply_filters, _apply_penalties,
                                   _argmax, _sample_rows, build_sampling_tensors)
from jpaged.models.kv_cache import AttentionMetadata
from jpaged.sampling_params import MAX_LOGPROBS

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class _Position:
    """Row b's position j > 0 as the sampler sees it (build_sampling_tensors' fields)."""
    params: object
    seed: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    grammar: object = None
    samples: bool = False


def position_rows(rows: list[ScheduledSeq], width: int) -> list:
    """Rows * width entries: row b's position j as a decode with its first j proposals
    appended (the row itself at j = 0)."""
    out = []
    for r in rows:
        out.append(r)
        for j in range(1, width):
            j = min(j, r.num_spec_tokens)        # past its proposals: unused, any valid row
            ids = [*r.token_ids, *r.spec_token_ids[:j]] if r.params.uses_penalties else r.token_ids
            out.append(_Position(r.params, r.seed, ids, r.num_prompt_tokens,
                                 r.num_output_tokens + j))
    return out


def verify(logits, t: SamplingTensors, draft, num_draft, *, flags: SamplerFlags, width: int):
    """logits [B * A, V], t for position_rows, draft [B, A - 1] int32 proposals, num_draft [B]
    -> (tokens [B, A], num_tokens [B], and with flags.logprobs: logprobs [B, A], top ids and
    log-probs [B, A, MAX_LOGPROBS]; else None). Row b produced tokens[b, :num_tokens[b]]."""
    raw = logits
    if getattr(flags, "use_bitmask", False):    # structured outputs (#21) rows beside ours
        logits = sampler._apply_bitmask(logits, t.bitmask)
    if flags.use_bias:                          # logit_bias, as in sampler.sample
        logits = logits + t.bias
    if flags.use_penalties:
        logits = _apply_penalties(logits, t)
    if flags.use_bans:
        logits = jnp.where(t.banned, _NEG_INF, logits)
    num_rows, vocab = logits.shape
    batch = num_rows // width
    j = jnp.arange(width)
    has = j[None, :] < num_draft[:, None]                                   # [B, A]
    proposal = jnp.pad(draft, ((0, 0), (0, 1))).reshape(-1)                 # [B * A]
    greedy = _argmax(logits)                                                # [B * A]
    if flags.all_greedy:
        accept, tokens = proposal == greedy, greedy
    else:
        is_greedy = t.temperature <= 0.0
        scaled = logits / jnp.where(is_greedy, 1.0, t.temperature)[:, None]
        probs = jnp.exp(scaled - scaled.max(axis=-1, keepdims=True))       # unnormalised
        if flags.use_filters:
            probs = _apply_filters(scaled, probs, t.top_k, t.top_p, t.min_p)
        total = probs.sum(axis=-1)
        p_proposal = jnp.take_along_axis(probs, proposal[:, None], axis=-1)[:, 0] / total
        u = jax.vmap(_accept_uniform)(t.seeds, t.steps)
        is_proposal = (jnp.arange(vocab)[None, :] == proposal[:, None]) & has.reshape(-1, 1)
        residual = jnp.where(is_proposal, 0.0, probs)
        empty = residual.sum(axis=-1) <= 0                                  # p was all on x
        sampled = _sample_rows(residual, t.seeds, t.steps)
        picked = jnp.take_along_axis(residual, sampled[:, None], axis=-1)[:, 0]
        accept = jnp.where(is_greedy, proposal == greedy, (u < p_proposal) | empty)
        tokens = jnp.where(is_greedy | (picked <= 0), greedy, sampled)
    accept = accept.reshape(batch, width) & has
    num_accepted = jnp.sum(jnp.cumprod(accept, axis=1), axis=1)             # [B]
    out = jnp.where(j[None, :] < num_accepted[:, None], proposal.reshape(batch, width),
                    tokens.reshape(batch, width)).astype(jnp.int32)
    num_tokens = (num_accepted + 1).astype(jnp.int32)
    if not flags.logprobs:
        return out, num_tokens, None, None, None
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    token_lp = jnp.take_along_axis(logprobs, out.reshape(-1, 1), axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return (out, num_tokens, token_lp.reshape(batch, width),
            top_ids.astype(jnp.int32).reshape(batch, width, -1), top_lp.reshape(batch, width, -1))


def _accept_uniform(seed, step):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), 1)
    return jax.random.uniform(key, minval=0.0, maxval=1.0)


class Verifier:
    """The jitted `verify`, one compiled variant per (flags, A, B bucket), counted in Stats."""

    def __init__(self, vocab_size: int, max_model_len: int, stats: Stats):
        self.vocab_size, self.max_model_len, self.stats = vocab_size, max_model_len, stats
        self._jit = jax.jit(self._traced, static_argnames=("flags", "width"))

    def _traced(self, logits, t, draft, num_draft, *, flags, width):
        self.stats.num_sampler_compilations += 1
        return verify(logits, t, draft, num_draft, flags=flags, width=width)

    def __call__(self, logits, rows: list[ScheduledSeq], num_seqs: int, width: int,
                 eos_token_ids: tuple[int, ...]):
        """Device results of `verify` for `rows` (a step of bucket B = num_seqs, A = width)."""
        tensors, flags = build_sampling_tensors(position_rows(rows, width), num_seqs * width,
                                                self.vocab_size, self.max_model_len,
                                                eos_token_ids)
        draft = np.zeros((num_seqs, width - 1), np.int32)
        num_draft = np.zeros(num_seqs, np.int32)
        for i, r in enumerate(rows):
            draft[i, :len(r.spec_token_ids)] = r.spec_token_ids
            num_draft[i] = len(r.spec_token_ids)
        return self._jit(logits, tensors, draft, num_draft, flags=flags, width=width)


class LayerSkipDrafter:
    """Self-speculation: `model` is the target with config.num_layers = m (it scans layers
    0..m-1 of the same params and cache); k greedy decode steps in one jitted call."""

    def apply_moves(self, out) -> None:
        """The step's page moves (the target's cache is the draft's: nothing to do)."""

    def observe(self, inputs) -> None:
        """The step's inputs after the target ran them (its KV is the draft's: nothing to do)."""

    def __init__(self, model, page_size: int, num_speculative_tokens: int, stats: Stats):
        self.model, self.page_size, self.k, self.stats = model, page_size, num_speculative_tokens, \
            stats
        self._jit = jax.jit(self._draft, donate_argnames=("kv_cache",))

    def _draft(self, params, kv_cache, tokens, positions, block_tables, num_spec):
        """tokens, positions, num_spec [B], block_tables [B, P] -> (proposals [B, k], cache).
        Step i runs only the rows that want more than i proposals: the others' pages may not
        reach that far (they write the null page and attend to nothing)."""
        size = self.page_size
        rows = jnp.arange(tokens.shape[0])
        qsl = jnp.arange(tokens.shape[0] + 1, dtype=jnp.int32)

        def one(carry, i):                    # a scan, not an unrolled loop: one model to compile
            tokens, positions, kv_cache = carry
            valid = num_spec > i
            positions = jnp.where(valid, positions, 0)
            slots = block_tables[rows, positions // size] * size + positions % size
            metadata = AttentionMetadata(block_tables, jnp.where(valid, slots, 0),
                                         jnp.where(valid, positions + 1, 0), qsl, decode_only=True)
            logits, kv_cache = self.model.apply({"params": params}, tokens, positions, kv_cache,
                                                metadata)
            tokens = _argmax(logits)
            return (tokens, positions + 1, kv_cache), tokens

        (_, _, kv_cache), proposals = jax.lax.scan(one, (tokens, positions, kv_cache),
                                                   jnp.arange(self.k))
        return proposals.T, kv_cache                                        # [B, k]

    def draft(self, params, kv_cache, rows: list[ScheduledSeq], num_seqs: int, num_pages: int):
        """The rows with their proposals filled in (rows that asked for some) and the cache."""
        start = time.perf_counter()
        tokens = np.zeros(num_seqs, np.int32)
        positions = np.zeros(num_seqs, np.int32)
        num_spec = np.zeros(num_seqs, np.int32)
        tables = np.zeros((num_seqs, num_pages), np.int32)
        for i, r in enumerate(rows):
            if r.num_spec_tokens and not r.spec_token_ids:
                last = r.num_computed_tokens + r.num_new_tokens - r.num_spec_tokens - 1
                tokens[i], positions[i], num_spec[i] = r.token_ids[last], last, r.num_spec_tokens
                tables[i, :len(r.block_table)] = r.block_table
        proposals, kv_cache = self._jit(params, kv_cache, tokens, positions, tables, num_spec)
        proposals = np.asarray(proposals)
        rows = [dataclasses.replace(r, spec_token_ids=tuple(int(t) for t in
                                                            proposals[i, :r.num_spec_tokens]))
                if num_spec[i] else r for i, r in enumerate(rows)]
        self.stats.spec_decode_draft_seconds += time.perf_counter() - start
        return rows, kv_cache


class DraftModelDrafter(LayerSkipDrafter):
    """A smaller checkpoint with the target's vocabulary proposes (greedy, k steps, one jitted
    call). NOTE: its own KV pool, mirroring the target's page for page: the same page ids and
    block tables index a second cache of the draft's shape, so the block manager's bookkeeping
    (refcounts, copy-on-write, prefix cache, swap) serves both. Every step the draft also runs the
    step's own inputs (`observe`: prefill chunks, decodes, verified positions) so its KV holds
    exactly the tokens the target's does; the page moves of each step are applied to it too."""

    def __init__(self, model, params, kv_cache, page_mover, page_size: int,
                 num_speculative_tokens: int, stats: Stats):
        super().__init__(model, page_size, num_speculative_tokens, stats)
        self.params, self.kv_cache, self.pages = params, kv_cache, page_mover
        self._jit_observe = jax.jit(self._observe, donate_argnames=("kv_cache",))

    def _observe(self, params, kv_cache, batch):
        _, kv_cache = self.model.apply({"params": params}, batch.token_ids, batch.positions,
                                       kv_cache, batch.metadata)
        return kv_cache

    def apply_moves(self, out) -> None:
        self.kv_cache = self.pages.apply(out, self.kv_cache)

    def draft(self, params, kv_cache, rows, num_seqs: int, num_pages: int):
        """As LayerSkipDrafter.draft over the draft's own params and cache; the target's cache
        is returned untouched."""
        rows, self.kv_cache = super().draft(self.params, self.kv_cache, rows, num_seqs, num_pages)
        return rows, kv_cache

    def observe(self, inputs) -> None:
        """Run the draft over the step's inputs (writing its KV at every position the target
        computed in this step)."""
        start = time.perf_counter()
        batch = dataclasses.replace(inputs, logprob_targets=None, logits_indices=None)
        self.kv_cache = self._jit_observe(self.params, self.kv_cache, batch)
        self.stats.spec_decode_draft_seconds += time.perf_counter() - start
