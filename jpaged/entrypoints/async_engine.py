"""AsyncEngine: one LLMEngine, one background thread running its steps, many asyncio clients.

    engine = AsyncEngine(llm_engine, max_waiting_requests=256)
    async for output in engine.generate(request_id, prompt, params):   # DELTA outputs suit streams
        ...

NOTE: threads. The engine loop is ONE thread (`jpaged-engine-loop`) that calls `step()` while any
request is unfinished and sleeps on an event otherwise. Clients live on the asyncio event loop:
`generate` validates and queues the request synchronously (`LLMEngine.add_request` is thread-safe
and raises ValueError naming the problem), then awaits its own asyncio.Queue, which the loop thread
fills through `loop.call_soon_threadsafe`. A client that stops iterating (a cancelled stream, a
disconnect) aborts its request in `finally`; the loop is woken so the pages are freed at once,
not at the next request's step.
NOTE: failures. An exception inside a step fails the requests of that step (their streams raise
`EngineStepError`) and `LLMEngine.recover_from_failed_step` makes the engine serviceable again
(rebuilding the donated KV cache if the failed step consumed it); the loop keeps serving. Only
if recovery itself fails is the engine marked dead: every stream fails and new requests are
refused (`/health` then answers 503).
NOTE: admission counts client requests, not engine requests. `add_requests` admits a client's
whole batch (a completion with many prompts, n split into several engine requests) as ONE waiting
request, or refuses all of it: past `max_waiting_requests` client requests waiting (admitted, not
every engine request of theirs producing tokens yet), plus as many as the batch has sequence
slots not held by started requests (so a burst on an idle server fills the batch first), it raises `QueueFullError` (HTTP 503 with Retry-After) before touching the engine. So a
request is never refused for its size, only because others wait, and a retry succeeds once they
have started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from jpaged.core.stats import Stats
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger("jpaged")

_STATS_PERIOD_S = 0.25      # how often a busy loop refreshes its stats snapshot


class QueueFullError(RuntimeError):
    """The waiting queue is full; the client should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine loop could not recover from a failure and serves no more requests."""


class ShuttingDownError(EngineDeadError):
    """The server is stopping (SIGTERM): requests are refused or cut, a restarted server takes
    them (HTTP 503)."""


@dataclass
class _Group:
    """The engine requests of one client request: it counts as waiting until each has started."""
    pending: int


class EngineStepError(RuntimeError):
    """A step failed while running this request; the request was aborted (HTTP 500)."""


@dataclass
class _Stream:
    """One request as the asyncio side sees it."""
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    num_prompt_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_output_tokens: int = 0
    started: bool = False               # produced its first output (no longer waiting)
    group: _Group | None = None
    num_seqs: int = 1                   # the batch slots it takes (n samples, or beams)


@dataclass
class RequestTimes:
    """What the loop thread reports to a metrics sink when a request produces tokens."""
    ttft: float | None = None                   # set on the first output
    inter_token: list[float] = field(default_factory=list)
    e2e: float | None = None                    # set on the last output
    num_new_tokens: int = 0
    num_prompt_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)


class AsyncEngine:
    def __init__(self, engine, *, max_waiting_requests: int = 256,
                 on_stats: Callable[[Stats], None] | None = None,
                 on_output: Callable[[RequestTimes], None] | None = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.on_stats = on_stats or (lambda stats: None)
        self.on_output = on_output or (lambda times: None)
        self.stats = Stats()                    # the latest snapshot (engine.stats())
        self.dead: BaseException | None = None
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._num_waiting = 0                   # event-loop side count, for admission
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="jpaged-engine-loop", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._publish_stats()
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Abort every request still in flight and stop the loop thread."""
        with self._streams_lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self.engine.abort_request(request_id)
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for request_id in request_ids:
            self._fail(request_id, ShuttingDownError("the server is shutting down"))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt, params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its RequestOutputs (as params.output_kind asks) until the
        finished one. See `add_request` and `outputs`."""
        stream = self.add_request(request_id, prompt, params)
        async for output in self.outputs(request_id, stream):
            yield output

    async def outputs(self, request_id: str, stream: "_Stream") -> AsyncIterator[RequestOutput]:
        """The outputs of a request added with `add_request`, up to the finished one. Raises
        EngineStepError if a step fails while it runs. Leaving the iteration early (break,
        cancellation, a client that disconnects) aborts the request and frees its pages."""
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def add_request(self, request_id: str, prompt, params: SamplingParams) -> "_Stream":
        """Validate and queue one request (on the event loop's thread). Raises ValueError naming
        the problem, QueueFullError or EngineDeadError, leaving nothing behind; the outputs then
        come from `outputs(request_id, stream)`."""
        return self.add_requests([(request_id, prompt, params)])[0]

    def add_requests(self, requests: list[tuple[str, object, SamplingParams]]) -> list["_Stream"]:
        """Admit and queue one client request's engine requests (request_id, prompt, params) as
        one (see NOTE: admission): all of them or, on any error, none (those added are aborted)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop has stopped after an unrecoverable error "
                                  f"({self.dead!r}); restart the server")
        if self._stopping:
            raise ShuttingDownError("the server is shutting down")
        if self._num_waiting >= self.max_waiting_requests + self._free_slots():
            raise QueueFullError(f"the server's waiting queue is full ({self._num_waiting} "
                                 f"requests waiting, max_waiting_requests="
                                 f"{self.max_waiting_requests}); retry later")
        group = _Group(pending=len(requests))
        self._num_waiting += 1
        streams: list[_Stream] = []
        try:
            for request_id, prompt, params, *lora in requests:   # lora: [LoRARequest] or []
                streams.append(self._add_one(request_id, prompt, params, group, *lora))
        except BaseException:
            for (request_id, *_), _ in zip(requests, streams):
                self.abort(request_id)
            self._settle(group, len(requests) - len(streams))
            raise
        self._wakeup.set()
        return streams

    def _free_slots(self) -> int:
        """Sequence slots of the batch that no started request in flight holds."""
        with self._streams_lock:
            running = sum(s.num_seqs for s in self._streams.values() if s.started)
        return max(0, self.engine.config.max_num_seqs - running)

    def _add_one(self, request_id: str, prompt, params: SamplingParams, group: _Group,
                 lora_request=None) -> _Stream:
        num_seqs = getattr(params, "n", None) or getattr(params, "beam_width", 1)
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop(), time.monotonic(),
                         group=group, num_seqs=num_seqs)
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = stream
        try:
            self.engine.add_request(request_id, prompt, params, lora_request=lora_request)
        except BaseException:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Drop a request (any thread); its pages are freed by the loop right away."""
        with self._streams_lock:
            stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._start(stream)
        self.engine.abort_request(request_id)
        self._wakeup.set()

    # ---- the loop thread ---------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        last_stats = 0.0
        while not self._stopping:
            if not engine.has_unfinished_requests():
                self._publish_stats()
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                if engine.call_log is not None:   # multi-process: an idle step keeps the other
                    engine.step()                 # processes in lockstep (a heartbeat)
                continue
            try:
                outputs = engine.step()
            except Exception as exc:                      # noqa: BLE001 - a step must not kill the loop
                self._recover(exc)
                continue
            now = time.monotonic()
            for output in outputs:
                self._deliver(output, now)
            if now - last_stats >= _STATS_PERIOD_S:
                self._publish_stats()
                last_stats = now
        self._publish_stats()

    def _recover(self, exc: Exception) -> None:
        logger.exception("engine step failed; failing the requests in that step", exc_info=exc)
        try:
            failed = self.engine.recover_from_failed_step()
        except Exception as fatal:                        # noqa: BLE001
            logger.exception("engine recovery failed; the engine serves no more requests")
            self.dead = fatal
            with self._streams_lock:
                request_ids = list(self._streams)
            for request_id in request_ids:
                self._fail(request_id, EngineDeadError(f"the engine failed: {fatal!r}"))
            return
        if not failed:
            # NOTE: a failure before the batch was scheduled names no request: fail (and abort)
            # everything in flight rather than retry a step that may fail forever.
            with self._streams_lock:
                failed = list(self._streams)
            for request_id in failed:
                self.engine.abort_request(request_id)
        for request_id in failed:
            self._fail(request_id, EngineStepError(
                f"the engine step running this request failed ({type(exc).__name__}: {exc}); "
                f"the request was aborted and the server keeps serving"))

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self._streams_lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._start(stream)
            self._call_in_loop(stream, stream.queue.put_nowait, error)

    def _deliver(self, output: RequestOutput, now: float) -> None:
        with self._streams_lock:
            stream = (self._streams.pop(output.request_id, None) if output.finished
                      else self._streams.get(output.request_id))
        if stream is None:                                 # aborted meanwhile
            return
        times = RequestTimes(num_prompt_tokens=len(output.prompt_token_ids))
        times.num_new_tokens = sum(len(c.token_ids) for c in output.outputs)
        if times.num_new_tokens:
            if stream.first_token_at is None:
                stream.first_token_at = now
                times.ttft = now - stream.arrival
            elif stream.last_token_at is not None:
                times.inter_token.append(now - stream.last_token_at)
            stream.last_token_at = now
        if output.finished:
            times.e2e = now - stream.arrival
            times.finish_reasons = [c.finish_reason for c in output.outputs if c.finish_reason]
        self._start(stream)
        self.on_output(times)
        self._call_in_loop(stream, stream.queue.put_nowait, output)

    def _start(self, stream: _Stream) -> None:
        """The engine request has started (first output, abort or failure), exactly once; its
        client request stops counting as waiting when its last one has."""
        with self._streams_lock:
            if stream.started:
                return
            stream.started = True
            stream.group.pending -= 1
            if stream.group.pending:
                return
        self._call_in_loop(stream, self._unwait)

    def _settle(self, group: _Group, never_added: int) -> None:
        """On the event loop: engine requests of `group` that were never added count as started."""
        with self._streams_lock:
            group.pending -= never_added
            done = never_added and not group.pending
        if done:
            self._unwait()

    def _unwait(self) -> None:
        self._num_waiting -= 1

    @staticmethod
    def _call_in_loop(stream: _Stream, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):           # the event loop is already closed
            stream.loop.call_soon_threadsafe(fn, *args)

    def _publish_stats(self) -> None:
        try:
            self.stats = self.engine.stats()
            self.on_stats(self.stats)
        except Exception:                                  # noqa: BLE001 - metrics must not kill the loop
            logger.exception("could not read the engine's stats")
