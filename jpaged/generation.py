"""The research API: `load` a checkpoint and `generate` with a pure, jittable function.

`generate` runs the whole loop on device: one ragged prefill of every prompt, then decode steps under
`lax.while_loop` over a paged KV cache that it allocates itself, with the engine's model
(`CausalLM.apply` with `KVCache` / `AttentionMetadata`), attention functions and sampler. No host
scheduling happens between steps, so it can sit inside a user's own jitted code, under `jax.vmap`
(over `rng`, say) and with params sharded over a `jax.sharding.Mesh`.

    model, params, tokenizer = jpaged.load(path)
    gen = jax.jit(jpaged.generate, static_argnames=("model", "max_new_tokens", "page_size",
                                                     "num_pages", "eos_token_id"))
    out = gen(model, params, prompt_tokens, prompt_lengths, max_new_tokens=64,
              rng=jax.random.key(0), eos_token_id=model.config.eos_token_ids)

NOTE: params are in the layout of jpaged/models/weights.py, the layer stack in either placement;
`load` arranges them for the device (per layer on one CPU device, where each layer then reads its
matmul weights in place: SmolLM2, 32 prompts x 128 tokens on the 2-core CPU, 39-41 s of CPU time
stacked, 32-34 s per layer). `jpaged.models.arrange_layers(params)` does the same for params of
your own.
NOTE: the module is `generation`, not `generate`: importing a submodule sets it as an attribute of
its package, which would shadow the function `jpaged.generate` after the first import.
NOTE: static page assignment. Sequence b owns the contiguous pages 1 + b*P .. (b+1)*P, with P =
ceil((prompt width + max_new_tokens - 1) / page_size) (the last sampled token is never fed back);
page 0 is the null page that absorbs the prefill's padding tokens. Nothing is allocated or freed
while the loop runs, so the loop needs no host.
NOTE: stop. A sequence stops after its first EOS (any of `eos_token_id`); its later rows of `tokens`
and `logprobs` are 0 and `lengths` counts its generated tokens, the EOS included. The loop ends when
every sequence has stopped or `max_new_tokens` tokens exist. Stopped sequences keep computing (fixed
shapes) but write only into their own pages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jpaged.engine.sampler import SamplerFlags, SamplingTensors, sample
from jpaged.models import (AttentionFns, AttentionMetadata, CausalLM, KVCache, arrange_layers,
                           reference_attention, slot_mapping)
from jpaged.models.lora import LoRABatch, slotted
from jpaged.models.weights import held_for_platform


@dataclasses.dataclass
class GenerateOutput:
    tokens: jax.Array     # [B, max_new_tokens] int32; 0 after a sequence's stop
    logprobs: jax.Array   # [B, max_new_tokens] float32 log-prob of each token under the model's
                          # distribution (before temperature / top-k / top-p); 0 after the stop
    lengths: jax.Array    # [B] int32 generated tokens, the EOS included


jax.tree_util.register_dataclass(GenerateOutput, data_fields=["tokens", "logprobs", "lengths"],
                                 meta_fields=[])


def load(path, dtype: str | None = None, mesh=None,
         enable_expert_parallel: bool = False) -> tuple[CausalLM, dict, Any]:
    """(model, params, tokenizer) from a converted jpaged checkpoint, an HF directory or a `.gguf`.

    `model.config` is the ModelConfig, its `eos_token_ids` merged from config.json,
    generation_config.json and the tokenizer (the engine's set). params: the layout of
    jpaged/models/weights.py, arranged for the device (arrange_layers). dtype: None keeps the stored one
    (float32 for GGUF); "float32" | "bfloat16" | "float16" converts. The tokenizer may be None.
    mesh: a 1-D `jax.sharding.Mesh` for tensor parallelism (jpaged/parallel.py): params come back
    in their shards (a jpaged checkpoint is restored by Orbax straight into them), and the model's
    attention runs per device under shard_map; its config then counts the KV heads as replicated
    (num_kv_heads = mesh size when the mesh outnumbers them). An MoE model's experts are split
    over the mesh by expert with `enable_expert_parallel`, else by their MLP width.
    """
    from jpaged.checkpoint.loader import load_checkpoint

    checkpoint = load_checkpoint(path, dtype=dtype, progress=False, mesh=mesh)
    checkpoint = dataclasses.replace(checkpoint, params=held_for_platform(checkpoint.params))
    config = dataclasses.replace(checkpoint.config, eos_token_ids=tuple(checkpoint.eos_token_ids))
    if mesh is None:
        return (CausalLM(config, jnp.dtype(checkpoint.dtype)), arrange_layers(checkpoint.params),
                checkpoint.tokenizer)
    from jpaged.parallel import TensorParallel
    tp = TensorParallel.create(config, mesh=mesh, expert_parallel=enable_expert_parallel)
    model = CausalLM(tp.model_config, jnp.dtype(checkpoint.dtype),
                     tp.wrap_attention(reference_attention()),
                     moe=tp.moe_fn() if config.is_moe else None)
    return model, tp.shard_params(checkpoint.params), checkpoint.tokenizer


class _LoopState(NamedTuple):
    step: jax.Array        # [] int32, index of the output token being produced
    kv_cache: KVCache
    last: jax.Array        # [B] int32, the token sampled at step - 1
    tokens: jax.Array      # [B, M] int32
    logprobs: jax.Array    # [B, M] float32
    lengths: jax.Array     # [B] int32
    done: jax.Array        # [B] bool


def generate(model: CausalLM, params, prompt_tokens, prompt_lengths, *, max_new_tokens: int, rng,
             temperature=0.0, top_k=None, top_p=None, page_size: int = 16,
             num_pages: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             min_new_tokens: int = 0, attention: AttentionFns | None = None, lora=None,
             lora_index=None) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens for each of B ragged prompts; pure and jittable.

    prompt_tokens [B, W] int32, prompt b in prompt_tokens[b, :prompt_lengths[b]] (1 <= length <= W,
    the rest ignored); prompt_lengths [B] int32. rng: a PRNG key; row b samples with the seed
    `jax.random.bits(rng, (B,))[b]` and step = its output index, like the engine's per-sequence seeds.
    temperature 0 is greedy (exact argmax); it, top_k and top_p (None: off) may be traced scalars.
    Static: model, max_new_tokens, page_size, num_pages (default: exactly the pages needed, 1 + B*P),
    eos_token_id (None: never stop early), min_new_tokens (EOS is banned, so cannot be sampled,
    before that many tokens: vLLM's min_tokens, HF's min_new_tokens) and attention (default: the
    model's own). A LongRoPE model (Phi-3) picks its short or long factors by
    `model.config.max_model_len`, or when that is None by this call's longest sequence
    (W + max_new_tokens - 1), vLLM's rule (jpaged/config.py).
    lora: LoRA weights as a pytree, unmerged: one adapter in jpaged/lora's layout ([L, ...] leaves,
    `jpaged.lora.load_lora` reads a PEFT directory into it) for every row, or several stacked in
    the slotted layout (jpaged/models/lora.py; `jpaged.lora.stack_adapters`) with lora_index [B]
    int32 picking row b's adapter (-1: the base model). A fine-tuning loop samples from its
    current LoRA params this way, traced, without merging them into `params`.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)                    # [B, W]
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)                  # [B]
    num_seqs, width = prompt_tokens.shape
    pages_per_seq = _check_args(model, prompt_lengths, num_seqs, width, max_new_tokens, page_size,
                                num_pages, temperature, top_k, top_p, min_new_tokens)
    if attention is not None:
        model = model.clone(attention=attention)
    if model.config.max_model_len is None:   # this call's longest sequence (LongRoPE's choice)
        model = model.clone(config=dataclasses.replace(
            model.config, max_model_len=width + max_new_tokens - 1))
    num_pages = num_pages or 1 + num_seqs * pages_per_seq
    block_tables = 1 + jnp.arange(num_seqs * pages_per_seq, dtype=jnp.int32).reshape(
        num_seqs, pages_per_seq)                                             # [B, P]
    kv_cache = KVCache.zeros(model.config, num_pages, page_size, model.dtype)
    eos = None if eos_token_id is None else jnp.atleast_1d(jnp.asarray(eos_token_id, jnp.int32))
    sample_step = _make_sampler(rng, prompt_lengths, model.config.vocab_size, temperature, top_k,
                                top_p, eos, min_new_tokens)

    def sample_into(state: _LoopState, logits, kv_cache) -> _LoopState:
        """Sample output token `state.step` for every row and record it where the row is alive."""
        token, logprob = sample_step(logits, state.step)
        alive = ~state.done
        stops = alive & (jnp.isin(token, eos) if eos is not None else False)
        return _LoopState(state.step + 1, kv_cache, token,
                          state.tokens.at[:, state.step].set(jnp.where(alive, token, 0)),
                          state.logprobs.at[:, state.step].set(jnp.where(alive, logprob, 0.0)),
                          state.lengths + alive, state.done | stops)

    lora_weights, row_slots = _lora_rows(lora, lora_index, num_seqs)

    def lora_batch(token_slots):
        return None if lora is None else LoRABatch(lora_weights, token_slots)

    def decode(state: _LoopState) -> _LoopState:
        positions = prompt_lengths + state.step - 1                          # [B]
        logits, kv_cache = model.apply({"params": params}, state.last, positions, state.kv_cache,
                                       _decode_metadata(block_tables, positions, page_size),
                                       lora=lora_batch(row_slots))
        return sample_into(state, logits, kv_cache)

    def more(state: _LoopState):
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    # NOTE: the prefill's block table covers the prompts only: the reference attention reads every
    # page of the table, and the decode pages are still empty.
    token_ids, positions, metadata, pack = _prefill_inputs(
        prompt_tokens, prompt_lengths, block_tables[:, :-(-width // page_size)], page_size)
    logits, kv_cache = model.apply(
        {"params": params}, token_ids, positions, kv_cache, metadata,
        lora=lora_batch(pack(jnp.broadcast_to(row_slots[:, None], (num_seqs, width)))))
    start = _LoopState(jnp.int32(0), kv_cache, jnp.zeros(num_seqs, jnp.int32),
                       jnp.zeros((num_seqs, max_new_tokens), jnp.int32),
                       jnp.zeros((num_seqs, max_new_tokens), jnp.float32),
                       jnp.zeros(num_seqs, jnp.int32), jnp.zeros(num_seqs, bool))
    final = jax.lax.while_loop(more, decode, sample_into(start, logits, kv_cache))
    return GenerateOutput(final.tokens, final.logprobs, final.lengths)


def _prefill_inputs(prompt_tokens, prompt_lengths, block_tables, page_size: int):
    """Pack the [B, W] prompts into one ragged batch of T = B*W tokens: (token_ids [T], positions
    [T]), then the metadata. Tokens past the packed ones are padding on slot 0 of the null page."""
    num_seqs, width = prompt_tokens.shape
    query_start_loc = jnp.concatenate([jnp.zeros(1, jnp.int32),
                                       jnp.cumsum(prompt_lengths, dtype=jnp.int32)])   # [B+1]
    position = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (num_seqs, width))  # [B, W]
    # Where each prompt token goes in the packed batch; out of range (dropped) past its prompt.
    dest = jnp.where(position < prompt_lengths[:, None], query_start_loc[:-1, None] + position,
                     num_seqs * width).ravel()
    rows = jnp.broadcast_to(jnp.arange(num_seqs, dtype=jnp.int32)[:, None], (num_seqs, width))
    slots = slot_mapping(block_tables, rows, position, page_size)                       # [B, W]

    def pack(values):
        return jnp.zeros(num_seqs * width, jnp.int32).at[dest].set(values.ravel(), mode="drop")
    metadata = AttentionMetadata(block_tables, pack(slots), prompt_lengths, query_start_loc)
    return pack(prompt_tokens), pack(position), metadata, pack


def _lora_rows(lora, lora_index, num_seqs: int):
    """(slotted LoRA weights, each row's token slot [B]: 0 none, s = slot s - 1)."""
    if lora is None:
        return None, jnp.zeros(num_seqs, jnp.int32)
    if jnp.ndim(lora["qkv_a"]) == 4:                     # one adapter ([L, D, 3, R]) for all rows
        if lora_index is not None:
            raise ValueError("lora_index picks among stacked adapters; this lora is one adapter "
                             "(stack several with jpaged.lora.stack_adapters)")
        return slotted(lora), jnp.ones(num_seqs, jnp.int32)
    if lora_index is None:
        raise ValueError("stacked LoRA adapters need lora_index [B] (each row's adapter, -1 none)")
    return lora, jnp.asarray(lora_index, jnp.int32) + 1


def _decode_metadata(block_tables, positions, page_size: int) -> AttentionMetadata:
    """One token per sequence at `positions` [B]."""
    num_seqs = block_tables.shape[0]
    rows = jnp.arange(num_seqs, dtype=jnp.int32)
    return AttentionMetadata(block_tables, slot_mapping(block_tables, rows, positions, page_size),
                             positions + 1, jnp.arange(num_seqs + 1, dtype=jnp.int32),
                             decode_only=True)


def _make_sampler(rng, prompt_lengths, vocab_size: int, temperature, top_k, top_p, eos,
                  min_new_tokens: int):
    """The engine's sampler as `(logits [B, V], step) -> (tokens [B], logprobs [B])`."""
    num_seqs = prompt_lengths.shape[0]
    tensors = _sampling_tensors(rng, prompt_lengths, temperature, top_k, top_p)
    use_bans = eos is not None and min_new_tokens > 0
    flags = SamplerFlags(all_greedy=isinstance(temperature, (int, float)) and temperature == 0,
                         use_filters=top_k is not None or top_p is not None, use_penalties=False,
                         use_bans=use_bans, logprobs=True)
    eos_mask = jnp.zeros(vocab_size, bool).at[eos].set(True) if use_bans else None      # [V]

    def sample_step(logits, step):
        t = dataclasses.replace(tensors, steps=jnp.full((num_seqs,), step, jnp.int32))
        if use_bans:
            t = dataclasses.replace(t, banned=jnp.broadcast_to(
                eos_mask & (step < min_new_tokens), (num_seqs, vocab_size)))      # [B, V]
        token, logprob, _, _ = sample(logits, t, flags=flags)   # top-k logprobs: dead code, dropped
        return token, logprob
    return sample_step


def _sampling_tensors(rng, prompt_lengths, temperature, top_k, top_p) -> SamplingTensors:
    """The engine sampler's per-row inputs: seeds drawn from `rng`, no penalties or bans."""
    num_seqs = prompt_lengths.shape[0]

    def column(value, dtype):
        return jnp.broadcast_to(jnp.asarray(value, dtype), (num_seqs,))
    zeros = column(0.0, jnp.float32)
    return SamplingTensors(
        temperature=column(temperature, jnp.float32),
        top_k=column(0 if top_k is None else top_k, jnp.int32),
        top_p=column(1.0 if top_p is None else top_p, jnp.float32),
        min_p=zeros, seeds=jax.random.bits(rng, (num_seqs,), jnp.uint32),
        steps=column(0, jnp.int32), presence=zeros, frequency=zeros,
        repetition=column(1.0, jnp.float32), token_ids=jnp.zeros((num_seqs, 0), jnp.int32),
        prompt_lens=prompt_lengths, banned=jnp.zeros((num_seqs, 0), bool))


def _check_args(model, prompt_lengths, num_seqs, width, max_new_tokens, page_size, num_pages,
                temperature, top_k, top_p, min_new_tokens) -> int:
    """Validate what can be checked while tracing; returns P, the pages per sequence."""
    if prompt_lengths.shape != (num_seqs,):
        raise ValueError(f"prompt_lengths has shape {prompt_lengths.shape}, but prompt_tokens holds "
                         f"{num_seqs} prompts; pass one length per row of prompt_tokens")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a static int >= 1, got {max_new_tokens!r}; list "
                         f"it in jax.jit's static_argnames")
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be a static int >= 0, got {min_new_tokens!r}")
    if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a static power of two, got {page_size!r}")
    max_len = width + max_new_tokens - 1
    if max_len > model.config.max_position_embeddings:
        raise ValueError(f"prompt width {width} + max_new_tokens {max_new_tokens} - 1 = {max_len} "
                         f"exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings}); shorten either")
    pages_per_seq = -(-max_len // page_size)
    needed = 1 + num_seqs * pages_per_seq
    if num_pages is not None and num_pages < needed:
        raise ValueError(f"num_pages={num_pages} is too small: {num_seqs} sequences x {pages_per_seq} "
                         f"pages of {page_size} tokens + the null page need {needed}; pass "
                         f"num_pages >= {needed} or None")
    if isinstance(temperature, (int, float)) and temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if isinstance(top_k, int) and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (None = off), got {top_k}")
    if isinstance(top_p, (int, float)) and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (None = off), got {top_p}")
    return pages_per_seq
