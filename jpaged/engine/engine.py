"""LLMEngine: requests in, continuous-batching steps, RequestOutputs out.

One step:  drain the typed calls (calls.py)  ->  Scheduler.schedule()  ->  ModelRunner.execute()
           ->  Scheduler.update_from_output()  ->  OutputProcessor.process()
The host side (queues, block tables, refcounts, token-level stops, beam forks) is the core's
(jpaged/core); the device side is one jitted step per shape bucket plus a jitted sampler (runner.py);
text, stop strings and RequestOutputs are the output processor's.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.core.beam_search import BeamSearch
from jpaged.core.block_manager import BlockManager
from jpaged.core.lora_slots import LoRASlots
from jpaged.core.request import Request
from jpaged.core.scheduler import PREEMPTION_MODES, Scheduler
from jpaged.core.speculative import SpeculativeConfig
from jpaged.core.stats import Stats
from jpaged.core.structured import GrammarCompiler
from jpaged.distributed import CallLog, exit_on_peer_failure
from jpaged.engine.attention import ProbeShape, select_attention
from jpaged.engine.buckets import BucketPolicy, WarmupStep
from jpaged.engine.calls import AbortRequest, AddRequest, EngineCall, StopFollowers, UnloadLoRA
from jpaged.engine.compilation_cache import enable_compilation_cache
from jpaged.engine.input_processor import InputProcessor
from jpaged.engine.lora import LoRAManager
from jpaged.engine.output_processor import OutputProcessor
from jpaged.engine.runner import ModelRunner
from jpaged.engine.page_mover import PageMover
from jpaged.engine.speculative import DraftModelDrafter, LayerSkipDrafter
from jpaged.models import CausalLM, KVCache, arrange_layers
from jpaged.models.kv_cache import KV_CACHE_DTYPES, cache_dtype
from jpaged.models.weights import held_for_platform
from jpaged.outputs import RequestOutput
from jpaged.parallel import TensorParallel
from jpaged.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

logger = logging.getLogger("jpaged")
_GIB = 1 << 30


@dataclasses.dataclass
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None               # None: size the pool from free device memory
    max_model_len: int | None = None           # None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # vLLM's meaning: the fraction of the device's memory the engine may fill; the KV pool gets
    # that share of the device limit minus what is already in use (the weights, above all)
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_space_gib: float = 4.0        # KV pool on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE)
    attention_backend: str | None = None
    # JAX's persistent compilation cache: None = $JPAGED_COMPILATION_CACHE_DIR or
    # ~/.cache/jpaged/xla; "off" disables (jpaged/engine/compilation_cache.py)
    compilation_cache_dir: str | None = None
    enable_prefix_caching: bool = True         # share the pages of equal prompt prefixes
    # vLLM's names: "recompute" frees a preempted sequence's pages; "swap" moves them to a host
    # pool of swap_space GiB and back (recompute when that pool is full)
    preemption_mode: str = "recompute"
    swap_space: float = 4.0
    seed: int = 0
    # vLLM's name: shard weights and KV cache over a mesh of this many devices (jpaged/parallel.py)
    tensor_parallel_size: int = 1
    # vLLM's name: an MoE model's experts are split whole over those devices (else each expert's
    # MLP width is); tokens are the same either way
    enable_expert_parallel: bool = False
    # a step whose bucket is not compiled runs in a compiled stand-in while its own compiles on a
    # background thread (runner.py; the server's mode; ignored with several processes)
    compile_in_background: bool = False
    # vLLM's names: serve LoRA adapters (jpaged/engine/lora.py): max_loras in device slots at
    # once (a step mixes them freely), ranks up to max_lora_rank, max_cpu_loras (default
    # max_loras) kept in host memory
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # vLLM's name: "auto" (the model's dtype), "int8", "fp8" (= "fp8_e4m3") or "fp8_e5m2" pages,
    # with a scale per token and KV head (models/kv_cache.py)
    kv_cache_dtype: str = "auto"
    # vLLM's speculative_config dict ({"method": "ngram" | "layer_skip", ...}), validated into a
    # SpeculativeConfig (jpaged/core/speculative.py); None: off
    speculative_config: dict | SpeculativeConfig | None = None

    def __post_init__(self):
        if self.speculative_config is not None:   # ValueError naming the key
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got "
                             f"{self.preemption_mode!r}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got "
                             f"{self.kv_cache_dtype!r}")


def _shared_window(config) -> int | None:
    """The sliding window every layer has, if they share one (Mistral-style): the scheduler then
    releases the pages behind it; None when some layer attends to its whole context."""
    windows = set(config.layer_windows())
    return windows.pop() if len(windows) == 1 else None


class LLMEngine:
    def __init__(self, checkpoint, config: EngineConfig | None = None):
        config = config or EngineConfig()
        self.config = config
        self.model_config = mc = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.dtype = jnp.dtype(checkpoint.dtype)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        if jax.process_count() > 1 and config.preemption_mode == "swap":
            raise ValueError("preemption_mode='swap' needs the whole KV cache on one host; with "
                             "several processes use preemption_mode='recompute'")
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({config.max_num_seqs})")
        self.compilation_cache_dir = enable_compilation_cache(config.compilation_cache_dir)
        self.attention = select_attention(config.attention_backend, ProbeShape(
            mc.num_heads, mc.num_kv_heads, mc.head_dim, self.dtype.name, config.page_size,
            mc.sliding_window, mc.attn_soft_cap, mc.attn_scale))
        # NOTE: tensor parallelism. The model may run with more KV heads than the checkpoint has
        # (replicated, jpaged/parallel.py); self.model_config stays the checkpoint's.
        self.parallel = TensorParallel.create(
            mc, config.tensor_parallel_size, expert_parallel=config.enable_expert_parallel) \
            if config.tensor_parallel_size > 1 else None
        # the model runs knowing max_model_len (LongRoPE picks its factors by it, as vLLM does)
        self._run_config = run_config = dataclasses.replace(
            self.parallel.model_config if self.parallel else mc, max_model_len=self.max_model_len)
        num_pages = self._choose_num_pages()
        capacity = (num_pages - 1) * config.page_size
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the KV cache can hold "
                f"({num_pages - 1} usable pages x {config.page_size} = {capacity} tokens); give more "
                f"num_pages / memory, or lower max_model_len")
        fns = self.parallel.wrap_attention(self.attention.fns) if self.parallel else self.attention.fns
        model = CausalLM(run_config, self.dtype, fns,
                         moe=self.parallel.moe_fn() if self.parallel and mc.is_moe else None)
        params = held_for_platform(checkpoint.params)          # 4-bit as int8 on CPU (weights.py)
        params = self.parallel.shard_params(params) if self.parallel else params
        page_bytes = KVCache.bytes_per_page(mc, config.page_size, self.dtype, config.kv_cache_dtype)
        num_host_pages = int(config.swap_space * _GIB // page_bytes) \
            if config.preemption_mode == "swap" else 0
        eos_token_ids = tuple(checkpoint.eos_token_ids)
        spec = self._speculative_config()
        self._stats = Stats(kv_page_size=config.page_size)
        self.block_manager = BlockManager(num_pages, config.page_size, config.enable_prefix_caching,
                                          num_host_pages, stats=self._stats)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.preemption_mode,
                                   eos_token_ids=eos_token_ids, max_model_len=self.max_model_len,
                                   stats=self._stats, sliding_window=_shared_window(mc),
                                   speculative=spec)
        self.lora = self._lora_manager(params) if config.enable_lora else None
        self._loras_to_unload: set[str] = set()     # unload_lora: removed once idle
        if self.lora is not None:
            self.scheduler.lora_slots = LoRASlots(config.max_loras)
        buckets = BucketPolicy(max_num_seqs=config.max_num_seqs,
                               max_num_batched_tokens=config.max_num_batched_tokens,
                               max_model_len=self.max_model_len, page_size=config.page_size,
                               num_speculative_tokens=spec.num_speculative_tokens if spec else 0)
        # NOTE: start-up. Zero-filling the KV pool (GiBs on CPU) is bound by page faults; it runs
        # on a thread while this one lays out the weights (ModelRunner), so the two overlap.
        with ThreadPoolExecutor(1, thread_name_prefix="jpaged-kv-alloc") as allocator:
            self.runner = ModelRunner(
                model, params, allocator.submit(self._zeros_cache, num_pages), buckets,
                eos_token_ids=eos_token_ids, max_model_len=self.max_model_len,
                num_host_pages=num_host_pages, stats=self._stats, lora=self.lora,
                shardings=self.parallel.step_shardings(params, config.kv_cache_dtype)
                if self.parallel else None,
                compile_in_background=config.compile_in_background and jax.process_count() == 1,
                drafter=self._drafter(spec, run_config, fns, num_pages, num_host_pages))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured = GrammarCompiler(self.tokenizer, mc.vocab_size, eos_token_ids)
        self.input_processor = InputProcessor(
            self.tokenizer, self.output_processor.tokenizer_lock, vocab_size=mc.vocab_size,
            max_model_len=self.max_model_len, max_num_seqs=config.max_num_seqs)
        # NOTE: threads. add_request and abort_request may be called from any thread (a server's
        # event loop) while another runs step(): they validate, register the request's output
        # state (under the output processor's lock) and leave a typed call in the inbox; only
        # step() touches the scheduler, draining the inbox first.
        self.call_log = CallLog() if jax.process_count() > 1 else None
        self.stopped = False                   # a follower's run_follower returns once set
        self._inbox: collections.deque[EngineCall] = collections.deque()
        self._rng = np.random.default_rng(config.seed)
        self.last_scheduled = None             # the SchedulerOutput of the latest step
        kv_bytes = KVCache.bytes_per_page(run_config, config.page_size, self.dtype,
                                          config.kv_cache_dtype) * num_pages
        self._stats.kv_cache_tokens, self._stats.kv_cache_bytes = capacity, kv_bytes
        logger.info("KV cache: %d pages x %d tokens (%d tokens, %.2f GiB %s) on %s; max_model_len=%d, "
                    "max_num_seqs=%d, max_num_batched_tokens=%d, prefix caching %s", num_pages,
                    config.page_size, capacity, kv_bytes / _GIB,
                    cache_dtype(config.kv_cache_dtype, self.dtype).name,
                    jax.devices()[0].device_kind, self.max_model_len, config.max_num_seqs,
                    config.max_num_batched_tokens, "on" if config.enable_prefix_caching else "off")

    # ---- public API ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | dict | list[int],
                    params: SamplingParams | BeamSearchParams | None = None,
                    lora_request=None) -> None:
        """Validate and queue a request (a BeamSearchParams makes it a beam search); raises
        ValueError naming the problem, leaving the engine and its other requests untouched.
        `lora_request` (a jpaged.LoRARequest): run it with that adapter (read now if new)."""
        self._register_lora(lora_request)
        if isinstance(params, BeamSearchParams):
            return self.add_beam_request(request_id, prompt, params, lora_request)
        params = self.input_processor.sampling_params(params)
        text, token_ids = self.input_processor.prompt(prompt)
        if params.structured_outputs is not None:     # ValueError naming the field
            self.structured.compile(params.structured_outputs)
        if params.seed is None:                # resolved here, so every process samples alike
            params = dataclasses.replace(params, seed=int(self._rng.integers(2**32)))
        self._accept(AddRequest(request_id, {"prompt": text, "prompt_token_ids": token_ids},
                                params, lora_request), params, params.n)

    def add_beam_request(self, request_id: str, prompt: str | dict | list[int],
                         params: BeamSearchParams, lora_request=None) -> None:
        """Queue a beam search (see core/beam_search.py); its one output, when finished, holds
        the beam_width best hypotheses, best first."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"beam search params must be a BeamSearchParams, got "
                             f"{type(params).__name__}")
        text, token_ids = self.input_processor.prompt(prompt)
        search = self.input_processor.beam_search(self._beam_search(params, len(token_ids)))
        self._register_lora(lora_request)
        self._accept(AddRequest(request_id, {"prompt": text, "prompt_token_ids": token_ids},
                                params, lora_request), self._beam_sampling(search), 1)

    def abort_request(self, request_id: str) -> None:
        """Drop a request wherever it is and free its pages (at the start of the next step when
        called while a step runs). Unknown or finished ids are ignored."""
        self._submit(AbortRequest(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (vLLM's name); pages in use are untouched."""
        self.block_manager.reset_prefix_cache()

    def warmup_plan(self) -> list[WarmupStep]:
        """The buckets `warm_up` compiles by default (engine/buckets.py)."""
        return self.runner.buckets.warmup_plan()

    def warm_up(self, plan: list[WarmupStep] | None = None) -> int:
        """Compile the step buckets of `plan` (default: warmup_plan()) and the sampler variants
        before serving, so the first clients do not wait on XLA; returns the variants compiled
        (or loaded from JAX's persistent compilation cache)."""
        plan = self.warmup_plan() if plan is None else plan
        before, start = self._stats.num_compilations, time.perf_counter()
        logger.info("warm-up: compiling %d step buckets (decode B x P, single-request prefill T x "
                    "P, mixed-batch stand-ins)", len(plan))
        self.runner.warm_up(plan)
        compiled = self._stats.num_compilations - before
        logger.info("warm-up: %d buckets ready in %.1fs (%d step and sampler variants compiled or "
                    "loaded from the compilation cache)", len(plan), time.perf_counter() - start,
                    compiled)
        return compiled

    def update_params(self, params) -> None:
        """Swap the model weights in place, without a restart (RL / fine-tuning loops).

        `params` (the layout of jpaged/models/weights.py, either placement) must match the
        current tree leaf for leaf in shape, dtype and sharding, so no step compiles again;
        ValueError names the first mismatched leaf otherwise. Call it between steps, from the
        thread that runs step().
        NOTE: KV computed under the old weights is stale. Every running sequence is preempted by
        recompute (it resumes, prompt and output so far, under the new weights; tokens already
        generated are kept) and the prefix cache is reset.
        Under tensor parallelism `params` is in the checkpoint's layout (as jpaged.load gives it):
        its KV heads are replicated and every leaf placed in the engine's shards first.
        Quantized params are held as at load (on CPU, 4-bit weights widened: weights.py).
        """
        params = held_for_platform(params)
        if self.parallel:
            params = self.parallel.shard_params(params)
        self.runner.swap_params(params)
        preempted = self.scheduler.preempt_all_running()
        self.block_manager.reset_prefix_cache()
        logger.info("params updated; %d running sequences preempted for recompute, prefix cache "
                    "reset", len(preempted))

    # ---- LoRA adapters (vLLM's add_lora / remove_lora / list_loras) -------------------------
    def add_lora(self, lora_request) -> bool:
        """Read and register an adapter now (its requests then start without reading it)."""
        self._register_lora(lora_request)
        return True

    def remove_lora(self, name: str) -> bool:
        """Forget adapter `name` (False if unknown); refused while live requests use it. Its
        slot is freed and the prefix cache reset (a new adapter may come under the same name)."""
        lora = self._need_lora("remove_lora")
        if name not in lora.requests:
            return False
        users = self._lora_users(name)
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {len(users)} live requests "
                             f"({users[:3]}); abort or finish them before unloading it")
        lora.remove(name)
        self.scheduler.lora_slots.forget(name)
        self.block_manager.reset_prefix_cache()
        return True

    def unload_lora(self, name: str) -> None:
        """remove_lora from any thread (a server's event loop): done by the step thread once no
        live request uses the adapter (new requests must no longer name it)."""
        self._submit(UnloadLoRA(name))

    def _unload_idle_loras(self) -> None:
        for name in list(self._loras_to_unload):
            if not self._lora_users(name):
                self._loras_to_unload.discard(name)
                self.remove_lora(name)
                logger.info("LoRA adapter %r unloaded", name)

    def list_loras(self) -> list[str]:
        return self._need_lora("list_loras").names()

    def update_lora(self, name: str, params) -> None:
        """Swap adapter `name`'s weights (registering it if new) without a recompile; `params` in
        jpaged/lora's layout (`jpaged.lora.load_lora` gives it; rank <= max_lora_rank). Like
        update_params, running sequences are recomputed and the prefix cache is reset, so no KV
        of the old weights is read again. Call it between steps, from the thread that runs step()."""
        lora = self._need_lora("update_lora")
        lora.set_weights(name, params)
        self.scheduler.lora_slots.forget(name)       # placed again (rewritten) when next needed
        preempted = self.scheduler.preempt_all_running()
        self.block_manager.reset_prefix_cache()
        logger.info("LoRA adapter %r updated; %d running sequences preempted for recompute, "
                    "prefix cache reset", name, len(preempted))

    def _register_lora(self, lora_request) -> None:
        if lora_request is not None:
            self._need_lora("lora_request").register(lora_request)

    def _need_lora(self, what: str) -> LoRAManager:
        if self.lora is None:
            raise ValueError(f"{what} needs LoRA support: start the engine with enable_lora=True "
                             f"(jpaged serve --enable-lora)")
        return self.lora

    def _lora_users(self, name: str) -> list[str]:
        return [rid for rid, r in self.scheduler.requests.items()
                if r.seqs and r.seqs[0].lora_name == name] + \
            [c.request_id for c in self._inbox if isinstance(c, AddRequest) and
             c.lora_request is not None and c.lora_request.lora_name == name]

    def _lora_manager(self, params) -> LoRAManager:
        from jpaged.models.weights import reads_in_place
        cfg = self.config
        k, run_k = self.model_config.num_kv_heads, self._run_config.num_kv_heads
        if run_k != k:
            raise ValueError(f"enable_lora with tensor_parallel_size={cfg.tensor_parallel_size}: "
                             f"the model's {k} KV heads are replicated to {run_k} over the "
                             f"devices, which LoRA's k/v layout does not follow yet; use a "
                             f"tensor_parallel_size that divides {k}")
        if self.model_config.is_moe:
            raise ValueError("enable_lora: LoRA adapters are served on dense models only; this "
                             f"model has {self.model_config.num_experts} experts")
        # NOTE: under tensor parallelism the slots are replicated on every device (they are small:
        # rank x width per projection) and XLA partitions their products beside the sharded base
        # matmuls; sharding A and B like their base weights is not done yet.
        leaf = jax.tree.leaves(params)[0]
        device = self.parallel.replicated if self.parallel else \
            next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else None
        return LoRAManager(self.model_config, max_loras=cfg.max_loras,
                           max_lora_rank=cfg.max_lora_rank, max_cpu_loras=cfg.max_cpu_loras,
                           dtype=self.dtype, per_layer=reads_in_place(params), device=device)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the outputs of the requests that produced tokens in
        it, as each request's output_kind asks (FINAL_ONLY: only the finished ones)."""
        start = time.perf_counter()
        try:
            self.last_scheduled = None
            if self.call_log is not None:
                self._replay(self.call_log.exchange())
            self._drain_inbox()
            return self._step()
        except Exception as exc:
            # NOTE: in a multi-process engine a failed step (a dead peer, above all) leaves the
            # processes out of lockstep: every process exits with the reason, none waits forever.
            if self.call_log is not None:
                exit_on_peer_failure(exc)
            raise
        finally:
            self._stats.step_seconds += time.perf_counter() - start

    def stats(self) -> Stats:
        """A snapshot of the engine's counters (core/stats.py) with the gauges read now: KV
        pages total/used/cached/free, queues, prefix cache, preemptions, swaps, compilations,
        stand-in steps, time. Read it on the thread that runs step() while steps run."""
        bm, sched, stats = self.block_manager, self.scheduler, self._stats.copy()
        cached_free = bm.num_cached_free_pages
        stats.kv_pages_total = bm.num_usable_pages
        stats.kv_pages_used = bm.num_usable_pages - bm.num_free_pages
        stats.kv_pages_cached = cached_free
        stats.kv_pages_free = bm.num_free_pages - cached_free
        stats.host_pages_used = bm.num_host_pages - len(bm.free_host_pages)
        stats.num_seqs_running, stats.num_seqs_waiting, stats.num_seqs_swapped = (
            len(sched.running), len(sched.waiting), len(sched.swapped))
        stats.num_requests_running = len({seq.request_id for seq in sched.running})
        stats.num_requests_waiting = len({seq.request_id for seq in (*sched.waiting,
                                                                     *sched.swapped)})
        return stats

    @property
    def params(self):
        """The weights as the engine runs them (the layout of jpaged/models/weights.py)."""
        return self.runner.params

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The model's EOS ids: they stop a sequence (unless ignore_eos) and are banned under
        min_tokens."""
        return self.scheduler.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        self.scheduler.eos_token_ids = self.runner.eos_token_ids = tuple(ids)

    # ---- multi-process (jpaged/distributed.py) ---------------------------------------------
    def _replay(self, calls: list[EngineCall]) -> None:
        """Process 0's calls since the last step; on process 0 itself they already happened."""
        if self.call_log.is_leader:
            return
        for call in calls:
            call.replay(self)

    def run_follower(self) -> None:
        """On a process other than 0: step in lockstep with process 0 until it stops us."""
        while not self.stopped:
            self.step()

    def stop_followers(self) -> None:
        """On process 0: end the other processes' run_follower (one last, empty-handed step)."""
        if self.call_log is not None and self.call_log.is_leader:
            self.call_log.record(StopFollowers())
            self.step()

    # ---- the step --------------------------------------------------------------------------
    def _accept(self, call: AddRequest, params: SamplingParams, num_samples: int) -> None:
        """Register a validated request's output state (its id must be new) and queue it."""
        prompt = call.prompt
        self.output_processor.add_request(call.request_id, prompt["prompt"],
                                          prompt["prompt_token_ids"], params, num_samples)
        self._submit(call)

    def _submit(self, call: EngineCall) -> None:
        self._inbox.append(call)
        if self.call_log is not None:          # replayed by the other processes
            self.call_log.record(call)

    def _drain_inbox(self) -> None:
        while self._inbox:
            call = self._inbox.popleft()
            if isinstance(call, AddRequest):
                self.scheduler.add_request(self._make_request(call))
                self._stats.num_prompt_tokens += len(call.prompt["prompt_token_ids"])
            elif isinstance(call, AbortRequest):
                self.scheduler.abort_request(call.request_id)
                self.output_processor.remove(call.request_id)
            elif isinstance(call, UnloadLoRA):
                self._loras_to_unload.add(call.lora_name)
            else:
                raise TypeError(f"unexpected engine call {call!r}")
        self._unload_idle_loras()

    def _make_request(self, call: AddRequest) -> Request:
        ids, params = call.prompt["prompt_token_ids"], call.params
        lora = None if call.lora_request is None else call.lora_request.lora_name
        if isinstance(params, BeamSearchParams):
            search = self._beam_search(params, len(ids))
            return Request.beam_search(call.request_id, ids, search, self._beam_sampling(search),
                                       lora)
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(ids))
        request = Request.sampling(call.request_id, ids, params, params.seed, max_tokens, lora)
        if params.structured_outputs is not None:     # one matcher per sample
            for seq in request.seqs:
                seq.grammar = self.structured.matcher(params.structured_outputs)
        return request

    def _beam_search(self, params: BeamSearchParams, num_prompt_tokens: int) -> BeamSearch:
        return BeamSearch(params.beam_width,
                          min(params.max_tokens, self.max_model_len - num_prompt_tokens),
                          () if params.ignore_eos else self.eos_token_ids, params.length_penalty)

    @staticmethod
    def _beam_sampling(search: BeamSearch) -> SamplingParams:
        """What every beam samples with: greedy, the top K log-probs, EOS left to the search."""
        return SamplingParams(temperature=0.0, logprobs=search.num_candidates,
                              max_tokens=search.max_tokens, ignore_eos=True,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    def _step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_scheduled = out              # for recover_from_failed_step
        if out.is_empty:
            if self.scheduler.waiting:
                raise RuntimeError("scheduler could not place any waiting sequence; this is a bug")
            return []
        bm = self.block_manager
        self._stats.peak_kv_pages_used = max(self._stats.peak_kv_pages_used,
                                             bm.num_usable_pages - bm.num_free_pages)
        result = self.runner.execute(out)
        self._stats.num_steps += 1
        updates = self.scheduler.update_from_output(out, result)
        return self.output_processor.process(updates, self.scheduler.finish_sequence)

    def recover_from_failed_step(self) -> list[str]:
        """After step() raised: abort the requests of the step that failed and make the engine
        serviceable again. Returns the aborted request ids (a server fails just those).

        NOTE: the KV cache is donated to the jitted step. If the failure consumed it (the step ran
        but its result never came back), its buffers are deleted: the cache is rebuilt as zeros,
        every other running sequence is preempted by recompute (its KV is gone; its tokens are
        kept) and the prefix cache is reset, so no stale or lost page is ever read.
        """
        failed = list(dict.fromkeys(s.request_id for s in self.last_scheduled.scheduled)) \
            if self.last_scheduled is not None else []
        self.last_scheduled = None
        for request_id in failed:
            self.abort_request(request_id)
        self._drain_inbox()
        if any(leaf.is_deleted() for leaf in jax.tree.leaves(self.runner.kv_cache)):
            self.runner.kv_cache = self._zeros_cache(self.block_manager.num_pages)
            preempted = self.scheduler.preempt_all_running()
            self.block_manager.reset_prefix_cache()
            logger.warning("the failed step consumed the KV cache: rebuilt it, preempted %d running "
                           "sequences for recompute, reset the prefix cache", len(preempted))
        return failed

    # ---- internals -------------------------------------------------------------------------
    def _speculative_config(self) -> SpeculativeConfig | None:
        spec = self.config.speculative_config
        if spec is None:
            return None
        if spec.method == "layer_skip":          # num_layers checked against the model's
            spec = SpeculativeConfig.from_dict(
                {"method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens,
                 "num_layers": spec.num_layers}, self.model_config.num_layers)
        if spec.method == "draft_model" and self.config.tensor_parallel_size > 1:
            raise ValueError("speculative_config method 'draft_model' runs on one device; use "
                             "tensor_parallel_size=1 or method 'ngram' / 'layer_skip'")
        logger.info("speculative decoding: %s, k=%d%s", spec.method, spec.num_speculative_tokens,
                    f", draft = the first {spec.num_layers} of {self.model_config.num_layers} "
                    f"layers" if spec.method == "layer_skip" else f", draft = {spec.model}"
                    if spec.method == "draft_model" else
                    f", n-grams {spec.prompt_lookup_min}..{spec.prompt_lookup_max}")
        return spec

    def _drafter(self, spec, run_config, fns, num_pages: int,
                 num_host_pages: int) -> LayerSkipDrafter | None:
        """layer_skip: the target's first m layers as a model over the same params and cache;
        draft_model: the draft checkpoint with its own mirrored KV pool (DraftModelDrafter)."""
        if spec is None or spec.method == "ngram":
            return None
        k, size = spec.num_speculative_tokens, self.config.page_size
        if spec.method == "layer_skip":
            draft = CausalLM(dataclasses.replace(run_config, num_layers=spec.num_layers),
                             self.dtype, fns, moe=self.parallel.moe_fn() if self.parallel and
                             self.model_config.is_moe else None)
            return LayerSkipDrafter(draft, size, k, self._stats)
        from jpaged.checkpoint.loader import load_checkpoint
        checkpoint = load_checkpoint(spec.model, dtype=self.dtype.name, progress=False)
        dc = checkpoint.config
        if dc.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"speculative_config['model'] ({spec.model}) has a vocabulary of "
                             f"{dc.vocab_size} tokens but the target's has "
                             f"{self.model_config.vocab_size}; a draft model must share the "
                             f"target's tokenizer")
        attention = select_attention(self.config.attention_backend, ProbeShape(
            dc.num_heads, dc.num_kv_heads, dc.head_dim, self.dtype.name, size, dc.sliding_window,
            dc.attn_soft_cap, dc.attn_scale))
        draft = CausalLM(dataclasses.replace(dc, max_model_len=self.max_model_len), self.dtype,
                         attention.fns)
        cache = KVCache.zeros(dc, num_pages, size, self.dtype, self.config.kv_cache_dtype)
        return DraftModelDrafter(draft, arrange_layers(checkpoint.params),
                                 cache, PageMover(cache, num_host_pages), size, k, self._stats)

    def _zeros_cache(self, num_pages: int) -> KVCache:
        cfg = self.config
        if self.parallel:
            return self.parallel.zeros_cache(num_pages, cfg.page_size, self.dtype,
                                             cfg.kv_cache_dtype)
        return KVCache.zeros(self.model_config, num_pages, cfg.page_size, self.dtype,
                             cfg.kv_cache_dtype)

    def _choose_num_pages(self) -> int:
        cfg = self.config
        if cfg.num_pages is not None:
            return cfg.num_pages
        # per device: with tensor parallelism each device holds K'/N heads of every page
        per_page = KVCache.bytes_per_page(self._run_config, cfg.page_size, self.dtype,
                                          cfg.kv_cache_dtype) // cfg.tensor_parallel_size
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            budget = stats["bytes_limit"] * cfg.gpu_memory_utilization - stats.get("bytes_in_use", 0)
        else:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(cfg.cpu_kv_cache_space_gib * _GIB, available / 2)
        wanted = cfg.max_num_seqs * -(-self.max_model_len // cfg.page_size) + 1
        num_pages = min(int(budget // per_page), wanted)
        if num_pages < 2:
            raise ValueError(f"not enough memory for the KV cache ({budget / _GIB:.2f} GiB free, "
                             f"{per_page} bytes per page); lower page_size or free memory")
        return num_pages
