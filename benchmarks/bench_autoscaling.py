"""Generator autoscaling on training backlog, live: Serve runs ttserve's policy (`GeneratorLoad`) on the
metrics the Generator replicas report, and the replica count follows the training work.

    .venv/bin/python benchmarks/bench_autoscaling.py --requests 48 --out results/bench_autoscaling.json

Local Ray, the tiny model (configs/tiny.yaml), a Generator autoscaled between 1 and 2 replicas with
short delays, `training_backlog_s` 0.2 s and a `generations` target too high to matter, so only the
training term can add a replica. `--concurrency` clients send `--requests` requests at `compute_budget`
16 (`mode: always`, distinct prompts: every one trains), then the load stops. The replica states are
sampled every second during the load and for `--idle` seconds after it.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--idle", type=float, default=15.0, help="seconds sampled after the load")
    parser.add_argument("--limit", action="store_true", help="smoke run: 16 requests, 8 s idle")
    parser.add_argument("--out", type=Path, default=Path("results/bench_autoscaling.json"))
    args = parser.parse_args()
    if args.limit:
        args.requests, args.idle = 16, 8.0

    import httpx
    import ray
    from ray import serve

    from ttserve.serving.app import build_app

    generator = {
        "ray_actor_options": {"num_cpus": 1},
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 5,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
            "policy": {
                "policy_function": "ttserve.serving.autoscaling:GeneratorLoad",
                "policy_kwargs": {"training_backlog_s": 0.2, "generations": 1000},
            },
        },
    }
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    timeline: list[tuple[float, dict]] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": CONFIG, "deployments": {"Generator": generator}}), name="ttserve")

        def replicas() -> dict:
            return dict(serve.status().applications["ttserve"].deployments["Generator"].replica_states)

        def ask(i: int) -> int:
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={"model": "ttserve-tiny", "prompt": f"def job_{i}(items):\n", "max_tokens": 4,
                      "compute_budget": 16, "ttt": {"mode": "always"}},
                timeout=300,
            )  # fmt: skip
            return response.status_code

        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(ask, i) for i in range(args.requests)]
            while not all(f.done() for f in futures):
                timeline.append((round(time.monotonic() - started, 1), replicas()))
                time.sleep(1.0)
        load_ended = round(time.monotonic() - started, 1)
        codes = [f.result() for f in futures]
        while time.monotonic() - started < load_ended + args.idle:
            timeline.append((round(time.monotonic() - started, 1), replicas()))
            time.sleep(1.0)
    finally:
        serve.shutdown()
        ray.shutdown()
    two = [t for t, states in timeline if states.get("RUNNING", 0) == 2]
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "answered": codes.count(200),
        "load_ended_s": load_ended,
        "first_second_replica_running_s": two[0] if two else None,
        "back_to_one_replica_s": next(
            (t for t, s in timeline if t > load_ended and s == {"RUNNING": 1}), None
        ),
        "timeline": timeline,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "timeline"}))


if __name__ == "__main__":
    main()
