"""Turns a SchedulerOutput into padded device inputs and runs the jitted step and sampler.

NOTE: padding buckets. T (tokens), B (sequences) and P (pages per sequence) are padded up to a
few fixed sizes so that, after warm-up, no step compiles again. Padding tokens write into the null
page 0 and padding sequences have q_len = context_len = 0; their logits are computed and ignored.
Every compiled variant is counted in `num_compilations`.
NOTE: stand-ins. With `compile_in_background` (the server turns it on), a step whose bucket is not
compiled yet runs in the cheapest compiled bucket that holds it (more tokens, sequences or pages
of padding). A stand-in with at most twice the tokens and pages is kept for that bucket for good
(on this CPU the padding costs less than the 1-3 s of a core that compiling would take while
serving); a larger one serves only while one background thread compiles the exact bucket. So a
client never waits seconds for XLA. Off by default: offline runs compile synchronously, and
processes that must run the same program (jax.distributed) never stand in.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
from concurrent.futures import Future

import jax
import numpy as np

from jpaged.core.scheduler import ScheduledSeq, SchedulerOutput
from jpaged.engine.page_mover import PageMover
from jpaged.engine.sampler import (SamplerFlags, SamplerOutput, SamplingTensors,
                                   build_sampling_tensors, sample)
from jpaged.models.llama import AttentionMetadata, CausalLM, KVCache, split_layer_weights

logger = logging.getLogger("jpaged")


@dataclasses.dataclass
class StepInputs:
    token_ids: jax.Array          # [T] int32
    positions: jax.Array          # [T] int32
    metadata: AttentionMetadata


jax.tree_util.register_dataclass(StepInputs, data_fields=["token_ids", "positions", "metadata"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class StepKey:
    """One shape bucket of the step: one compiled executable each."""
    num_tokens: int      # T, padded
    num_seqs: int        # B, padded
    num_pages: int       # P, block-table width, padded
    decode_only: bool


def step(model: CausalLM, params, kv_cache: KVCache, batch: StepInputs):
    """The pure device step: (logits [B, V] of each sequence's last token, updated cache)."""
    return model.apply({"params": params}, batch.token_ids, batch.positions, kv_cache, batch.metadata)


def geometric_buckets(smallest: int, largest: int, per_octave: int = 2) -> list[int]:
    """`per_octave` sizes between consecutive powers of two (1x, 1.5x for 2; 1x, 1.25x, 1.5x,
    1.75x for 4), from `smallest` up to and including `largest`."""
    out, size = set(), smallest
    while size < largest:
        out.update(size + size * i // per_octave for i in range(per_octave))
        size *= 2
    return sorted(b for b in out | {largest} if b <= largest)


def _pick(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class ModelRunner:
    def __init__(self, model: CausalLM, params, kv_cache: KVCache | Future, *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, num_host_pages: int = 0,
                 shardings: tuple | None = None):
        """`kv_cache` may still be being allocated (a Future, resolved after the weights are
        laid out). `shardings`: (in_shardings, out_shardings) of the step under tensor parallelism
        (TensorParallel.step_shardings), so the donated cache keeps its sharding step after step."""
        self.model = model
        # NOTE: on one CPU device, the layer matmul weights are split per layer so every step reads
        # them in place instead of copying a dynamic slice each layer (split_layer_weights).
        # Measured here: decode steps at the copy floor instead of 2x it; mixed steps of 32-128
        # tokens 45-65 ms faster, equal at 256; the same compile time. Only the checkpoint
        # layout's shapes are kept (`_layout`, what update_params must match), not its arrays.
        self._split_layers = shardings is None and all(
            isinstance(leaf, jax.Array) and {d.platform for d in leaf.devices()} == {"cpu"}
            for leaf in jax.tree.leaves(params))
        self._layout = _shapes(params)
        self.params = split_layer_weights(params) if self._split_layers else params
        self.kv_cache = kv_cache = kv_cache.result() if isinstance(kv_cache, Future) else kv_cache
        self.page_size = kv_cache.page_size
        self.vocab_size = model.config.vocab_size
        self.max_model_len = max_model_len
        self.seq_buckets = geometric_buckets(1, max_num_seqs)
        self.token_buckets = geometric_buckets(16, max(16, max_num_batched_tokens), per_octave=4)
        max_pages = -(-max_model_len // self.page_size)
        # Every padded token costs a full forward, and the reference attention reads every padded
        # page of the block table, so tokens and pages get finer buckets than sequences (whose
        # padding only costs LM-head rows).
        self.page_buckets = geometric_buckets(1, max_pages, per_octave=4)
        self._steps: dict[StepKey, jax.stages.Compiled] = {}
        placement = dict(zip(("in_shardings", "out_shardings"), shardings or ()))
        self._jit_step = jax.jit(functools.partial(step, model), donate_argnames=("kv_cache",),
                                 **placement)
        self.pages = PageMover(kv_cache, num_host_pages)
        self._jit_sample = jax.jit(self._sample_traced, static_argnames=("flags",))
        self.num_step_compilations = 0
        self.num_sampler_compilations = 0
        self.compile_seconds = 0.0               # spent compiling step buckets
        self.device_wait_seconds = 0.0           # host blocked on the device's results
        self.compile_in_background = False       # stand in with a compiled bucket (see NOTE)
        self.num_stand_in_steps = 0              # steps that ran in a larger bucket than theirs
        self._lock = threading.Lock()            # _steps, _pending and the counters
        self._pending: set[StepKey] = set()      # queued for the background compiler
        self._kept: dict[StepKey, StepKey] = {}  # bucket -> its stand-in for good (see NOTE)
        self._failed: set[StepKey] = set()       # failed there: compile in step, and raise
        self._compile_queue: queue.Queue | None = None

    @property
    def num_compilations(self) -> int:
        return self.num_step_compilations + self.num_sampler_compilations

    def execute(self, out: SchedulerOutput, eos_token_ids: tuple[int, ...]) -> SamplerOutput:
        """Apply the step's page moves (swaps, copy-on-write), run the step, and sample;
        `eos_token_ids` are banned for sequences under min_tokens."""
        self.kv_cache = self.pages.apply(out, self.kv_cache)
        fn, key, inputs = self._executable(out.scheduled)
        logits, self.kv_cache = fn(self.params, self.kv_cache, inputs)
        tensors, flags = build_sampling_tensors(out.scheduled, key.num_seqs, self.vocab_size,
                                                self.max_model_len, eos_token_ids)
        tokens, logprobs, top_ids, top_lp = self._jit_sample(logits, tensors, flags=flags)
        n = len(out.scheduled)
        waiting = time.perf_counter()
        rows = [None if x is None else np.asarray(_local(x))[:n]
                for x in (tokens, logprobs, top_ids, top_lp)]
        self.device_wait_seconds += time.perf_counter() - waiting
        return SamplerOutput(*rows)

    def bucket(self, scheduled: list[ScheduledSeq]) -> StepKey:
        """The smallest bucket that holds these sequences."""
        num_seqs = len(scheduled)
        decode_only = all(s.num_new_tokens == 1 for s in scheduled)
        b_pad = _pick(self.seq_buckets, num_seqs)
        return StepKey(
            num_tokens=b_pad if decode_only else _pick(self.token_buckets,
                                                       sum(s.num_new_tokens for s in scheduled)),
            num_seqs=b_pad,
            num_pages=_pick(self.page_buckets, max(len(s.block_table) for s in scheduled)),
            decode_only=decode_only)

    def prepare_inputs(self, scheduled: list[ScheduledSeq], key: StepKey | None = None
                       ) -> tuple[StepInputs, StepKey]:
        """Padded inputs for bucket `key` (default: the smallest that holds them)."""
        key = key or self.bucket(scheduled)
        num_seqs = len(scheduled)
        t_pad, b_pad, p_pad, decode_only = (key.num_tokens, key.num_seqs, key.num_pages,
                                            key.decode_only)
        token_ids = np.zeros(t_pad, np.int32)
        positions = np.zeros(t_pad, np.int32)
        slot_mapping = np.zeros(t_pad, np.int32)
        block_tables = np.zeros((b_pad, p_pad), np.int32)
        context_lens = np.zeros(b_pad, np.int32)
        query_start_loc = np.zeros(b_pad + 1, np.int32)
        offset = 0
        for i, s in enumerate(scheduled):
            n, start = s.num_new_tokens, s.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            block_tables[i, :len(s.block_table)] = s.block_table
            token_ids[offset:offset + n] = s.token_ids[start:start + n]
            positions[offset:offset + n] = pos
            slot_mapping[offset:offset + n] = (block_tables[i, pos // self.page_size] * self.page_size
                                               + pos % self.page_size)
            context_lens[i] = start + n
            offset += n
            query_start_loc[i + 1] = offset
        query_start_loc[num_seqs + 1:] = offset
        metadata = AttentionMetadata(block_tables, slot_mapping, context_lens, query_start_loc,
                                     decode_only=decode_only)
        return StepInputs(token_ids, positions, metadata), key

    def _executable(self, scheduled: list[ScheduledSeq]):
        """(compiled step, its bucket, inputs padded to it): the exact bucket when compiled; else
        (when compile_in_background) a compiled stand-in, kept or while the exact one compiles in
        the background (see NOTE); else the exact one, compiled now."""
        key = self.bucket(scheduled)
        with self._lock:
            fn = self._steps.get(key)
            stand_in = None if fn or not self.compile_in_background or key in self._failed \
                else self._kept.get(key) or self._stand_in(key)
        if fn is not None or stand_in is None:
            inputs, _ = self.prepare_inputs(scheduled, key)
            return fn or self._compile(key, inputs), key, inputs
        if stand_in.num_tokens <= 2 * key.num_tokens and stand_in.num_pages <= 2 * key.num_pages:
            self._kept[key] = stand_in
        else:
            self._compile_later(key, self.prepare_inputs(scheduled, key)[0])
        self.num_stand_in_steps += 1
        logger.debug("step bucket %s not compiled: running in %s", key, stand_in)
        inputs, _ = self.prepare_inputs(scheduled, stand_in)
        return self._steps[stand_in], stand_in, inputs

    def _stand_in(self, key: StepKey) -> StepKey | None:
        """The cheapest compiled bucket that holds `key`'s batch: a decode batch fits a mixed
        step too (with more padding), a mixed batch only a mixed step."""
        fits = [k for k in self._steps
                if k.num_tokens >= key.num_tokens and k.num_seqs >= key.num_seqs
                and k.num_pages >= key.num_pages and (key.decode_only or not k.decode_only)]
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
        """Replace the weights with a tree of the same layout, so the compiled steps still fit.

        NumPy leaves are placed like the leaves they replace; jax.Array leaves must already be.
        """
        current, treedef = jax.tree_util.tree_flatten_with_path(self._layout)
        new, new_treedef = jax.tree_util.tree_flatten_with_path(params)
        if new_treedef != treedef:
            old_paths = {jax.tree_util.keystr(p) for p, _ in current}
            new_paths = {jax.tree_util.keystr(p) for p, _ in new}
            raise ValueError(f"update_params: the params tree differs from the engine's: missing "
                             f"{sorted(old_paths - new_paths)[:4]}, unexpected "
                             f"{sorted(new_paths - old_paths)[:4]}; pass the same tree as the "
                             f"loaded checkpoint's params (jpaged.load gives it)")
        placed = jax.tree.unflatten(treedef, [
            _same_layout(jax.tree_util.keystr(path), old, leaf)
            for (path, old), (_, leaf) in zip(current, new)])
        self.params = split_layer_weights(placed) if self._split_layers else placed

    def _compile(self, key: StepKey, inputs: StepInputs, background: bool = False):
        start = time.perf_counter()
        # The cache as a shape: in the background the step thread may donate it meanwhile.
        compiled = self._jit_step.lower(self.params, _shapes(self.kv_cache), inputs).compile()
        seconds = time.perf_counter() - start
        with self._lock:
            self._steps[key] = compiled
            self.num_step_compilations += 1
            self.compile_seconds += seconds
            number = self.num_step_compilations
        logger.info("compiled step #%d for %s batch T=%d B=%d P=%d in %.1fs%s", number,
                    "decode" if key.decode_only else "mixed", key.num_tokens, key.num_seqs,
                    key.num_pages, seconds, " (in the background)" if background else "")
        return compiled

    def _sample_traced(self, logits, tensors: SamplingTensors, *, flags: SamplerFlags):
        self.num_sampler_compilations += 1  # runs once per trace, i.e. per compiled variant
        return sample(logits, tensors, flags=flags)


def _shapes(tree):
    """`tree`'s arrays as shapes (ShapeDtypeStructs with their shardings)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _local(x: jax.Array) -> jax.Array:
    """A replicated result that spans several processes (jax.distributed): this process's copy."""
    return x if x.is_fully_addressable else x.addressable_data(0)


def _same_layout(path: str, old: jax.ShapeDtypeStruct, leaf) -> jax.Array:
    """`leaf` as a jax.Array laid out like `old`, or a ValueError naming the difference."""
    shape, dtype = tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", type(leaf))
    if shape != old.shape or dtype != old.dtype:
        raise ValueError(f"update_params: params{path} is {dtype}{list(shape)} but the engine's is "
                         f"{old.dtype}{list(old.shape)}; new weights need the same shapes and "
                         f"dtypes (cast with .astype({old.dtype.name!r}) or load with that dtype)")
    if not isinstance(leaf, jax.Array):
        return jax.device_put(leaf, old.sharding)
    if not old.sharding.is_equivalent_to(leaf.sharding, old.ndim):
        raise ValueError(f"update_params: params{path} has sharding {leaf.sharding} but the "
                         f"engine's has {old.sharding}; place it the same way "
                         f"(jax.device_put(leaf, old_leaf.sharding))")
    return leaf
