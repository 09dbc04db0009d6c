"""Runs a SchedulerOutput on the device: page moves, the jitted step of its shape bucket
(buckets.py, inputs from step_inputs.py), the jitted sampler; returns a StepResult.

Every compiled variant (step bucket, sampler variant) is counted in the engine's Stats.
NOTE: stand-ins. With `compile_in_background` (the server turns it on), a step whose bucket is not
compiled yet runs in the cheapest compiled bucket that holds it (more tokens, sequences or pages
of padding). A stand-in with at most twice the tokens and pages is kept for that bucket for good
(on this CPU the padding costs less than the 1-3 s of a core that compiling would take while
serving); a larger one serves only while one background thread compiles the exact bucket. So a
client never waits seconds for XLA. Off by default: offline runs compile synchronously, and
processes that must run the same program (jax.distributed) never stand in.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from concurrent.futures import Future

import jax
import numpy as np

from jpaged.core.stats import Stats
from jpaged.core.step import PromptLogprobs, ScheduledSeq, SchedulerOutput, StepResult
from jpaged.engine.buckets import BucketPolicy, StepKey, WarmupStep, wants_prompt_logprobs
from jpaged.engine.page_mover import PageMover
from jpaged.engine.sampler import SamplerFlags, SamplingTensors, build_sampling_tensors, sample
from jpaged.engine.speculative import LayerSkipDrafter, Verifier
from jpaged.engine.step_inputs import StepInputs, build_step_inputs
from jpaged.models import CausalLM, KVCache, arrange_layers
from jpaged.models.weights import is_per_layer, stacked_shapes
from jpaged.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("jpaged")
# The sampler variants warm_up compiles for every batch bucket: greedy and random, each with and
# without min_tokens' EOS ban (the fake rows have 1 output token), top-p (what OpenAI clients
# send most), and greedy and random with a structured-outputs bitmask (all ones here: the
# variant's shapes are the same whatever the grammar), so constraints that come and go never
# compile.
_WARMUP_SAMPLERS = (SamplingParams(temperature=0.0, max_tokens=1),
                    SamplingParams(temperature=0.0, max_tokens=2, min_tokens=2),
                    SamplingParams(temperature=1.0, max_tokens=1),
                    SamplingParams(temperature=1.0, max_tokens=2, min_tokens=2),
                    SamplingParams(temperature=1.0, top_p=0.9, max_tokens=1),
                    *(SamplingParams(temperature=t, max_tokens=1, structured_outputs=
                                     StructuredOutputsParams(json_object=True)) for t in (0.0, 1.0)))


def step(model: CausalLM, params, kv_cache: KVCache, batch: StepInputs, lora=None):
    """The pure device step: (logits [B, V] of each sequence's last token, updated cache,
    TokenLogprobs of the prompt tokens when the batch scores some, else None). `lora`: a
    LoRABatch (the adapter slots and each token's slot; jpaged/models/lora.py) or None."""
    out = model.apply({"params": params}, batch.token_ids, batch.positions, kv_cache,
                      batch.metadata, batch.logprob_targets, lora=lora,
                      logits_indices=batch.logits_indices)
    return out if len(out) == 3 else (*out, None)


class ModelRunner:
    def __init__(self, model: CausalLM, params, kv_cache: KVCache | Future, buckets: BucketPolicy,
                 *, eos_token_ids: tuple[int, ...], max_model_len: int, num_host_pages: int = 0,
                 shardings: tuple | None = None, stats: Stats | None = None,
                 compile_in_background: bool = False, lora=None,
                 drafter: LayerSkipDrafter | None = None):
        """`params` in the layout of jpaged/models/weights.py (either placement: they are
        arranged here, per layer on one CPU device). `kv_cache` may still be being allocated (a
        Future, resolved after the weights are laid out). `shardings`: (in_shardings,
        out_shardings) of the step under tensor parallelism (TensorParallel.step_shardings), so
        the donated cache keeps its sharding step after step. `eos_token_ids` are banned under
        min_tokens. `lora`: the engine's LoRAManager (jpaged/engine/lora.py) with enable_lora."""
        self.model = model
        self.lora = lora
        self.stats = stats or Stats()
        # speculative decoding (engine/speculative.py): layer_skip's drafter, the verifier
        self.drafter = drafter
        self.verifier = Verifier(model.config.vocab_size, max_model_len, self.stats)
        self.params = arrange_layers(params)
        self.kv_cache = kv_cache = kv_cache.result() if isinstance(kv_cache, Future) else kv_cache
        self.page_size = kv_cache.page_size
        self.buckets = buckets
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = model.config.vocab_size
        self.max_model_len = max_model_len
        self._steps: dict[StepKey, jax.stages.Compiled] = {}
        placement = dict(zip(("in_shardings", "out_shardings"), shardings or ()))
        self._jit_step = jax.jit(functools.partial(step, model), donate_argnames=("kv_cache",),
                                 **placement)
        self.pages = PageMover(kv_cache, num_host_pages)
        self._jit_sample = jax.jit(self._sample_traced, static_argnames=("flags",))
        self.compile_in_background = compile_in_background   # stand in (see NOTE)
        self._lock = threading.Lock()            # _steps, _pending and the compile counters
        self._pending: set[StepKey] = set()      # queued for the background compiler
        self._kept: dict[StepKey, StepKey] = {}  # bucket -> its stand-in for good (see NOTE)
        self._failed: set[StepKey] = set()       # failed there: compile in step, and raise
        self._compile_queue: queue.Queue | None = None

    @property
    def compiled_buckets(self) -> frozenset[StepKey]:
        with self._lock:
            return frozenset(self._steps)

    def compiled_steps(self) -> dict[StepKey, jax.stages.Compiled]:
        """Each compiled bucket's executable (e.g. to read its optimised HLO)."""
        with self._lock:
            return dict(self._steps)

    @property
    def kept_stand_ins(self) -> dict[StepKey, StepKey]:
        """bucket -> the compiled bucket that serves it for good (see NOTE: stand-ins)."""
        with self._lock:
            return dict(self._kept)

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Apply the step's page moves (swaps, copy-on-write), run the step, and sample."""
        self.kv_cache = self.pages.apply(out, self.kv_cache)
        if self.drafter is not None:
            self.drafter.apply_moves(out)
        if any(r.num_spec_tokens for r in out.scheduled):
            return self._execute_speculative(out)
        fn, key, inputs = self._executable(out.scheduled)
        if self.lora is not None:
            self.lora.apply_loads(out.lora_loads)
        logits, self.kv_cache, token_logprobs = fn(self.params, self.kv_cache, inputs,
                                                   self._lora_batch(out.scheduled, inputs))
        if self.drafter is not None:
            self.drafter.observe(inputs)
        tensors, flags = build_sampling_tensors(out.scheduled, key.num_seqs, self.vocab_size,
                                                self.max_model_len, self.eos_token_ids)
        tokens, logprobs, top_ids, top_lp = self._jit_sample(logits, tensors, flags=flags)
        n = len(out.scheduled)
        waiting = time.perf_counter()
        rows = [None if x is None else np.asarray(_local(x))[:n, None]
                for x in (tokens, logprobs, top_ids, top_lp)]
        prompt_logprobs = None if token_logprobs is None else _per_row(
            out.scheduled, jax.tree.map(lambda x: np.asarray(_local(x)), token_logprobs))
        self.stats.device_wait_seconds += time.perf_counter() - waiting
        return StepResult(token_ids=rows[0], logprobs=rows[1], top_ids=rows[2],
                          top_logprobs=rows[3], prompt_logprobs=prompt_logprobs)

    def _execute_speculative(self, out: SchedulerOutput) -> StepResult:
        """A step where some rows verify proposals (drafted first when a draft model makes
        them): logits at k + 1 positions of each row, verified on device (Verifier)."""
        start, rows = time.perf_counter(), out.scheduled
        if self.drafter is not None:
            key = self.buckets.key_for(rows)
            rows, self.kv_cache = self.drafter.draft(self.params, self.kv_cache, rows,
                                                     key.num_seqs, key.num_pages)
        fn, key, inputs = self._executable(rows)
        if self.lora is not None:
            self.lora.apply_loads(out.lora_loads)
        logits, self.kv_cache, token_logprobs = fn(self.params, self.kv_cache, inputs,
                                                   self._lora_batch(rows, inputs))
        if self.drafter is not None:
            self.drafter.observe(inputs)
        results = self.verifier(logits, rows, key.num_seqs, key.spec_width, self.eos_token_ids)
        n = len(rows)
        waiting = time.perf_counter()
        tokens, num_tokens, logprobs, top_ids, top_lp = [
            None if x is None else np.asarray(_local(x))[:n] for x in results]
        prompt_logprobs = None if token_logprobs is None else _per_row(
            rows, jax.tree.map(lambda x: np.asarray(_local(x)), token_logprobs))
        now = time.perf_counter()
        self.stats.device_wait_seconds += now - waiting
        self.stats.spec_decode_verify_seconds += now - start
        return StepResult(token_ids=tokens, num_tokens=num_tokens, logprobs=logprobs,
                          top_ids=top_ids, top_logprobs=top_lp, prompt_logprobs=prompt_logprobs)

    def warm_up(self, plan: list[WarmupStep]) -> None:
        """Compile `plan`'s buckets (with JAX's persistent compilation cache on, a restart loads
        them from disk), and every sampler variant once per batch size.
        NOTE: compiled, not run: running a large fake batch (a 2,048-token prefill) costs seconds
        of CPU each, far more than compiling it, and teaches nothing. The samplers run once on
        zero logits placed as the step's are."""
        start, sampled = time.perf_counter(), set()
        for i, entry in enumerate(plan):
            rows = entry.rows(self.page_size, _WARMUP_SAMPLERS[0])
            key = self.buckets.key_for(rows)
            with self._lock:
                compiled = self._steps.get(key)
            if compiled is None:
                compiled = self._compile(key, build_step_inputs(rows, key, self.page_size))
            if key.num_seqs not in sampled:
                sampled.add(key.num_seqs)
                self._warm_samplers(entry, key, compiled.out_info[0])
            if (i + 1) % 20 == 0:
                logger.info("warm-up: %d/%d buckets (%.0fs)", i + 1, len(plan),
                            time.perf_counter() - start)

    def _warm_samplers(self, entry: WarmupStep, key: StepKey, logits: jax.ShapeDtypeStruct):
        zeros = jax.make_array_from_callback(
            logits.shape, logits.sharding, lambda index: np.zeros(logits.shape, logits.dtype)[index])
        for params in _WARMUP_SAMPLERS:
            tensors, flags = build_sampling_tensors(entry.rows(self.page_size, params),
                                                    key.num_seqs, self.vocab_size,
                                                    self.max_model_len, self.eos_token_ids)
            jax.block_until_ready(self._jit_sample(zeros, tensors, flags=flags))

    def _executable(self, scheduled: list[ScheduledSeq]):
        """(compiled step, its bucket, inputs padded to it): the exact bucket when compiled; else
        (when compile_in_background) a compiled stand-in, kept or while the exact one compiles in
        the background (see NOTE); else the exact one, compiled now."""
        key = self.buckets.key_for(scheduled)
        with self._lock:
            fn = self._steps.get(key)
            stand_in = None if fn or not self.compile_in_background or key in self._failed \
                else self._kept.get(key) or self._stand_in(key)
        if fn is not None or stand_in is None:
            inputs = build_step_inputs(scheduled, key, self.page_size)
            return fn or self._compile(key, inputs), key, inputs
        if stand_in.num_tokens <= 2 * key.num_tokens and stand_in.num_pages <= 2 * key.num_pages:
            with self._lock:
                self._kept[key] = stand_in
        else:
            self._compile_later(key, build_step_inputs(scheduled, key, self.page_size))
        self.stats.num_stand_in_steps += 1
        logger.debug("step bucket %s not compiled: running in %s", key, stand_in)
        inputs = build_step_inputs(scheduled, stand_in, self.page_size)
        return self._steps[stand_in], stand_in, inputs

    def _stand_in(self, key: StepKey) -> StepKey | None:
        """The cheapest compiled bucket that holds `key`'s batch: a decode batch fits a mixed
        step too (with more padding), a mixed batch only a mixed step."""
        fits = [k for k in self._steps
                if k.num_tokens >= key.num_tokens and k.num_seqs >= key.num_seqs
                and k.num_pages >= key.num_pages and (key.decode_only or not k.decode_only)
                and k.prompt_logprobs == key.prompt_logprobs and k.spec_width == key.spec_width]
        return min(fits, default=None, key=lambda k: (not k.decode_only, k.num_tokens,
                                                      k.num_pages, k.num_seqs))

    def _compile_later(self, key: StepKey, inputs: StepInputs) -> None:
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
            if self._compile_queue is None:
                self._compile_queue = queue.Queue()
                threading.Thread(target=self._compile_loop, name="jpaged-compiler",
                                 daemon=True).start()
        self._compile_queue.put((key, inputs))

    def _compile_loop(self) -> None:
        while True:
            key, inputs = self._compile_queue.get()
            try:
                self._compile(key, inputs, background=True)
            except Exception:
                logger.exception("background compilation of step bucket %s failed; the next "
                                 "step that needs it compiles it in step (and fails)", key)
                with self._lock:
                    self._failed.add(key)
            finally:
                with self._lock:
                    self._pending.discard(key)

    def wait_for_background_compiles(self, timeout: float | None = None) -> bool:
        """Block until the background compiler is idle; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._pending:
                    return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def swap_params(self, params) -> None:
        """Replace the weights with a tree of the same layout, shapes, dtypes and shardings (in
        either placement), so the compiled steps still fit; ValueError names the first leaf that
        differs (in the stacked placement's terms). NumPy leaves are placed like the leaves they
        replace; jax.Array leaves must already be."""
        current, treedef = jax.tree_util.tree_flatten_with_path(stacked_shapes(self.params))
        given, given_treedef = jax.tree_util.tree_flatten_with_path(stacked_shapes(params))
        if given_treedef != treedef:
            old_paths = {jax.tree_util.keystr(p) for p, _ in current}
            new_paths = {jax.tree_util.keystr(p) for p, _ in given}
            raise ValueError(f"update_params: the params tree differs from the engine's: missing "
                             f"{sorted(old_paths - new_paths)[:4]}, unexpected "
                             f"{sorted(new_paths - old_paths)[:4]}; pass the same tree as the "
                             f"loaded checkpoint's params (jpaged.load gives it)")
        for (path, old), (_, new) in zip(current, given):
            if (new.shape, new.dtype) != (old.shape, old.dtype):
                raise ValueError(
                    f"update_params: params{jax.tree_util.keystr(path)} is "
                    f"{new.dtype}{list(new.shape)} but the engine's is {old.dtype}"
                    f"{list(old.shape)}; new weights need the same shapes and dtypes (cast with "
                    f".astype({old.dtype.name!r}) or load with that dtype)")
        params = arrange_layers(params, per_layer=is_per_layer(self.params))
        self.params = jax.tree_util.tree_map_with_path(_placed_like, params, self.params)

    def _compile(self, key: StepKey, inputs: StepInputs, background: bool = False):
        start = time.perf_counter()
        # The cache as a shape: in the background the step thread may donate it meanwhile.
        compiled = self._jit_step.lower(self.params, _shapes(self.kv_cache), inputs,
                                        self._lora_batch([], inputs)).compile()
        seconds = time.perf_counter() - start
        with self._lock:
            self._steps[key] = compiled
            self.stats.num_step_compilations += 1
            self.stats.compile_seconds += seconds
            number = self.stats.num_step_compilations
        logger.info("compiled step #%d for %s batch T=%d B=%d P=%d%s in %.1fs%s", number,
                    "decode" if key.decode_only else "mixed", key.num_tokens, key.num_seqs,
                    key.num_pages, " with prompt log-probs" if key.prompt_logprobs else "",
                    seconds, " (in the background)" if background else "")
        return compiled

    def _lora_batch(self, rows: list[ScheduledSeq], inputs: StepInputs):
        """The step's LoRA argument (None without enable_lora), padded like `inputs`."""
        if self.lora is None:
            return None
        return self.lora.batch(rows, inputs.token_ids.shape[0])

    def _sample_traced(self, logits, tensors: SamplingTensors, *, flags: SamplerFlags):
        self.stats.num_sampler_compilations += 1  # runs once per trace, i.e. per compiled variant
        return sample(logits, tensors, flags=flags)


def _shapes(tree):
    """`tree`'s arrays as shapes (ShapeDtypeStructs with their shardings)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _per_row(rows: list[ScheduledSeq], token_logprobs) -> list[PromptLogprobs | None]:
    """The step's per-token prompt log-probs cut into each row's new tokens (None for rows that
    score nothing)."""
    out, offset = [], 0
    for r in rows:
        n = r.num_new_tokens
        out.append(PromptLogprobs(*(getattr(token_logprobs, f)[offset:offset + n] for f in (
            "logprobs", "ranks", "top_ids", "top_logprobs"))) if wants_prompt_logprobs(r) else None)
        offset += n
    return out


def _local(x: jax.Array) -> jax.Array:
    """A replicated result that spans several processes (jax.distributed): this process's copy."""
    return x if x.is_fully_addressable else x.addressable_data(0)


def _placed_like(path, leaf, old: jax.Array) -> jax.Array:
    """`leaf` (same shape and dtype as `old`) as a jax.Array sharded like `old`, or a ValueError
    naming the difference."""
    if not isinstance(leaf, jax.Array):
        return jax.device_put(leaf, old.sharding)
    if not old.sharding.is_equivalent_to(leaf.sharding, old.ndim):
        raise ValueError(f"update_params: params{jax.tree_util.keystr(path)} has sharding "
                         f"{leaf.sharding} but the engine's has {old.sharding}; place it the same "
                         f"way (jax.device_put(leaf, old_leaf.sharding))")
    return leaf
