"""Adapter reuse across Generator replicas, and what planning before routing costs.

    .venv/bin/python benchmarks/bench_affinity.py --prompts 12 --repeats 4 --out results/bench_affinity.json

Starts local Ray and the Serve app on the tiny model (configs/tiny.yaml: the routing is what is measured,
and the tiny model keeps three replicas within this machine), once per setup:

- 1 Generator replica;
- 3 Generator replicas with ttserve's router (routing.py: holders, then rendezvous owner);
- 3 Generator replicas with Serve's default router (power of two choices), the baseline.

Workload per setup: `--prompts` distinct prompts, each sent `--repeats` times with `compute_budget` 4 and
`mode: always`, in waves (every prompt once per wave, `--concurrency` at a time, wave order shuffled). A
prompt's first request trains; every later one should reuse that adapter. Reported: the share of repeats
that were reused, and how many trainings happened (ideal: one per prompt).

Then, on the 3-replica ttserve setup, handle round trips (`time_hops`): the Planner's `plan` for a
budget-0 and a budget-4 request, and a no-op Generator call routed with and without an adapter id, p50
and p90 over `--hops` rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
DEFAULT_ROUTER = "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter"
SETUPS = {  # name: (Generator replicas, request router class or None for ttserve's)
    "1 replica": (1, None),
    "3 replicas, ttserve router": (3, None),
    "3 replicas, Serve's default router": (3, DEFAULT_ROUTER),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 2),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 2),
    }


def prompts(count: int) -> list[str]:
    names = ["parse", "merge", "render", "fetch", "encode", "retry", "index", "schedule", "compress", "walk"]
    return [f"def {names[i % len(names)]}_{i}(items, limit={i}):\n    result = []" for i in range(count)]


def run_workload(url: str, texts: list[str], repeats: int, concurrency: int, seed: int) -> dict:
    import httpx

    def ask(prompt: str) -> dict:
        response = httpx.post(
            f"{url}/v1/completions",
            json={"model": "ttserve-tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                  "compute_budget": 4, "ttt": {"mode": "always"}},
            timeout=300,
        )  # fmt: skip
        response.raise_for_status()
        return response.json()["ttt"]

    rng = random.Random(seed)
    decisions: list[str] = []
    repeats_reused = repeats_total = 0
    for wave in range(repeats):
        order = rng.sample(texts, len(texts))
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(ask, order))
        decisions += [a["decision"] for a in answers]
        if wave > 0:
            repeats_total += len(answers)
            repeats_reused += sum(a["decision"] == "reused" for a in answers)
    return {
        "requests": len(decisions),
        "trainings": decisions.count("trained"),
        "fallbacks": decisions.count("fallback"),
        "repeats": repeats_total,
        "repeats_reused": repeats_reused,
        "reuse_rate": round(repeats_reused / max(repeats_total, 1), 4),
    }


def time_hops(hops: int) -> dict:
    """Round trips from this process through handles, interleaved call by call so drift hits all alike:
    the Planner's `plan` for a budget-0 request (no retrieval; since base requests are now planned in the
    ingress, only requests that retrieve make this hop) and for a budget-4 one (its retrieval included);
    and a Generator's `stats` (no work) routed without an adapter id (power of two choices) and with one
    (ttserve's ranking): the cost of the routing itself."""
    from ray import serve

    from ttserve.contract import GenerateRequest

    planner = serve.get_deployment_handle("Planner", "ttserve")
    generator = serve.get_deployment_handle("Generator", "ttserve")
    base = GenerateRequest(prompt="def parse(path):", compute_budget=0, mode="always")
    trained = GenerateRequest(prompt="def parse(path):", compute_budget=4, mode="always")
    calls = {
        "plan_budget_0": lambda: planner.plan.remote(base, base.prompt).result(),
        "plan_budget_4": lambda: planner.plan.remote(trained, trained.prompt).result(),
        "generator_noop_no_adapter_id": lambda: generator.stats.remote().result(),
        "generator_noop_with_adapter_id": lambda: (
            generator.options(multiplexed_model_id="0123456789abcdef").stats.remote().result()
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(hops + 5):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if round_ >= 5:  # the first rounds warm up
                seconds[name].append(time.perf_counter() - started)
    return {name: percentiles(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=4, help="requests per prompt (the first trains)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--hops", type=int, default=200, help="timed Planner calls per budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", action="store_true", help="smoke run: 4 prompts, 2 repeats, 20 hops")
    parser.add_argument("--out", type=Path, default=Path("results/bench_affinity.json"))
    args = parser.parse_args()
    if args.limit:
        args.prompts, args.repeats, args.hops = 4, 2, 20

    import ray
    from ray import serve

    from ttserve.serving.app import build_app

    texts = prompts(args.prompts)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "setups": {}}
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, (replicas, router) in SETUPS.items():
            generator: dict = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 1}}
            if router is not None:
                generator["request_router_config"] = {"request_router_class": router}
            app = build_app({"config": CONFIG, "deployments": {"Generator": generator}})
            serve.run(app, name="ttserve", route_prefix="/")
            started = time.perf_counter()
            result = run_workload(
                f"http://127.0.0.1:{port}", texts, args.repeats, args.concurrency, args.seed
            )
            result["seconds"] = round(time.perf_counter() - started, 1)
            if name == "3 replicas, ttserve router":
                result["hops"] = time_hops(args.hops)
            report["setups"][name] = result
            print(name, json.dumps(result), flush=True)
            serve.delete("ttserve")
    finally:
        serve.shutdown()
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| setup | requests | trainings (ideal) | repeats reused |")
    print("|---|---:|---:|---:|")
    for name, r in report["setups"].items():
        print(f"| {name} | {r['requests']} | {r['trainings']} ({args.prompts}) | {r['reuse_rate']:.0%} |")


if __name__ == "__main__":
    main()
