"""Budget-0 latency through the whole Ray Serve stack (proxy -> Ingress -> Generator handle -> engine)
against the same engine called directly, on the embedded default (transformers engine, CPU).

    .venv/bin/python benchmarks/bench_ray_overhead.py --requests 50

Starts local Ray and the Serve app as `ttserve serve` does and loads the same model into a
TransformersEngine in this process, then times non-streaming budget-0 completions (max_tokens 32, greedy)
both ways: through Ray with the official openai client, and on the local engine directly. The two sides
run in alternating blocks of 10 (the first request of each block untimed, so that one side's CPU threads
have gone quiet before the other is timed), so that drift in the machine's speed hits both sides alike.
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


BLOCK = 10  # requests per block; the first of each is untimed


def compare(requests: int) -> dict[str, tuple[list[float], list[int]]]:
    """Alternating blocks: Ray, direct, direct, Ray, Ray, direct, ... until each side has `requests`."""
    import openai
    import ray
    from ray import serve

    from ttserve.engines import SamplingParams, collect
    from ttserve.engines.transformers import TransformersEngine
    from ttserve.lm import load_model
    from ttserve.serving.app import build_app
    from ttserve.training import TestTimeTrainer

    engine = TransformersEngine(TestTimeTrainer(load_model()).shared)
    params = SamplingParams(max_tokens=32, temperature=0)
    loop = asyncio.new_event_loop()
    port = free_port()
    ray.init(include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({}), name="ttserve", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        def via_ray(prompt: str) -> int:
            response = client.completions.create(
                model="ttserve-tiny",
                prompt=prompt,
                max_tokens=32,
                temperature=0,
                extra_body={"compute_budget": 0},
            )
            return response.usage.completion_tokens

        def direct(prompt: str) -> int:
            return loop.run_until_complete(
                collect(engine.generate(engine.encode(prompt), params))
            ).usage.completion_tokens

        sides = {"ray": via_ray, "direct": direct}
        results: dict[str, tuple[list[float], list[int]]] = {name: ([], []) for name in sides}
        order = ["ray", "direct", "direct", "ray"]
        block = 0
        while min(len(times) for times, _ in results.values()) < requests:
            name = order[block % len(order)]
            times, tokens = results[name]
            for i in range(BLOCK + 1):
                prompt = PROMPTS[i % len(PROMPTS)]  # every block sends the same prompts
                started = time.perf_counter()
                produced = sides[name](prompt)
                if i > 0 and len(times) < requests:
                    times.append(time.perf_counter() - started)
                    tokens.append(produced)
            block += 1
        return results
    finally:
        serve.shutdown()
        ray.shutdown()
        loop.run_until_complete(engine.close())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    results = compare(args.requests)
    (ray_times, ray_tokens), (direct_times, direct_tokens) = results["ray"], results["direct"]
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
