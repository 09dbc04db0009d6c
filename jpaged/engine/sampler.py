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

from jpaged.sampling_params import MAX_LOGPROBS
from jpaged.core.sequence import Sequence

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
    prompt_ids: jax.Array    # [B, Mp] int32, padded with V (empty when no penalties)
    output_ids: jax.Array    # [B, Mo] int32, padded with V
    banned_ids: jax.Array    # [B, Mb] int32, padded with V (EOS/stop ids before min_tokens)


jax.tree_util.register_dataclass(
    SamplingTensors, data_fields=[f.name for f in dataclasses.fields(SamplingTensors)], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static switches: each combination is one compiled sampler variant."""
    all_greedy: bool
    use_filters: bool
    use_penalties: bool
    logprobs: bool           # any sequence asked for logprobs: return them (top MAX_LOGPROBS too)


@dataclasses.dataclass
class SamplerOutput:
    token_ids: np.ndarray            # [B]
    logprobs: np.ndarray | None      # [B] logprob of the sampled token (when asked for)
    top_ids: np.ndarray | None       # [B, MAX_LOGPROBS]
    top_logprobs: np.ndarray | None  # [B, MAX_LOGPROBS]


def build_sampling_tensors(seqs: list[Sequence], num_rows: int, vocab_size: int,
                           eos_token_ids: tuple[int, ...]) -> tuple[dict, SamplerFlags]:
    """Host-side arrays for `seqs` padded to `num_rows`, plus the static flags."""
    params = [s.params for s in seqs]
    use_penalties = any(p.uses_penalties for p in params)
    flags = SamplerFlags(all_greedy=all(p.greedy for p in params),
                         use_filters=any(p.uses_filters for p in params),
                         use_penalties=use_penalties,
                         logprobs=any(p.logprobs is not None for p in params))

    def column(fn, dtype, fill):
        out = np.full(num_rows, fill, dtype)
        out[:len(seqs)] = [fn(s) for s in seqs]
        return out

    banned = [_banned_ids(s, eos_token_ids) for s in seqs]
    tensors = dict(
        temperature=column(lambda s: 0.0 if s.params.greedy else s.params.temperature, np.float32, 0.0),
        top_k=column(lambda s: s.params.top_k, np.int32, 0),
        top_p=column(lambda s: s.params.top_p, np.float32, 1.0),
        min_p=column(lambda s: s.params.min_p, np.float32, 0.0),
        seeds=column(lambda s: s.seed, np.uint32, 0),
        steps=column(lambda s: s.num_output_tokens, np.int32, 0),
        presence=column(lambda s: s.params.presence_penalty, np.float32, 0.0),
        frequency=column(lambda s: s.params.frequency_penalty, np.float32, 0.0),
        repetition=column(lambda s: s.params.repetition_penalty, np.float32, 1.0),
        prompt_ids=_pad_ids([s.prompt_token_ids for s in seqs] if use_penalties else [], num_rows,
                            vocab_size),
        output_ids=_pad_ids([s.output_token_ids for s in seqs] if use_penalties else [], num_rows,
                            vocab_size),
        banned_ids=_pad_ids(banned if any(banned) else [], num_rows, vocab_size),
    )
    return tensors, flags


def _banned_ids(seq: Sequence, eos_token_ids: tuple[int, ...]) -> list[int]:
    if seq.num_output_tokens >= seq.params.min_tokens:
        return []
    eos = [] if seq.params.ignore_eos else list(eos_token_ids)
    return eos + seq.params.stop_token_ids


def _pad_ids(rows: list[list[int]], num_rows: int, pad: int) -> np.ndarray:
    """[num_rows, width] with width a power of two (0 when there is nothing), padded with `pad`."""
    longest = max((len(r) for r in rows), default=0)
    width = 0 if longest == 0 else 1 << (longest - 1).bit_length()
    out = np.full((num_rows, width), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def sample(logits, t: SamplingTensors, *, flags: SamplerFlags):
    """logits [B, V] float32 -> (token ids [B], and when flags.logprobs: sampled logprobs [B],
    top ids/logprobs [B, MAX_LOGPROBS]; else None).

    NOTE: no full-vocabulary sort or cumsum anywhere (on CPU a [32, 49152] sort takes ~270 ms):
    argmax is max + first index, top-k/top-p thresholds come from bisection, and the CDF is
    inverted in two levels (chunk sums, then one chunk).
    """
    raw = logits
    if flags.use_penalties:
        logits = _apply_penalties(logits, t)
    if t.banned_ids.shape[1]:
        logits = _scatter_rows(logits, t.banned_ids, _NEG_INF, mode="set")
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
    counts = _scatter_rows(jnp.zeros((num_rows, vocab), jnp.float32), t.output_ids, 1.0, mode="add")
    in_prompt = _scatter_rows(jnp.zeros((num_rows, vocab), jnp.float32), t.prompt_ids, 1.0,
                              mode="set") > 0
    seen = in_prompt | (counts > 0)
    rep = t.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - t.frequency[:, None] * counts - t.presence[:, None] * (counts > 0)


def _scatter_rows(x, ids, value, *, mode):
    """Set or add `value` at x[b, ids[b, j]] for every id < V (ids == V is padding, dropped)."""
    rows = jnp.broadcast_to(jnp.arange(x.shape[0])[:, None], ids.shape)
    ref = x.at[rows, ids]
    return ref.set(value, mode="drop") if mode == "set" else ref.add(value, mode="drop")
