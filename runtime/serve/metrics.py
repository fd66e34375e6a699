"""Prometheus metrics of a serving runtime (``GET /metrics`` of ``serve --http``).

Built on ``prometheus_client`` with a registry per server (two servers in one
process never share counters). The engine reports to it through its listeners:
tokens as they are emitted, every finished sequence (latency, time to first
token, the modes its cycles ran), every forward and the prefix cache's hits, misses and
evictions; queue depth, active rows and the tokens the prefix cache keeps are read when
scraped. ``nemocompile_tokens_per_second`` is the generation rate over the last
``window`` seconds, for a dashboard without PromQL (``rate()`` of
``nemocompile_generated_tokens_total`` says the same).
"""

from __future__ import annotations

import collections
import threading
import time

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """The metrics of one runtime's engine."""

    def __init__(self, runtime, window: float = 10.0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        engine = runtime.engine
        Gauge("nemocompile_queue_depth", "requests waiting for a free row", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("nemocompile_active_rows", "batch rows decoding a sequence", registry=r).set_function(
            lambda: engine.active_rows)
        Gauge("nemocompile_batch_rows", "rows of the artifact's static batch", registry=r).set(runtime.batch_size)
        Gauge("nemocompile_tokens_per_second", f"generated tokens per second over the last {window:g} s",
              registry=r).set_function(self._rate)
        self.tokens = Counter("nemocompile_generated_tokens", "generated tokens", ["mode"], registry=r)
        self.requests = Counter("nemocompile_sequences", "finished sequences", ["mode", "finish_reason"], registry=r)
        self.dropped = Counter("nemocompile_sequences_dropped", "sequences ended early", ["reason"], registry=r)
        self.rejected = Counter("nemocompile_requests_rejected", "requests refused", ["reason"], registry=r)
        self.cycles = Counter("nemocompile_mode_cycles", "decode cycles run per mode (auto: its choices)", ["mode"],
                              registry=r)
        self.forwards = Counter("nemocompile_forwards", "graph executions", ["step"], registry=r)
        # a forward runs only the rows in flight (1 .. the artifact's batch): how many each ran
        self.forward_rows = Histogram("nemocompile_forward_rows", "rows a forward ran (its batch size)",
                                      buckets=[2 ** i for i in range(max(runtime.batch_size, 1).bit_length() + 1)],
                                      registry=r)
        self.ttft = Histogram("nemocompile_time_to_first_token_seconds", "submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("nemocompile_request_latency_seconds", "submission to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("nemocompile_queue_wait_seconds", "submission to getting a row",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prefix = Counter("nemocompile_prefix_cache_requests", "sequences admitted: 'hit' reused a cached "
                              "prompt prefix, 'miss' prefilled all of it", ["result"], registry=r)
        self.prefix_tokens = Counter("nemocompile_prefix_cache_hit_tokens", "prompt tokens served from the prefix "
                                     "cache (not prefilled)", registry=r)
        self.prefix_evicted = Counter("nemocompile_prefix_cache_evicted_tokens", "tokens finished requests kept "
                                      "that were dropped (token budget, or their row given out)", registry=r)
        prefix = runtime.prefix
        Gauge("nemocompile_prefix_cache_tokens", "tokens finished requests keep for reuse", registry=r).set_function(
            lambda: prefix.cached_tokens if prefix is not None else 0)
        self.window = window
        self._recent: collections.deque = collections.deque()  # (time, tokens)
        self._lock = threading.Lock()
        engine.listeners.append(self.on_event)

    def on_event(self, kind: str, value) -> None:
        if kind == "step":
            (step, _), rows, _ = value
            self.forwards.labels(step).inc()
            self.forward_rows.observe(rows)
        elif kind == "tokens":
            mode, n = value
            self.tokens.labels(mode).inc(n)
            with self._lock:
                self._recent.append((time.monotonic(), n))
        elif kind == "finish":
            s = value.stats
            self.requests.labels(s.mode, value.finish_reason).inc()
            for mode, count in s.mode_mix.items():
                self.cycles.labels(mode).inc(count)
            if s.time_to_first_token_s is not None:
                self.ttft.observe(s.time_to_first_token_s)
            self.latency.observe(s.wall_s)
            self.queue_wait.observe(s.queue_s)
        elif kind == "prefix":
            what, n = value
            if what == "evict":
                self.prefix_evicted.inc(n)
            else:
                self.prefix.labels(what).inc()
                self.prefix_tokens.inc(n)
        elif kind == "drop":
            self.dropped.labels(type(value).__name__).inc()

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
