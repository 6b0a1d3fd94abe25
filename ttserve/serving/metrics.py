"""Prometheus metrics for GET /metrics. Every label takes values from a fixed set, so cardinality is bounded.

Two kinds: what this ingress saw of its own traffic (requests, latency, decisions, tokens), counted as
requests pass; and the generator replica's own counters (adapter cache, training queue, LoRA gate), read
from the backend when /metrics is scraped (`ReplicaCollector`).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ttserve.contract import ReplicaStats, TTTOutcome

ENDPOINT_OF_PATH = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/models": "models",
    "/health": "health",
    "/metrics": "metrics",
}  # anything else is "other"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ReplicaCollector(Collector):
    """The generator replica's counters as of the last scrape (`update`); nothing until one succeeds."""

    def __init__(self) -> None:
        self.stats: ReplicaStats | None = None
        self.up = False

    def update(self, stats: ReplicaStats | None) -> None:
        self.up = stats is not None
        self.stats = stats or self.stats  # a failed read keeps the last values, with up = 0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ttserve_generator_up", "1 when the last scrape read the generator's counters", value=int(self.up)
        )
        s = self.stats
        if s is None:
            return
        yield GaugeMetricFamily(
            "ttserve_generator_adapters_cached", "adapters in the cache", value=s.adapters_cached
        )
        yield GaugeMetricFamily(
            "ttserve_generator_adapter_bytes", "bytes of the cached adapters' files", value=s.adapter_bytes
        )
        lookups = CounterMetricFamily(
            "ttserve_generator_adapter_cache_lookups", "adapter cache lookups by result", labels=["result"]
        )
        lookups.add_metric(["hit"], s.cache_hits)
        lookups.add_metric(["miss"], s.cache_misses)
        yield lookups
        yield CounterMetricFamily(
            "ttserve_generator_adapter_evictions",
            "adapters evicted from the engine and disk",
            value=s.cache_evictions,
        )
        yield GaugeMetricFamily(
            "ttserve_generator_trainings_queued",
            "trainings admitted and not finished",
            value=s.trainings_queued,
        )
        yield GaugeMetricFamily(
            "ttserve_generator_training_steps_queued",
            "training steps admitted and not taken",
            value=s.training_steps_queued,
        )
        if s.gate_plain is not None:  # vLLM on CPU: the LoRA gate (engines/lora_gate.py)
            paths = CounterMetricFamily(
                "ttserve_generator_lora_gate_requests",
                "requests through vLLM's LoRA gate by path: plain base, base through the zero adapter, adapted",
                labels=["path"],
            )
            paths.add_metric(["plain"], s.gate_plain)
            paths.add_metric(["zero_adapter"], s.gate_zero_adapter)
            paths.add_metric(["adapted"], s.gate_adapted)
            yield paths
            yield CounterMetricFamily(
                "ttserve_generator_lora_gate_waits",
                "LoRA requests that waited for plain base requests to leave vLLM",
                value=s.gate_waited,
            )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ttserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "ttserve_request_seconds",
            "request latency to the last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "ttserve_time_to_first_token_seconds", "streamed responses: latency to the first text", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("ttserve_requests_in_flight", "requests being answered", registry=r)
        self.decisions = Counter(
            "ttserve_ttt_decisions",
            "test-time training decisions: trained, reused (adapter cache hit), skipped (policy), fallback (fault)",
            ["decision"],
            registry=r,
        )
        self.training_steps = Counter("ttserve_training_steps", "test-time training steps taken", registry=r)
        self.training_seconds = Histogram(
            "ttserve_training_seconds",
            "test-time training time per trained request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_cache = Counter(
            "ttserve_adapter_cache", "adapter cache lookups by result", ["result"], registry=r
        )
        self.tokens = Counter(
            "ttserve_tokens", "tokens processed", ["kind"], registry=r
        )  # prompt | completion
        self.replica = ReplicaCollector()
        r.register(self.replica)

    def endpoint(self, path: str) -> str:
        return ENDPOINT_OF_PATH.get(path, "other")

    def record_ttt(self, ttt: TTTOutcome) -> None:
        self.decisions.labels(ttt.decision).inc()
        if ttt.trained:
            self.adapter_cache.labels("hit" if ttt.cached else "miss").inc()
        if ttt.decision == "trained":
            self.training_steps.inc(ttt.steps)
            self.training_seconds.observe(ttt.training_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
