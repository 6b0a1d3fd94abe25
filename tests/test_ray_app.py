"""The Ray Serve application itself: `serve.run(build_app(...))` on a local Ray cluster, driven over HTTP with
the official `openai` client. Ingress, Planner and Generator run as separate replicas (separate processes),
so everything that crosses them (requests, streamed events, domain errors, replica counters) is pickled for
real. The `ttserve serve` command on top of this is tested in test_server.py."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving import CODE_PROMPT, Running, chat, metric_values, run_app_on_serve, ttt_of

pytestmark = pytest.mark.slow


def scratch_directories() -> set[Path]:
    from ttserve.files import default_scratch_root

    return set(default_scratch_root().glob("ttserve-adapters-*"))


@pytest.fixture(scope="module")
def ray_app(server_settings):
    ray = pytest.importorskip("ray")
    from ray import serve

    overrides = {
        "datastore": {"path": str(server_settings.datastore.path)},
        "model": {"name_or_path": server_settings.model.name_or_path, "device": "cpu", "dtype": "float32"},
        "retrieval": {"n": 8, "k": 24},
        "training": {"learning_rate": 0.01},
        "server": {"default_compute_budget": 0, "max_compute_budget": 64, "served_model_name": "tiny-test"},
    }
    before = scratch_directories()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=128 * 2**20,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        yield Running(run_app_on_serve({"overrides": overrides}), None, server_settings, "tiny-test")
    finally:
        serve.shutdown()
        ray.shutdown()
    # The Generator frees its adapters' scratch space (memory, in /dev/shm) when Serve stops it.
    assert scratch_directories() <= before


def test_budget_zero_answers_with_the_base_model(ray_app):
    response = chat(ray_app, extra_body={"compute_budget": 0})
    ttt = ttt_of(response)
    assert ttt["decision"] == "skipped" and ttt["reason"] == "compute budget is 0" and not ttt["trained"]
    assert response.choices[0].message.content and response.usage.completion_tokens > 0


def test_a_budget_trains_on_the_generator_and_a_repeat_reuses_the_adapter(ray_app):
    body = {"compute_budget": 2, "ttt": {"mode": "always"}}
    first = ttt_of(chat(ray_app, content="class Registry:\n    def register(self):", extra_body=body))
    assert first["decision"] == "trained" and first["steps"] == 2 and first["selected_ids"]
    assert first["retrieval_ms"] > 0  # retrieval ran in the Planner replica
    again = ttt_of(chat(ray_app, content="class Registry:\n    def register(self):", extra_body=body))
    assert again["decision"] == "reused" and again["adapter_id"] == first["adapter_id"]


def test_streaming_through_the_handles_equals_the_whole_answer(ray_app):
    whole = chat(ray_app, extra_body={"compute_budget": 0}).choices[0].message.content
    for budget in (0, 2):
        chunks = list(
            ray_app.client().chat.completions.create(
                model="tiny-test",
                messages=[{"role": "user", "content": CODE_PROMPT}],
                max_tokens=12,
                temperature=0,
                stream=True,
                extra_body={"compute_budget": budget, "ttt": {"mode": "always"}},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert ttt_of(chunks[-1])["budget"] == budget and chunks[-1].choices[0].finish_reason
        if budget == 0:
            assert text == whole
        else:
            assert ttt_of(chunks[-1])["steps"] == budget and text


def test_refusals_in_the_planner_and_the_generator_reach_the_client_as_openai_errors(ray_app):
    """The budget cap is checked in the Planner replica, token ids in the Generator: their domain errors
    cross Ray and become 400s."""
    with pytest.raises(openai.BadRequestError) as refused:
        chat(ray_app, extra_body={"compute_budget": 10**6})
    error = refused.value.body
    assert error["param"] == "compute_budget" and "above this server's maximum" in error["message"]
    response = httpx.post(
        f"{ray_app.url}/v1/completions",
        json={"model": "tiny-test", "prompt": [1, 2, 10**7], "max_tokens": 1, "compute_budget": 0},
    )
    assert response.status_code == 400 and json.loads(response.text)["error"]["param"] == "prompt"


def test_metrics_include_the_generator_replicas_counters(ray_app):
    chat(ray_app, content="import json", extra_body={"compute_budget": 1, "ttt": {"mode": "always"}})
    text = httpx.get(f"{ray_app.url}/metrics").text
    assert "ttserve_generator_up 1.0" in text
    # One Generator replica, its series labelled with its Serve replica tag
    (replica,) = metric_values(text, "ttserve_generator_adapters_cached", "replica")
    assert metric_values(text, "ttserve_generator_trainings_queued", "replica") == {replica: 0.0}
    misses = metric_values(text, "ttserve_generator_adapter_cache_lookups_total", "replica", result="miss")
    assert misses[replica] >= 1


def test_a_planner_replica_killed_under_load_is_replaced_and_no_request_fails_badly(ray_app):
    """The Planner replica dies while training requests stream in. A request in flight ends with an answer
    or a retryable 503, never a 500 or a hang: its plan call fails, the Generator plans it itself, and its
    retrieval waits for the Planner Serve starts in place of the dead one (at most
    server.retrieval_timeout_s, then the base model answers). Then requests train with retrieval again."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import ray

    def planners() -> set[tuple[str, str]]:
        return {
            (actor["name"], actor["namespace"])
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if "#Planner#" in actor["name"]
        }

    (victim,) = planners()
    stop, outcomes, lock = threading.Event(), [], threading.Lock()

    def client_loop(worker: int) -> None:
        client = ray_app.client(timeout=120)
        for i in range(200):
            if stop.is_set():
                return
            body = {"compute_budget": 2, "ttt": {"mode": "always"}}
            try:
                response = client.chat.completions.create(
                    model="tiny-test",
                    messages=[{"role": "user", "content": f"def handler_{worker}_{i}(event):"}],
                    max_tokens=4,
                    temperature=0,
                    extra_body=body,
                )
                outcome = ("ok", ttt_of(response))
            except openai.APIStatusError as error:
                outcome = (error.status_code, error.message)
            with lock:
                outcomes.append((time.monotonic(), outcome))

    def answered() -> int:
        with lock:
            return sum(outcome[0] == "ok" for _, outcome in outcomes)

    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(client_loop, worker) for worker in range(3)]
        deadline = time.monotonic() + 120
        while answered() < 3:  # the load is in progress
            assert time.monotonic() < deadline, outcomes
            time.sleep(0.05)
        ray.kill(ray.get_actor(victim[0], namespace=victim[1]), no_restart=True)
        killed = time.monotonic()
        while not (planners() - {victim}) or answered_after(outcomes, lock, killed) < 3:
            assert time.monotonic() < deadline + 180, "no new Planner replica, or no answers after it"
            time.sleep(0.2)
        stop.set()
        for worker in workers:
            worker.result()

    statuses = {outcome[0] for _, outcome in outcomes}
    assert statuses <= {"ok", 503}, outcomes  # never a 500, never a timeout (it would have raised)
    # With the new Planner, training requests retrieve and train again.
    fresh = ttt_of(
        chat(
            ray_app,
            content="def on_restart(event):",
            extra_body={"compute_budget": 2, "ttt": {"mode": "always"}},
        )
    )
    assert fresh["decision"] == "trained" and fresh["selected_ids"], fresh


def answered_after(outcomes: list, lock, moment: float) -> int:
    with lock:
        return sum(when > moment and outcome[0] == "ok" for when, outcome in outcomes)
