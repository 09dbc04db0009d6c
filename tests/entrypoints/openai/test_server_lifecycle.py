"""Start-up and shutdown of `jpaged serve`: the warm-up compiles the buckets before /health is
200 (a first request compiles nothing), and SIGTERM under load exits 0 within a few seconds.
A tiny context (32 tokens, 2 sequences) keeps the warm-up to a handful of buckets."""

from __future__ import annotations

import signal
import threading
import time

import httpx
from server_utils import RemoteServer


def test_warmup_then_sigterm_under_load_exits_zero(smollm2_path, tmp_path):
    server = RemoteServer([str(smollm2_path), "--dtype", "float32", "--max-model-len", "32",
                           "--max-num-seqs", "2", "--num-pages", "16", "--shutdown-timeout", "2"],
                          tmp_path / "server.log")
    try:
        assert "warm-up:" in server.log_tail(20000) and "buckets ready" in server.log_tail(20000)
        before = server.metrics()["jpaged:num_compilations"]
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "The capital of France is",
                                                             "max_tokens": 4, "temperature": 0.0},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert server.metrics()["jpaged:num_compilations"] == before     # nothing compiled

        streamed: list[int] = []

        def stream():
            lines = 0
            try:
                with httpx.stream("POST", f"{server.url}/generate", timeout=60,
                                  json={"prompt": "Once upon a time", "max_tokens": 24,
                                        "ignore_eos": True, "stream": True}) as s:
                    for _ in s.iter_lines():
                        lines += 1
            except httpx.HTTPError:
                pass
            streamed.append(lines)

        clients = [threading.Thread(target=stream) for _ in range(4)]
        for c in clients:
            c.start()
        deadline = time.monotonic() + 30
        while server.metrics()["jpaged:num_requests_running"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=20)
        elapsed = time.monotonic() - start
        for c in clients:
            c.join(timeout=20)
        assert code == 0, server.log_tail()
        assert elapsed < 10, elapsed
        assert len(streamed) == 4 and max(streamed) > 0       # streams were flowing when it stopped
        assert "Application shutdown complete" in server.log_tail(20000)
        assert "Traceback" not in server.log_tail(200000)
    finally:
        server.stop()
