"""Prometheus metrics for GET /metrics. Every label takes values from a fixed set, but `replica` from the
live Generator replicas, so cardinality is bounded.

Two kinds: what this ingress saw of its own traffic (requests, latency, decisions, tokens), counted as
requests pass; and the generator replicas' own counters (adapter cache, training queue, LoRA gate), read
from the backend when /metrics is scraped (`ReplicaCollector`). Under Ray that read reaches one Generator
replica, so the ingress keeps each replica's last read, labelled `replica`; every replica also exports its
own counters as Ray metrics (`RayReplicaMetrics`), fresh every few seconds on each node's Ray metrics port.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

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
# How long the ingress's /metrics keeps a Generator replica's series after the last scrape that read it.
REPLICA_KEPT_S = 300.0


# The generator replica's counters: (metric, help, kind, a ReplicaStats field, or (label, {value: field})).
REPLICA_METRICS = (
    ("ttserve_generator_adapters_cached", "adapters in the cache", "gauge", "adapters_cached"),
    ("ttserve_generator_adapter_bytes", "bytes of the cached adapters' files", "gauge", "adapter_bytes"),
    ("ttserve_generator_adapters_loaded", "adapters loaded in the engine", "gauge", "adapters_loaded"),
    (
        "ttserve_generator_adapter_cache_lookups",
        "adapter cache lookups by result",
        "counter",
        ("result", {"hit": "cache_hits", "miss": "cache_misses"}),
    ),
    (
        "ttserve_generator_adapter_evictions",
        "adapters evicted from the engine and disk",
        "counter",
        "cache_evictions",
    ),
    (
        "ttserve_generator_trainings_queued",
        "trainings admitted and not finished",
        "gauge",
        "trainings_queued",
    ),
    (
        "ttserve_generator_training_steps_queued",
        "training steps admitted, not taken",
        "gauge",
        "training_steps_queued",
    ),
    ("ttserve_generator_generations_running", "generations holding a slot", "gauge", "generations_running"),
    (
        "ttserve_generator_generations_waiting",
        "generations waiting for a slot",
        "gauge",
        "generations_waiting",
    ),
    (
        "ttserve_generator_generations_refused",
        "generations refused for want of a slot (503)",
        "counter",
        "generations_refused",
    ),
    (  # vLLM on CPU only: the LoRA gate (engines/lora_gate.py); absent elsewhere
        "ttserve_generator_lora_gate_requests",
        "requests through vLLM's LoRA gate by path: plain base, base through the zero adapter, adapted",
        "counter",
        ("path", {"plain": "gate_plain", "zero_adapter": "gate_zero_adapter", "adapted": "gate_adapted"}),
    ),
    (
        "ttserve_generator_lora_gate_waits",
        "LoRA requests that waited for plain base requests to leave vLLM",
        "counter",
        "gate_waited",
    ),
)


def replica_samples(stats: ReplicaStats) -> Iterator[tuple[str, str, str, dict[str, str], float]]:
    """(metric, help, kind, labels, value) for every counter in REPLICA_METRICS that this replica has."""
    for name, documentation, kind, fields in REPLICA_METRICS:
        if isinstance(fields, str):
            samples = [({}, getattr(stats, fields))]
        else:
            label, by_value = fields
            samples = [({label: value}, getattr(stats, field)) for value, field in by_value.items()]
        if all(value is not None for _, value in samples):
            for labels, value in samples:
                yield name, documentation, kind, labels, value


class ReplicaCollector(Collector):
    """The generator replicas' counters as last read (`update`); nothing until a read succeeds.

    In-process there is one replica, read on every scrape, and its series carry no replica label. Under
    Ray each read reaches whichever Generator replica Serve picks, so the collector keeps the last read of
    every replica and labels its series `replica` (Serve's replica tag, as on Ray's metrics port): one
    series per replica, each counter only rising, instead of one series jumping between replicas, which
    Prometheus would read as counter resets. A replica's series is as fresh as the last scrape that
    reached it, and is dropped once no scrape has reached it for `REPLICA_KEPT_S` (stopped or scaled away).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.replicas: dict[str, tuple[float, ReplicaStats]] = {}  # replica tag -> (read at, stats)
        self.up = False

    def update(self, stats: ReplicaStats | None) -> None:
        """A scrape's read of one replica, or None when it failed (the last values stay, with up = 0)."""
        now = self.clock()
        self.up = stats is not None
        if stats is not None:
            self.replicas[stats.replica] = (now, stats)
        self.replicas = {tag: read for tag, read in self.replicas.items() if now - read[0] <= REPLICA_KEPT_S}

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ttserve_generator_up", "1 when the last scrape read the generator's counters", value=int(self.up)
        )
        families: dict[str, Metric] = {}
        for tag, (_, stats) in sorted(self.replicas.items()):
            for name, documentation, kind, labels, value in replica_samples(stats):
                labels = {"replica": tag, **labels} if tag else labels
                if name not in families:
                    family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                    families[name] = family(name, documentation, labels=list(labels))
                families[name].add_metric(list(labels.values()), value)
        yield from families.values()


class RayReplicaMetrics:
    """A Generator replica's counters as Ray metrics (`export` them every few seconds). Serve tags each
    series with its deployment, replica and application, and Ray's metrics agent on every node serves
    them, prefixed `ray_`, to Prometheus: every replica fresh every few seconds, where the ingress's
    /metrics has each replica as of the last scrape that reached it."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.metrics = {}
        for name, documentation, kind, fields in REPLICA_METRICS:
            family = metrics.Gauge if kind == "gauge" else metrics.Counter
            tag_keys = () if isinstance(fields, str) else (fields[0],)
            self.metrics[name] = family(name, description=documentation, tag_keys=tag_keys)
        self.exported: dict[tuple[str, tuple], float] = {}  # counters: the value already added

    def export(self, stats: ReplicaStats) -> None:
        for name, _, kind, labels, value in replica_samples(stats):
            metric, tags = self.metrics[name], labels or None
            if kind == "gauge":
                metric.set(value, tags=tags)
                continue
            key = (name, tuple(labels.items()))
            before = self.exported.get(key, 0)
            if value > before:  # Ray counters only add
                metric.inc(value - before, tags=tags)
                self.exported[key] = value


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
