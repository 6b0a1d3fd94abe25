"""Prometheus metrics for GET /metrics. Every label takes values from a fixed set, so cardinality is bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ttserve.serving.protocol import TTTInfo

ENDPOINT_OF_PATH = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/models": "models",
    "/health": "health",
    "/metrics": "metrics",
}  # anything else is "other"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


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

    def endpoint(self, path: str) -> str:
        return ENDPOINT_OF_PATH.get(path, "other")

    def record_ttt(self, ttt: TTTInfo) -> None:
        self.decisions.labels(ttt.decision).inc()
        if ttt.decision in ("trained", "reused"):
            self.adapter_cache.labels("hit" if ttt.cached else "miss").inc()
        if ttt.decision == "trained":
            self.training_steps.inc(ttt.steps)
            self.training_seconds.observe(ttt.training_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
