"""Multi-host serving: one SPMD program over several processes, through `jax.distributed`.

    jpaged serve MODEL --tensor-parallel-size 4 --coordinator-address HOST:PORT \
        --num-processes 2 --process-id I          # on each host, I = 0, 1

NOTE: how the processes agree on each step. Every process runs the whole engine: the same
scheduler, block manager and sampler over the same requests, so each one computes the same batch
(the host control plane is deterministic: FIFO queues, no clocks, seeds resolved on process 0).
Only process 0 takes requests (LLM.generate, the HTTP server). At the start of every step it
broadcasts the request calls made since the previous step (typed records, jpaged/engine/calls.py,
pickled into a uint8 array) with `multihost_utils.broadcast_one_to_all`, an XLA collective over all processes'
devices, and the other processes replay them in the same order before they schedule. The step's
device inputs are then equal everywhere, the sampled tokens are replicated, and every process
appends the same tokens. Process 0 ends the followers with `stop_followers()` (the CLI does this
when it exits).
NOTE: failure. If a process dies, the others' next collective fails (the CPU collectives see the
connection close) or the coordination service's heartbeat (HEARTBEAT_SECONDS) declares it dead;
every process then exits with one line naming the failure. Nothing waits forever.
NOTE: trust. The calls travel pickled; the processes of one engine trust each other (as any
jax.distributed job does); never expose the coordinator port beyond the cluster.
Limits: swap preemption needs the whole cache on one host, so multi-process engines use
recompute; process 0's tokenizer must match the others' (the same MODEL everywhere).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading

import jax
import numpy as np

logger = logging.getLogger("jpaged")
HEARTBEAT_SECONDS = 10
_MIN_PAYLOAD = 1024


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize`, with errors that name the flag and a short heartbeat so a
    dead peer is noticed within seconds. Call before any other JAX work."""
    if ":" not in (coordinator_address or ""):
        raise ValueError(f"coordinator_address must be HOST:PORT (process 0's address), got "
                         f"{coordinator_address!r}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, num_processes={num_processes}), got "
                         f"{process_id!r}; give each process its own index")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=120,
                               heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
                               shutdown_timeout_seconds=30)
    logger.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())


class CallLog:
    """Process 0's request calls since the last step, broadcast to every process by `exchange`."""

    def __init__(self):
        self.is_leader = jax.process_index() == 0
        self._calls: list = []
        self._lock = threading.Lock()

    def record(self, call) -> None:
        if self.is_leader:
            with self._lock:
                self._calls.append(call)

    def exchange(self) -> list:
        """A collective: every process must call it once per step. Returns process 0's calls."""
        from jax.experimental import multihost_utils

        payload = b""
        if self.is_leader:
            with self._lock:
                calls, self._calls = self._calls, []
            payload = pickle.dumps(calls)
        size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
        buffer = np.zeros(max(_MIN_PAYLOAD, 1 << (size - 1).bit_length()), np.uint8)  # few shapes
        buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
        buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
        return pickle.loads(buffer[:size].tobytes())


def exit_on_peer_failure(exc: BaseException) -> None:
    """Print why and leave at once: `os._exit`, because the normal exit would first wait in
    jax.distributed's shutdown barrier for the peer that is gone."""
    print(peer_failure_message(exc), file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)


def peer_failure_message(exc: BaseException) -> str:
    detail = str(exc).splitlines()[0][:300] if str(exc) else ""
    return (f"jpaged: process {jax.process_index()} of {jax.process_count()}: a step of the "
            f"multi-process engine failed, most likely a collective with a peer process that has "
            f"died or is unreachable ({type(exc).__name__}: {detail}); exiting (restart every "
            f"process to recover)")
