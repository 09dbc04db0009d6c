"""Prometheus metrics of the server (`GET /metrics`), named like vLLM's with a `jpaged:` prefix.

Gauges come from the engine loop's stats snapshot (taken on the loop thread every ~0.25 s while
busy and whenever it goes idle, so `jpaged:kv_pages_used` reads 0 once every request is done);
counters and histograms are fed as requests produce tokens. Each server has its own registry.
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

from jpaged.core.stats import Stats
from jpaged.entrypoints.async_engine import RequestTimes

# vLLM's bucket edges (seconds)
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


class ServerMetrics:
    def __init__(self, model_name: str):
        disable_created_metrics()           # no `*_created` series (vLLM turns them off too)
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"jpaged:{name}", doc, list(labels), registry=registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"jpaged:{name}", doc, list(labels), registry=registry).labels(**labels)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"jpaged:{name}", doc, list(labels), buckets=buckets,
                             registry=registry).labels(**labels)

        self.running = gauge("num_requests_running", "Requests with sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.pages_total = gauge("kv_pages_total", "Usable KV cache pages.")
        self.pages_used = gauge("kv_pages_used", "KV cache pages held by requests.")
        self.pages_cached = gauge("kv_pages_cached",
                                  "Free KV cache pages that still hold a reusable prompt prefix.")
        self.usage = gauge("kv_cache_usage_perc", "Fraction of KV cache pages in use (0 to 1).")
        self.hit_rate = gauge("prefix_cache_hit_rate",
                              "Prefix cache hits / queries (pages), since start.")
        self.compilations = gauge("num_compilations", "Compiled step and sampler variants.")
        self.prefix_queries = counter("prefix_cache_queries", "Pages looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Pages served by the prefix cache.")
        self.preemptions = counter("num_preemptions", "Sequences preempted.")
        self.stand_ins = counter("num_stand_in_steps", "Steps run in a larger compiled bucket "
                                 "while their own compiled in the background.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        # speculative decoding, vLLM's spec_decode_* counters (0 without speculative_config)
        self.spec_drafts = counter("spec_decode_num_drafts", "Sequence steps that verified "
                                   "speculative proposals.")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens",
                                         "Speculative proposals verified.")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens",
                                     "Speculative proposals accepted.")
        self.spec_per_pos = Counter("jpaged:spec_decode_num_accepted_tokens_per_pos",
                                    "Speculative proposals accepted, by position.",
                                    ["model_name", "position"], registry=registry)
        self.request_success = Counter("jpaged:request_success", "Finished sequences by finish reason.",
                                       ["model_name", "finished_reason"], registry=registry)
        self.model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two outputs of a request.",
                             _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _E2E_BUCKETS)
        self._last = Stats()

    def on_stats(self, stats: Stats) -> None:
        self.running.set(stats.num_requests_running)
        self.waiting.set(stats.num_requests_waiting)
        self.pages_total.set(stats.kv_pages_total)
        self.pages_used.set(stats.kv_pages_used)
        self.pages_cached.set(stats.kv_pages_cached)
        self.usage.set(stats.kv_pages_used / max(stats.kv_pages_total, 1))
        self.hit_rate.set(stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1))
        self.compilations.set(stats.num_compilations)
        last = self._last
        self.prefix_queries.inc(max(0, stats.prefix_cache_queries - last.prefix_cache_queries))
        self.prefix_hits.inc(max(0, stats.prefix_cache_hits - last.prefix_cache_hits))
        self.preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        self.stand_ins.inc(max(0, stats.num_stand_in_steps - last.num_stand_in_steps))
        self.spec_drafts.inc(max(0, stats.spec_decode_num_drafts - last.spec_decode_num_drafts))
        self.spec_draft_tokens.inc(max(0, stats.spec_decode_num_draft_tokens -
                                       last.spec_decode_num_draft_tokens))
        self.spec_accepted.inc(max(0, stats.spec_decode_num_accepted_tokens -
                                   last.spec_decode_num_accepted_tokens))
        before = last.spec_decode_num_accepted_tokens_per_pos
        for j, count in enumerate(stats.spec_decode_num_accepted_tokens_per_pos):
            gained = count - (before[j] if j < len(before) else 0)
            if gained > 0:
                self.spec_per_pos.labels(self.model_name, str(j)).inc(gained)
        self._last = stats

    def on_output(self, times: RequestTimes) -> None:
        self.generation_tokens.inc(times.num_new_tokens)
        if times.ttft is not None:
            self.ttft.observe(times.ttft)
            self.prompt_tokens.inc(times.num_prompt_tokens)
        for gap in times.inter_token:
            self.itl.observe(gap)
        if times.e2e is not None:
            self.e2e.observe(times.e2e)
            for reason in times.finish_reasons:
                self.request_success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
