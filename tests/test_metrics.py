"""The ingress's /metrics view of the Generator replicas' counters (serving/metrics.py), without a server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from tests.serving import metric_values
from ttserve.contract import ReplicaStats
from ttserve.serving.metrics import REPLICA_KEPT_S, ReplicaCollector


def stats(replica: str, misses: int) -> ReplicaStats:
    return ReplicaStats(
        adapters_cached=misses, adapter_bytes=0, cache_hits=0, cache_misses=misses, cache_evictions=0,
        trainings_queued=0, training_steps_queued=0, replica=replica,
    )  # fmt: skip


def scrape(collector: ReplicaCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_each_replica_keeps_its_own_series_between_the_scrapes_that_reach_it():
    now = [0.0]
    collector = ReplicaCollector(clock=lambda: now[0])
    lookups = "ttserve_generator_adapter_cache_lookups_total"
    # Under Ray each scrape reads one replica, whichever Serve picks: a, b, a again.
    for replica, misses in (("a", 3), ("b", 5), ("a", 4)):
        now[0] += 15
        collector.update(stats(replica, misses))
    text = scrape(collector)
    assert metric_values(text, lookups, "replica", result="miss") == {"a": 4.0, "b": 5.0}
    assert metric_values(text, "ttserve_generator_adapters_cached", "replica") == {"a": 4.0, "b": 5.0}
    assert "ttserve_generator_up 1.0" in text

    now[0] += 15
    collector.update(None)  # a failed read: the last values stay, marked down
    text = scrape(collector)
    assert "ttserve_generator_up 0.0" in text and len(metric_values(text, lookups, "replica")) == 2

    # A replica no scrape has reached for REPLICA_KEPT_S is gone (stopped, or scaled away).
    now[0] += REPLICA_KEPT_S - 20
    collector.update(stats("a", 6))
    assert metric_values(scrape(collector), lookups, "replica", result="miss") == {"a": 6.0}


def test_in_process_the_one_replica_has_no_replica_label():
    collector = ReplicaCollector()
    collector.update(stats("", 2))
    text = scrape(collector)
    assert 'ttserve_generator_adapter_cache_lookups_total{result="miss"} 2.0' in text
    assert "replica=" not in text
