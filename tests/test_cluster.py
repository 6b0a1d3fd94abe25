"""ttserve across a real multi-node Ray cluster on this machine: a head node and two worker nodes (separate
raylets and object stores on loopback, `ray.cluster_utils.Cluster`), two Generator replicas (one per
worker node, placed by a custom resource) and a datastore in two shards served by two Shard deployments.

It shows what scale-out promises: a repeated prompt is reused wherever it lands, concurrent identical
requests train once, sharded retrieval picks what unsharded retrieval picks, and when a worker node dies
mid-load the requests in flight end with a clear error or an answer, the service answers again once Serve
has rescheduled, and no scratch space is left behind. The tiny model keeps it within CI's time."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serving import metric_values, run_app_on_serve

pytestmark = pytest.mark.slow

MODEL = "tiny-test"
RETRIEVAL = {"n": 16, "k": 24}  # up to 16 steps: trainings long enough for a node loss to cut them
PROMPTS = [
    "def parse_config(path):\n    with open(path) as handle:",
    "class LRUCache:\n    def __init__(self, capacity):",
    "import json\n\ndef load(path):",
    "def retry(times):\n    def decorator(function):",
    "async def fetch(session, url):",
    "def merge_sorted(left, right):",
]


def scratch_directories() -> set[Path]:
    from ttserve.files import default_scratch_root

    return set(default_scratch_root().glob("ttserve-adapters-*"))


def owner_alive(directory: Path) -> bool:
    """Whether the process a scratch directory belongs to (its name carries the pid) is running."""
    pid = int(directory.name.split("-")[2])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ask(url: str, prompt: str, budget: int, timeout: float = 120.0, **extra) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8,
            "temperature": 0,
            "compute_budget": budget,
            "ttt": {"mode": "always"},
            **extra,
        },
        timeout=timeout,
    )


def ttt(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()["ttt"]


def generators_running(serve) -> int:
    deployment = serve.status().applications["ttserve"].deployments["Generator"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster_app(server_settings, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.cluster_utils import Cluster

    from ttserve.datastore.shards import shard_datastore

    sharded = tmp_path_factory.mktemp("cluster") / "sharded"
    shard_datastore(server_settings.datastore.path, sharded, 2, progress=False)
    before = scratch_directories()
    node = {"object_store_memory": 80 * 2**20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "num_cpus": 2, "resources": {"head": 100}, "include_dashboard": False},
    )
    workers = [cluster.add_node(**node, num_cpus=1, resources={"generator": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    on_head = {"ray_actor_options": {"num_cpus": 0.1, "resources": {"head": 1}}}
    overrides = {
        "datastore": {"path": str(sharded), "shards": 2},
        "model": {"name_or_path": server_settings.model.name_or_path, "device": "cpu", "dtype": "float32"},
        "retrieval": RETRIEVAL,
        "training": {"learning_rate": 0.01},
        "server": {"default_compute_budget": 0, "max_compute_budget": 64, "served_model_name": MODEL},
    }
    deployments = {
        "Ingress": on_head,
        "Planner": on_head,
        "Shard": on_head,
        "Generator": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1, "resources": {"generator": 1}}},
    }
    try:
        # One proxy, on the head: every node shares this machine's ports.
        url = run_app_on_serve(
            {"overrides": overrides, "deployments": deployments}, proxy_location="HeadOnly"
        )
        wait_until(lambda: generators_running(serve) == 2, 300, "two Generator replicas")
        yield {"url": url, "cluster": cluster, "workers": workers, "serve": serve, "sharded": sharded}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    # Scratch space of the replica that was killed is swept by the one that replaced it on this machine, and
    # the others remove theirs when Serve stops them: no directory of a process that has gone is left.
    # (Directories of live processes are another program's, e.g. a test running beside this one.)
    # A replica that Serve kills instead of stopping (one still starting, or one past its graceful timeout)
    # runs no cleanup. Replicas make their directory at their first training, so one killed while starting
    # leaves none; one killed after it trained leaves its directory to the sweep the next replica on this
    # machine runs, which must find it, and nothing else.
    from ttserve.files import default_scratch_root, sweep_scratch

    sweep_scratch(default_scratch_root())
    assert [d for d in scratch_directories() - before if not owner_alive(d)] == []


def test_sharded_retrieval_picks_what_unsharded_retrieval_picks(cluster_app, server_settings, memo_embedder):
    from ttserve.config import RetrievalConfig
    from ttserve.datastore import Datastore
    from ttserve.retrieval import Retriever

    whole = Retriever(Datastore(server_settings.datastore.path), memo_embedder, RetrievalConfig(**RETRIEVAL))
    for prompt in PROMPTS[:3]:
        served = ttt(ask(cluster_app["url"], prompt, budget=1))
        assert served["selected_ids"] == whole.retrieve(prompt).ids, prompt
        assert "degraded" not in served["reason"]


def test_a_repeated_prompt_is_reused_wherever_it_lands(cluster_app):
    url = cluster_app["url"]
    first = {prompt: ttt(ask(url, prompt, budget=2)) for prompt in PROMPTS}
    assert all(t["decision"] == "trained" for t in first.values())
    for _ in range(2):
        for prompt in PROMPTS:  # with random routing over two replicas, about half would retrain
            again = ttt(ask(url, prompt, budget=2))
            assert again["decision"] == "reused" and again["adapter_id"] == first[prompt]["adapter_id"]


def test_concurrent_identical_requests_train_once_across_replicas(cluster_app):
    url = cluster_app["url"]
    prompt = "def flatten(nested):\n    for item in nested:"
    with ThreadPoolExecutor(6) as pool:
        answers = [ttt(r) for r in pool.map(lambda _: ask(url, prompt, budget=3), range(6))]
    assert sorted(a["decision"] for a in answers) == ["reused"] * 5 + ["trained"]
    assert len({a["adapter_id"] for a in answers}) == 1


def test_every_generator_replica_exports_its_own_counters(cluster_app):
    """Each Generator replica exports its counters as Ray metrics, one series per replica on its node's
    metrics port, and the ingress's /metrics keeps one series per replica as well. Every training the
    ingress counted as a cache miss is a miss on exactly one replica."""
    url = cluster_app["url"]
    ports = [node.metrics_export_port for node in cluster_app["workers"]]  # one Generator on each

    def per_replica(metric: str, **labels: str) -> dict[str, float]:
        series: dict[str, float] = {}
        for port in ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            series |= metric_values(text, metric, "replica", deployment="Generator", **labels)
        return series

    for i in range(4):  # trainings of its own, spread over the replicas by their keys
        assert ttt(ask(url, f"def exported_{i}(values):", budget=1, cache_salt=f"metrics-{i}"))["trained"]
    trained = metric_values(httpx.get(f"{url}/metrics").text, "ttserve_adapter_cache_total", "result")["miss"]
    assert trained >= 4
    misses = lambda: per_replica("ray_ttserve_generator_adapter_cache_lookups_total", result="miss")  # noqa: E731
    wait_until(
        lambda: sum(misses().values()) == trained, 90, "the replicas' misses to add up to the trainings"
    )
    assert len(per_replica("ray_ttserve_generator_adapters_cached")) == 2  # a series for each replica

    # The ingress's /metrics too: each scrape reads one replica and keeps the others' last reads, each
    # replica under its own label, so that the counters add up once both have been reached.
    def ingress_misses() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        return metric_values(text, "ttserve_generator_adapter_cache_lookups_total", "replica", result="miss")

    wait_until(
        lambda: (seen := ingress_misses()).keys() == misses().keys() and sum(seen.values()) == trained,
        60,
        "the ingress's /metrics to show both replicas' misses",
    )


def test_a_worker_node_lost_mid_load_ends_requests_cleanly_and_the_service_recovers(cluster_app):
    url, cluster, serve = cluster_app["url"], cluster_app["cluster"], cluster_app["serve"]
    prompts = [f"def task_{i}(items):\n    total = 0" for i in range(24)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        # The tiny corpus gives these prompts the same picks: a salt each makes their adapters distinct, so
        # the router spreads them over both replicas (rendezvous), rather than all to one.
        in_flight = [pool.submit(ask, url, p, 16, cache_salt=f"load-{i}") for i, p in enumerate(prompts)]
        # Each replica trains one request at a time: once two answers are back, about 11 are still queued
        # or training on each replica, whatever this machine's speed.
        wait_until(lambda: sum(future.done() for future in in_flight) >= 2, 300, "the first answers")
        cluster.remove_node(cluster_app["workers"][0], allow_graceful=False)
        outcomes = [future.result() for future in in_flight]
    lost = [r for r in outcomes if r.status_code != 200]
    for response in lost:  # an OpenAI-style error that says what happened
        error = response.json()["error"]
        assert response.status_code == 503 and "stopped" in error["message"], response.text
    assert lost, "no request was in flight on the lost node: the test did not test it"
    assert len(lost) < len(outcomes)  # the other replica kept answering
    assert ttt(ask(url, PROMPTS[0], budget=0))["decision"] == "skipped"  # with one replica left
    cluster.add_node(object_store_memory=80 * 2**20, num_cpus=1, resources={"generator": 1})
    wait_until(lambda: generators_running(serve) == 2, 300, "Serve to replace the lost replica")
    answers = [ttt(ask(url, prompt, budget=2)) for prompt in PROMPTS]
    assert all(a["decision"] in ("trained", "reused") for a in answers)
    assert all(ttt(ask(url, prompt, budget=2))["decision"] == "reused" for prompt in PROMPTS)
