"""LLMEngine: requests in, continuous-batching steps, RequestOutputs out.

The host side (queues, block tables, refcounts, stop checks) lives here and in the scheduler and
block manager; the device side is one jitted step per shape bucket plus a jitted sampler.
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

from jpaged.core.block_manager import BlockManager
from jpaged.core.scheduler import PREEMPTION_MODES, ScheduledSeq, Scheduler
from jpaged.core.sequence import Sequence
from jpaged.engine.attention import ProbeShape, select_attention
from jpaged.engine.beam_search import BeamRequest, BeamSearch
from jpaged.engine.compilation_cache import enable_compilation_cache
from jpaged.engine.output_processor import OutputProcessor, RequestState
from jpaged.engine.runner import ModelRunner
from jpaged.engine.sampler import SamplerOutput
from jpaged.models.llama import CausalLM, KVCache
from jpaged.distributed import CallLog, exit_on_peer_failure
from jpaged.parallel import TensorParallel
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import (MAX_LOGPROBS, BeamSearchParams, RequestOutputKind,
                                    SamplingParams)

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

    def __post_init__(self):
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
            mc.sliding_window))
        # NOTE: tensor parallelism. The model may run with more KV heads than the checkpoint has
        # (replicated, jpaged/parallel.py); self.model_config stays the checkpoint's.
        self.parallel = TensorParallel.create(mc, config.tensor_parallel_size) \
            if config.tensor_parallel_size > 1 else None
        run_config = self.parallel.model_config if self.parallel else mc
        self._run_config = run_config
        num_pages = self._choose_num_pages()
        capacity = (num_pages - 1) * config.page_size
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the KV cache can hold "
                f"({num_pages - 1} usable pages x {config.page_size} = {capacity} tokens); give more "
                f"num_pages / memory, or lower max_model_len")
        fns = self.parallel.wrap_attention(self.attention.fns) if self.parallel else self.attention.fns
        model = CausalLM(run_config, self.dtype, fns)
        params = self.parallel.shard_params(checkpoint.params) if self.parallel else checkpoint.params
        page_bytes = KVCache.bytes_per_page(mc, config.page_size, self.dtype)
        num_host_pages = int(config.swap_space * _GIB // page_bytes) \
            if config.preemption_mode == "swap" else 0
        self.block_manager = BlockManager(num_pages, config.page_size, config.enable_prefix_caching,
                                          num_host_pages)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.preemption_mode)
        # NOTE: start-up. Zero-filling the KV pool (GiBs on CPU) is bound by page faults; it runs
        # on a thread while this one lays out the weights (ModelRunner), so the two overlap.
        with ThreadPoolExecutor(1, thread_name_prefix="jpaged-kv-alloc") as allocator:
            self.runner = ModelRunner(model, params, allocator.submit(self._zeros_cache, num_pages),
                                      max_num_seqs=config.max_num_seqs,
                                      max_num_batched_tokens=config.max_num_batched_tokens,
                                      max_model_len=self.max_model_len, num_host_pages=num_host_pages,
                                      shardings=self.parallel.step_shardings(params)
                                      if self.parallel else None)
        self.output_processor = OutputProcessor(self.tokenizer, tuple(checkpoint.eos_token_ids),
                                                self.max_model_len)
        # NOTE: threads. add_request and abort_request may be called from any thread (a server's
        # event loop) while another runs step(): they validate and register under a small lock
        # and leave the scheduler's queues to step(), which drains the inbox first.
        self.requests: dict[str, RequestState] = {}
        self.call_log = CallLog() if jax.process_count() > 1 else None
        self.stopped = False                   # a follower's run_follower returns once set
        self._lock = threading.Lock()
        self._inbox: collections.deque[tuple[str, RequestState | str]] = collections.deque()
        self._seqs: dict[int, Sequence] = {}       # seq id -> live sequence (step thread only)
        self._rng = np.random.default_rng(config.seed)
        self.num_steps = 0
        self.last_scheduled = None             # the SchedulerOutput of the latest step
        self.step_seconds = 0.0
        self.peak_pages_used = 0
        kv_bytes = KVCache.bytes_per_page(run_config, config.page_size, self.dtype) * num_pages
        logger.info("KV cache: %d pages x %d tokens (%d tokens, %.2f GiB %s) on %s; max_model_len=%d, "
                    "max_num_seqs=%d, max_num_batched_tokens=%d, prefix caching %s", num_pages,
                    config.page_size, capacity, kv_bytes / _GIB, self.dtype.name,
                    jax.devices()[0].device_kind, self.max_model_len, config.max_num_seqs,
                    config.max_num_batched_tokens, "on" if config.enable_prefix_caching else "off")

    # ---- public API ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | dict | list[int],
                    params: SamplingParams | None = None) -> None:
        """Validate and queue a request; raises ValueError naming the problem, leaving the engine
        and its other requests untouched."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids)
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"SamplingParams: n={params.n} is more than max_num_seqs="
                             f"{self.config.max_num_seqs} (all n samples run together); lower n or "
                             f"raise max_num_seqs")
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"SamplingParams: stop_token_ids {params.stop_token_ids} has ids outside "
                             f"the vocabulary (vocab size {vocab}); give ids below {vocab}")
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(token_ids))
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        seqs = [Sequence(request_id, i, token_ids, params, (base_seed + i * 0x9E3779B9) % 2**32,
                         max_tokens) for i in range(params.n)]
        seqs[0].pending_forks = seqs[1:]       # forked off sample 0 when its prompt is computed
        self._register(self.output_processor.new_request(request_id, text, token_ids, params, seqs))
        if self.call_log is not None:          # replayed by the other processes, same seed
            self.call_log.record(("add", request_id, {"prompt": text, "prompt_token_ids": token_ids},
                                  dataclasses.replace(params, seed=base_seed)))

    def add_beam_request(self, request_id: str, prompt: str | dict | list[int],
                         params: BeamSearchParams) -> None:
        """Queue a beam search (see engine/beam_search.py); its one output, when finished, holds
        the beam_width best hypotheses, best first."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"beam search params must be a BeamSearchParams, got "
                             f"{type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids)
        max_tokens = min(params.max_tokens, self.max_model_len - len(token_ids))
        search = BeamSearch(params.beam_width, max_tokens, self.eos_token_ids, params.ignore_eos,
                            params.length_penalty)
        if search.num_candidates > MAX_LOGPROBS:
            raise ValueError(f"BeamSearchParams: beam_width={params.beam_width} needs the top "
                             f"{search.num_candidates} log-probs per beam ({len(self.eos_token_ids)} "
                             f"EOS ids), more than {MAX_LOGPROBS}; lower beam_width")
        if params.beam_width > self.config.max_num_seqs:
            raise ValueError(f"BeamSearchParams: beam_width={params.beam_width} is more than "
                             f"max_num_seqs={self.config.max_num_seqs}; lower it or raise max_num_seqs")
        sampling = SamplingParams(temperature=0.0, logprobs=search.num_candidates,
                                  max_tokens=max_tokens, ignore_eos=True,
                                  output_kind=RequestOutputKind.FINAL_ONLY)
        first = Sequence(request_id, 0, token_ids, sampling, 0, max_tokens)
        first.extra_seats = params.beam_width - 1         # its beams' seats, held from admission
        state = self.output_processor.new_request(request_id, text, token_ids, sampling, [first])
        state.beam = BeamRequest(search, first)
        self._register(state)
        if self.call_log is not None:
            self.call_log.record(("beam", request_id, {"prompt": text, "prompt_token_ids": token_ids},
                                  params))

    def _register(self, state: RequestState) -> None:
        with self._lock:
            if state.request_id in self.requests:
                raise ValueError(f"request_id {state.request_id!r} is already in use; give each "
                                 f"request a unique id")
            self.requests[state.request_id] = state
            self._inbox.append(("add", state))

    def abort_request(self, request_id: str) -> None:
        """Drop a request wherever it is and free its pages (at the start of the next step when
        called while a step runs). Unknown or finished ids are ignored."""
        self._inbox.append(("abort", request_id))
        if self.call_log is not None:
            self.call_log.record(("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_unfinished()

    def update_params(self, params) -> None:
        """Swap the model weights in place, without a restart (RL / fine-tuning loops).

        `params` must match the current tree leaf for leaf in shape, dtype and sharding, so no
        step compiles again; ValueError names the first mismatched leaf otherwise. Call it between
        steps, from the thread that runs step().
        NOTE: KV computed under the old weights is stale. Every running sequence is preempted by
        recompute (it resumes, prompt and output so far, under the new weights; tokens already
        generated are kept) and the prefix cache is reset.
        Under tensor parallelism `params` is in the checkpoint's layout (as jpaged.load gives it):
        its KV heads are replicated and every leaf placed in the engine's shards first.
        """
        if self.parallel:
            params = self.parallel.shard_params(params)
        self.runner.swap_params(params)
        preempted = self.scheduler.preempt_all_running()
        self.block_manager.reset_prefix_cache()
        logger.info("params updated; %d running sequences preempted for recompute, prefix cache "
                    "reset", len(preempted))

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
            self.step_seconds += time.perf_counter() - start

    # ---- multi-process (jpaged/distributed.py) ---------------------------------------------
    def _replay(self, calls: list[tuple]) -> None:
        """Process 0's calls since the last step; on process 0 itself they already happened."""
        if self.call_log.is_leader:
            return
        for call in calls:
            if call[0] == "add":
                self.add_request(*call[1:])
            elif call[0] == "beam":
                self.add_beam_request(*call[1:])
            elif call[0] == "abort":
                self.abort_request(call[1])
            elif call[0] == "stop":
                self.stopped = True

    def run_follower(self) -> None:
        """On a process other than 0: step in lockstep with process 0 until it stops us."""
        while not self.stopped:
            self.step()

    def stop_followers(self) -> None:
        """On process 0: end the other processes' run_follower (one last, empty-handed step)."""
        if self.call_log is not None and self.call_log.is_leader:
            self.call_log.record(("stop",))
            self.step()

    def _drain_inbox(self) -> None:
        while self._inbox:
            action, item = self._inbox.popleft()
            if action == "add":
                self._seqs.update((seq.seq_id, seq) for seq in item.seqs)
                self.scheduler.add(item.seqs[0])
                continue
            with self._lock:
                state = self.requests.pop(item, None)
            for seq in (state.beam.seqs if state and state.beam else state.seqs if state else []):
                self._seqs.pop(seq.seq_id, None)
                if not seq.is_finished:
                    self.scheduler.abort(seq)

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
            mc, bm = self.model_config, self.block_manager
            self.runner.kv_cache = self._zeros_cache(bm.num_pages)
            preempted = self.scheduler.preempt_all_running()
            bm.reset_prefix_cache()
            logger.warning("the failed step consumed the KV cache: rebuilt it, preempted %d running "
                           "sequences for recompute, reset the prefix cache", len(preempted))
        return failed

    def time_breakdown(self) -> dict[str, float]:
        """Seconds spent in steps so far: compiling, waiting on the device (model + sampler), and
        the rest, i.e. host work (scheduling, input building, output processing, dispatch)."""
        r = self.runner
        return {"steps": self.step_seconds, "compile": r.compile_seconds,
                "device_wait": r.device_wait_seconds,
                "host": self.step_seconds - r.compile_seconds - r.device_wait_seconds}

    def _step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_scheduled = out              # for recover_from_failed_step
        if out.is_empty:
            if self.scheduler.waiting:
                raise RuntimeError("scheduler could not place any waiting sequence; this is a bug")
            return []
        bm = self.block_manager
        self.peak_pages_used = max(self.peak_pages_used, bm.num_usable_pages - bm.num_free_pages)
        sampled = self.runner.execute(out, self.eos_token_ids)
        self.num_steps += 1
        return self._process(out.scheduled, sampled)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The model's EOS ids: they stop a sequence (unless ignore_eos) and are banned under
        min_tokens. One copy, in the output processor; the sampler gets it each step."""
        return self.output_processor.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        self.output_processor.eos_token_ids = tuple(ids)

    def _advance_beams(self, beam: BeamRequest) -> None:
        """Turn a beam request's selection into forks and frees (all freed when it is done)."""
        new, dropped = beam.advance(self.scheduler)
        for seq in dropped:
            del self._seqs[seq.seq_id]
        self._seqs.update((seq.seq_id, seq) for seq in new)

    def stats(self) -> dict[str, int]:
        """KV pages (usable total, used, cached-but-free, free), prefix-cache page queries and
        hits, preemptions by mode, swapped pages, compilations, steps that ran in a stand-in bucket
        while theirs compiled (ModelRunner.compile_in_background) and queue lengths."""
        bm, sched = self.block_manager, self.scheduler
        cached_free = bm.num_cached_free_pages
        return {
            "kv_pages_total": bm.num_usable_pages,
            "kv_pages_used": bm.num_usable_pages - bm.num_free_pages,
            "kv_pages_cached": cached_free,
            "kv_pages_free": bm.num_free_pages - cached_free,
            "prefix_cache_queries": bm.num_prefix_queries,
            "prefix_cache_hits": bm.num_prefix_hits,
            "preemptions_recompute": sched.num_preemptions["recompute"],
            "preemptions_swap": sched.num_preemptions["swap"],
            "swapped_out_pages": sched.num_swapped_out_pages,
            "swapped_in_pages": sched.num_swapped_in_pages,
            "host_pages_used": bm.num_host_pages - len(bm.free_host_pages),
            "compilations": self.num_compilations,
            "stand_in_steps": self.runner.num_stand_in_steps,
            "running": len(sched.running),
            "waiting": len(sched.waiting),
            "swapped": len(sched.swapped),
        }

    @property
    def num_compilations(self) -> int:
        return self.runner.num_compilations

    @property
    def num_preemptions(self) -> int:
        return sum(self.scheduler.num_preemptions.values())

    @property
    def num_cached_tokens(self) -> int:
        return self.scheduler.num_cached_tokens

    # ---- internals -------------------------------------------------------------------------
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
        with self.output_processor.tokenizer_lock:
            return prompt, list(self.tokenizer(prompt).input_ids)

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("The decoder prompt cannot be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"The decoder prompt (length {len(token_ids)}) is longer than the "
                             f"maximum model length of {self.max_model_len}, leaving no room to "
                             f"generate; shorten the prompt or raise max_model_len")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (vocab size {vocab})")

    def _zeros_cache(self, num_pages: int) -> KVCache:
        if self.parallel:
            return self.parallel.zeros_cache(num_pages, self.config.page_size, self.dtype)
        return KVCache.zeros(self.model_config, num_pages, self.config.page_size, self.dtype)

    def _choose_num_pages(self) -> int:
        cfg = self.config
        if cfg.num_pages is not None:
            return cfg.num_pages
        # per device: with tensor parallelism each device holds K'/N heads of every page
        per_page = KVCache.bytes_per_page(self._run_config, cfg.page_size, self.dtype) // \
            cfg.tensor_parallel_size
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

    def _process(self, scheduled: list[ScheduledSeq], sampled: SamplerOutput) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        for i, row in enumerate(scheduled):
            seq = self._seqs[row.seq_id]
            seq.num_computed_tokens += row.num_new_tokens
            self.block_manager.commit(seq)
            if not row.samples:
                continue
            state = self.requests[seq.request_id]
            touched[state.request_id] = state
            if state.beam is not None:        # candidates only: the selection appends tokens
                state.beam.record(seq, sampled.top_ids[i], sampled.top_logprobs[i])
                continue
            token = int(sampled.token_ids[i])
            seq.token_ids.append(token)
            if seq.params.logprobs is not None:
                self.output_processor.record_logprobs(seq, token, float(sampled.logprobs[i]),
                                                      sampled.top_ids[i], sampled.top_logprobs[i])
            finish = self.output_processor.check_stop(seq, token, state.detokenizers[seq.index])
            if finish is not None:
                self.scheduler.finish(seq, *finish)
                del self._seqs[seq.seq_id]
        outputs = []
        for state in touched.values():
            if state.beam is not None and state.beam.ready:
                self._advance_beams(state.beam)
            output = self.output_processor.make_output(state)
            if output is not None:
                outputs.append(output)
            if state.finished:
                with self._lock:
                    self.requests.pop(state.request_id, None)
        return outputs
