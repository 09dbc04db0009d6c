"""On-device sampling from the last-token logits of each sequence.

Per-sequence randomness: row b draws one uniform from `fold_in(key(seeds[b]), steps[b])` (its
output index) and inverts the CDF of its filtered distribution, so the same seed gives the same
text whatever else shares the batch, and a preempted-and-recomputed sequence resumes its stream.
Only B random numbers are drawn per step, not B x V.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.core.step import ScheduledSeq
from jpaged.core.structured import bitmask_width, fill_bitmasks
from jpaged.sampling_params import MAX_LOGPROBS

_NEG_INF = -jnp.inf


@dataclasses.dataclass
class SamplingTensors:
    temperature: jax.Array   # [B] float32, 0 = greedy
    top_k: jax.Array         # [B] int32, 0 = off
    top_p: jax.Array         # [B] float32
    min_p: jax.Array         # [B] float32
    seeds: jax.Array         # [B] uint32
    steps: jax.Array         # [B] int32, index of the token being sampled in the output
    presence: jax.Array      # [B] float32
    frequency: jax.Array     # [B] float32
    repetition: jax.Array    # [B] float32
    token_ids: jax.Array     # [B, M] int32 prompt + output ids, padded with V ([B, 0] without penalties)
    prompt_lens: jax.Array   # [B] int32: token_ids[b, :prompt_lens[b]] is the prompt
    banned: jax.Array        # [B, V] bool: EOS / stop ids under min_tokens ([B, 0] when none)
    # [B, ceil(V/32)] int32: bit t % 32 of word t // 32 allows token t (structured outputs; all
    # ones for free rows; [B, 0] when no row is constrained, None outside the engine)
    bitmask: jax.Array | None = None
    # [B, V] float32 added to the logits (logit_bias; [B, 0] when no row has one, None outside
    # the engine)
    bias: jax.Array | None = None


jax.tree_util.register_dataclass(
    SamplingTensors, data_fields=[f.name for f in dataclasses.fields(SamplingTensors)], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static switches: each combination is one compiled sampler variant (a fixed, small set, so a
    long run never compiles again: every array's shape depends only on B, M and V)."""
    all_greedy: bool
    use_filters: bool
    use_penalties: bool
    use_bans: bool           # some row is under min_tokens with ids to ban
    logprobs: bool           # any sequence asked for logprobs: return them (top MAX_LOGPROBS too)
    use_bitmask: bool = False  # some row has structured outputs: apply the token bitmask
    use_bias: bool = False     # some row has a logit_bias


def build_sampling_tensors(rows: list[ScheduledSeq], num_rows: int, vocab_size: int,
                           max_model_len: int, eos_token_ids: tuple[int, ...]
                           ) -> tuple[SamplingTensors, SamplerFlags]:
    """Host-side arrays for `rows` padded to `num_rows`, plus the static flags.

    NOTE: fixed shapes. Penalty ids are [B, max_model_len] and bans a [B, V] mask, so neither
    grows with the outputs: the sampler compiles once per flag combination and B bucket.
    """
    params = [r.params for r in rows]
    banned = [_banned_ids(r, eos_token_ids) for r in rows]
    flags = SamplerFlags(all_greedy=all(p.greedy for p in params),
                         use_filters=any(p.uses_filters for p in params),
                         use_penalties=any(p.uses_penalties for p in params),
                         use_bans=any(banned),
                         logprobs=any(p.logprobs is not None for p in params),
                         use_bitmask=any(p.structured_outputs is not None for p in params),
                         use_bias=any(p.logit_bias for p in params))

    def column(values, dtype, fill):
        out = np.full(num_rows, fill, dtype)
        out[:len(rows)] = values
        return out

    token_ids = np.full((num_rows, max_model_len if flags.use_penalties else 0), vocab_size, np.int32)
    mask = np.zeros((num_rows, vocab_size if flags.use_bans else 0), bool)
    for i, r in enumerate(rows):
        if flags.use_penalties and r.params.uses_penalties:
            token_ids[i, :len(r.token_ids)] = r.token_ids
        mask[i, [t for t in banned[i] if t < vocab_size]] = True
    bias = np.zeros((num_rows, vocab_size if flags.use_bias else 0), np.float32)
    for i, p in enumerate(params):
        for token, value in (p.logit_bias or {}).items():
            bias[i, token] = value
    # NOTE: the runner calls this after dispatching the step, so the grammar masks are computed
    # on the host while the device runs the model.
    bitmask = np.full((num_rows, bitmask_width(vocab_size) if flags.use_bitmask else 0), -1,
                      np.int32)
    fill_bitmasks([(r.grammar, i) for i, r in enumerate(rows) if r.grammar is not None
                   and r.samples], bitmask)
    tensors = SamplingTensors(
        temperature=column([0.0 if p.greedy else p.temperature for p in params], np.float32, 0.0),
        top_k=column([p.top_k for p in params], np.int32, 0),
        top_p=column([p.top_p for p in params], np.float32, 1.0),
        min_p=column([p.min_p for p in params], np.float32, 0.0),
        seeds=column([r.seed for r in rows], np.uint32, 0),
        steps=column([r.num_output_tokens for r in rows], np.int32, 0),
        presence=column([p.presence_penalty for p in params], np.float32, 0.0),
        frequency=column([p.frequency_penalty for p in params], np.float32, 0.0),
        repetition=column([p.repetition_penalty for p in params], np.float32, 1.0),
        token_ids=token_ids,
        prompt_lens=column([r.num_prompt_tokens for r in rows], np.int32, 0),
        banned=mask,
        bitmask=bitmask,
        bias=bias,
    )
    return tensors, flags


def _banned_ids(row: ScheduledSeq, eos_token_ids: tuple[int, ...]) -> list[int]:
    """vLLM's min_tokens: the model's EOS ids and the stop ids are banned until min_tokens output
    tokens exist, also with ignore_eos=True (vLLM always adds the EOS id to the banned set)."""
    if row.num_output_tokens >= row.params.min_tokens:
        return []
    return [*eos_token_ids, *row.params.stop_token_ids]


def sample(logits, t: SamplingTensors, *, flags: SamplerFlags):
    """logits [B, V] float32 -> (token ids [B], and when flags.logprobs: sampled logprobs [B],
    top ids/logprobs [B, MAX_LOGPROBS]; else None).

    NOTE: no full-vocabulary sort or cumsum anywhere (on CPU a [32, 49152] sort takes ~270 ms):
    argmax is max + first index, top-k/top-p thresholds come from bisection, and the CDF is
    inverted in two levels (chunk sums, then one chunk).
    """
    raw = logits
    if flags.use_bitmask:
        logits = _apply_bitmask(logits, t.bitmask)
    if flags.use_bias:                     # vLLM: logit bias before penalties and sampling
        logits = logits + t.bias
    if flags.use_penalties:
        logits = _apply_penalties(logits, t)
    if flags.use_bans:
        logits = jnp.where(t.banned, _NEG_INF, logits)
    greedy = _argmax(logits)
    if flags.all_greedy:
        tokens = greedy
    else:
        is_greedy = t.temperature <= 0.0
        scaled = logits / jnp.where(is_greedy, 1.0, t.temperature)[:, None]
        probs = jnp.exp(scaled - scaled.max(axis=-1, keepdims=True))       # unnormalised
        if flags.use_filters:
            probs = _apply_filters(scaled, probs, t.top_k, t.top_p, t.min_p)
        sampled = _sample_rows(probs, t.seeds, t.steps)
        # Guard against a float rounding that lands on a zero-probability token.
        picked = jnp.take_along_axis(probs, sampled[:, None], axis=-1)[:, 0]
        tokens = jnp.where(is_greedy | (picked <= 0), greedy, sampled)
    if not flags.logprobs:
        return tokens, None, None, None
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return tokens, token_logprobs, top_ids.astype(jnp.int32), top_lp


def _apply_bitmask(logits, bitmask):
    """-inf for every token whose bit is 0 in bitmask [B, ceil(V/32)] int32 (structured
    outputs); unpacked with shifts, one elementwise pass over [B, V]."""
    num_rows, vocab = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1            # [B, W, 32]
    allowed = bits.reshape(num_rows, -1)[:, :vocab] != 0
    return jnp.where(allowed, logits, _NEG_INF)


def _argmax(x):
    """First index of the row maximum (XLA CPU's variadic-reduce argmax is ~4x slower)."""
    is_max = x == x.max(axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(is_max, index, x.shape[-1]), axis=-1).astype(jnp.int32)


def _sample_rows(probs, seeds, steps, chunk=256):
    """Inverse-CDF sampling from unnormalised probs [B, V] with one uniform per row: find the
    chunk of `chunk` tokens where u * total falls, then the token inside it."""
    def uniform(seed, step):
        return jax.random.uniform(jax.random.fold_in(jax.random.key(seed), step), minval=1e-7,
                                  maxval=1.0)
    u = jax.vmap(uniform)(seeds, steps)                                     # [B]
    num_rows, vocab = probs.shape
    padded = jnp.pad(probs, ((0, 0), (0, -vocab % chunk)))
    chunks = padded.reshape(num_rows, -1, chunk)                            # [B, V/chunk, chunk]
    chunk_cdf = jnp.cumsum(chunks.sum(axis=-1), axis=-1)                    # [B, V/chunk]
    target = u * chunk_cdf[:, -1]
    c = jnp.minimum(jnp.sum(chunk_cdf < target[:, None], axis=-1), chunk_cdf.shape[1] - 1)
    before = jnp.where(c > 0, jnp.take_along_axis(chunk_cdf, jnp.maximum(c - 1, 0)[:, None],
                                                  axis=-1)[:, 0], 0.0)
    inside = jnp.cumsum(jnp.take_along_axis(chunks, c[:, None, None], axis=1)[:, 0], axis=-1)
    j = jnp.minimum(jnp.sum(inside < (target - before)[:, None], axis=-1), chunk - 1)
    return jnp.minimum(c * chunk + j, vocab - 1).astype(jnp.int32)


def _apply_filters(scaled, probs, top_k, top_p, min_p, iterations=24):
    """Zero every prob outside top-k, then top-p (of the top-k renormalised mass), then min-p.

    Thresholds by bisection, each step one fused pass over [B, V]: the k-th largest logit is the
    largest t with count(scaled >= t) >= k; the top-p cut is the largest q with
    mass(probs >= q) >= top_p * total. 24 halvings resolve float32; a search no row needs is
    skipped at run time.
    """
    vocab = scaled.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.int32)

    def bisect(needed, lo, hi, enough):
        def body(_, bounds):
            lo, hi = bounds
            mid = (lo + hi) / 2
            ok = enough(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
        search = lambda: jax.lax.fori_loop(0, iterations, body, (lo, hi))[0]
        return jax.lax.cond(jnp.any(needed), search, lambda: lo)

    row_max = scaled.max(axis=-1)
    kth = bisect(k < vocab, scaled.min(axis=-1), row_max,
                 lambda t: jnp.sum(scaled >= t[:, None], axis=-1) >= k)
    kth = jnp.where(k >= vocab, _NEG_INF, kth)
    probs = jnp.where(scaled >= kth[:, None], probs, 0.0)
    need = top_p * probs.sum(axis=-1)
    pth = bisect(top_p < 1.0, jnp.zeros_like(need), probs.max(axis=-1),
                 lambda q: jnp.sum(jnp.where(probs >= q[:, None], probs, 0.0), axis=-1) >= need)
    pth = jnp.where(top_p >= 1.0, 0.0, pth)
    keep = (probs >= pth[:, None]) & (probs >= (min_p * probs.max(axis=-1))[:, None])
    return jnp.where(keep, probs, 0.0)


def _apply_penalties(logits, t: SamplingTensors):
    """vLLM semantics: repetition over prompt+output, presence/frequency over the output."""
    num_rows, vocab = logits.shape
    is_output = jnp.arange(t.token_ids.shape[1])[None, :] >= t.prompt_lens[:, None]     # [B, M]
    counts = _count_rows(num_rows, vocab, t.token_ids, is_output)                       # [B, V]
    in_prompt = _count_rows(num_rows, vocab, t.token_ids, ~is_output) > 0
    seen = in_prompt | (counts > 0)
    rep = t.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - t.frequency[:, None] * counts - t.presence[:, None] * (counts > 0)


def _count_rows(num_rows, vocab, ids, where):
    """[B, V] float32 counts of ids[b, j] over the j where `where[b, j]`; ids == V (padding) are
    dropped."""
    rows = jnp.broadcast_to(jnp.arange(num_rows)[:, None], ids.shape)
    zeros = jnp.zeros((num_rows, vocab), jnp.float32)
    return zeros.at[rows, ids].add(where.astype(jnp.float32), mode="drop")
