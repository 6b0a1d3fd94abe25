"""Budget-0 latency through the whole Ray Serve stack (proxy -> Ingress -> Generator handle -> engine)
against the same engine called directly, on the embedded default (transformers engine, CPU).

    .venv/bin/python benchmarks/bench_ray_overhead.py --requests 50

Starts local Ray and the Serve app as `ttserve serve` does, sends `--requests` non-streaming budget-0
completions (max_tokens 32, greedy) with the official openai client, shuts Ray down, then times the same
requests on a TransformersEngine in this process. Sequential rather than interleaved: both sides need
the machine's two cores, and the Ray replicas would otherwise compete with the direct engine.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

PROMPTS = [
    "def read_lines(path):\n",
    "import os\nimport sys\n\n",
    "class LRUCache:\n    def __init__(self, size):\n",
    "def parse_args(argv=None):\n    parser = ",
    "# Copyright (c) Python Software Foundation\n",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return statistics.median(ordered) * 1e3, ordered[int(0.9 * (len(ordered) - 1))] * 1e3


def through_ray(requests: int) -> tuple[list[float], list[int]]:
    import openai
    import ray
    from ray import serve

    from ttserve.serving.app import build_app

    port = free_port()
    ray.init(include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({}), name="ttserve", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        times, tokens = [], []
        for i in range(requests + 3):  # 3 untimed warm-ups
            started = time.perf_counter()
            response = client.completions.create(
                model="ttserve-tiny", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=32, temperature=0,
                extra_body={"compute_budget": 0},
            )  # fmt: skip
            if i >= 3:
                times.append(time.perf_counter() - started)
                tokens.append(response.usage.completion_tokens)
        return times, tokens
    finally:
        serve.shutdown()
        ray.shutdown()


async def direct(requests: int) -> tuple[list[float], list[int]]:
    from ttserve.engines import SamplingParams, collect
    from ttserve.engines.transformers import TransformersEngine
    from ttserve.lm import load_model
    from ttserve.training import TestTimeTrainer

    engine = TransformersEngine(TestTimeTrainer(load_model()).shared)
    params = SamplingParams(max_tokens=32, temperature=0)
    times, tokens = [], []
    for i in range(requests + 3):
        ids = engine.encode(PROMPTS[i % len(PROMPTS)])
        started = time.perf_counter()
        result = await collect(engine.generate(ids, params))
        if i >= 3:
            times.append(time.perf_counter() - started)
            tokens.append(result.usage.completion_tokens)
    return times, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    ray_times, ray_tokens = through_ray(args.requests)
    direct_times, direct_tokens = asyncio.run(direct(args.requests))
    assert ray_tokens == direct_tokens, "both sides must generate the same number of tokens"
    (ray_p50, ray_p90), (direct_p50, direct_p90) = stats(ray_times), stats(direct_times)
    print(
        f"budget 0, {args.requests} requests each, max_tokens 32 ({statistics.mean(ray_tokens):.1f} tokens)"
    )
    print("| path | median ms | p90 ms |")
    print("|---|---:|---:|")
    print(f"| engine direct | {direct_p50:.1f} | {direct_p90:.1f} |")
    print(f"| HTTP through Ray Serve (proxy, Ingress, Generator) | {ray_p50:.1f} | {ray_p90:.1f} |")
    print(
        f"| overhead | {100 * (ray_p50 / direct_p50 - 1):+.1f}% | {100 * (ray_p90 / direct_p90 - 1):+.1f}% |"
    )


if __name__ == "__main__":
    main()
