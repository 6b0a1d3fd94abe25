"""Base-model streams while another request fine-tunes: time to first token and inter-token latency of
budget-0 requests alone and during test-time training, on one generator replica (the embedded default).

    .venv/bin/python benchmarks/bench_isolation.py --rounds 4 --out results/bench_isolation.json

Builds the replica as `ttserve serve` does (GeneratorReplica: the CPU split, the default engine) with
in-process retrieval, then per round: a budget-0 stream of `--tokens` greedy tokens alone; then a
training request (`--budget` steps, `mode: always`, a prompt of its own so that it trains) and, once its
first training step has begun, the same budget-0 stream. Reported per condition: TTFT p50, inter-token
p50 and p90, the longest gap, and the isolation ratio (inter-token p50 under training / idle). The goal
(issue 12): within 2x of idle.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

BASE_PROMPT = "Explain what a Python generator is, in two sentences."
TRAINING_PROMPTS = [
    "How do I read a file line by line with pathlib?",
    "What does itertools.accumulate do?",
    "How do I parse command line options with argparse?",
    "How do I format a datetime as ISO 8601?",
    "What is the difference between a list and a tuple?",
    "How do I sort a dictionary by value?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


async def stream_times(replica, tokens: int) -> tuple[float, list[float]]:
    """Seconds to the first text chunk, and the gaps between later text chunks."""
    from ttserve.contract import GenerateRequest, SamplingParams, Started

    request = GenerateRequest(
        messages=[{"role": "user", "content": BASE_PROMPT}],
        max_tokens=tokens,
        sampling=SamplingParams(temperature=0, ignore_eos=True),
        compute_budget=0,
    )
    started = time.perf_counter()
    stamps = []
    async for event in replica.stream(request):
        if not isinstance(event, Started) and event.text:
            stamps.append(time.perf_counter())
    return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


async def run(args) -> dict:
    from ttserve.config import load_settings
    from ttserve.contract import GenerateRequest, SamplingParams
    from ttserve.retrieval import Retriever
    from ttserve.serving.replica import GeneratorReplica

    settings = load_settings(args.config)
    retriever = Retriever.from_settings(settings)
    replica = await GeneratorReplica(settings, retriever.retrieve_async).start()
    training = replica.pipeline.training
    results: dict[str, dict[str, list[float]]] = {
        "idle": {"ttft": [], "gaps": []},
        "training": {"ttft": [], "gaps": []},
    }
    step_seconds: list[float] = []  # per training step, with a base stream running beside it
    await stream_times(replica, 8)  # warm-up
    try:
        for round_ in range(args.rounds):
            ttft, gaps = await stream_times(replica, args.tokens)
            results["idle"]["ttft"].append(ttft)
            results["idle"]["gaps"] += gaps
            prompt = TRAINING_PROMPTS[round_ % len(TRAINING_PROMPTS)] + f" (round {round_})"
            trained = GenerateRequest(
                messages=[{"role": "user", "content": prompt}],
                max_tokens=1,
                sampling=SamplingParams(temperature=0),
                compute_budget=args.budget,
                mode="always",
            )
            background = asyncio.create_task(replica.complete(trained))
            while training.queued == 0 and not background.done():  # planned, admitted, training
                await asyncio.sleep(0.01)
            await asyncio.sleep(args.delay)
            ttft, gaps = await stream_times(replica, args.tokens)
            still_training = not background.done()
            results["training"]["ttft"].append(ttft)
            results["training"]["gaps"] += gaps
            started, _ = await background
            if started.ttt.steps:
                step_seconds.append(started.ttt.training_seconds / started.ttt.steps)
            print(
                f"round {round_}: trained {started.ttt.steps} steps ({started.ttt.decision}: {started.ttt.reason}); "
                f"stream done {'during' if still_training else 'after'} training",
                flush=True,
            )
    finally:
        await replica.close()
    summary = {}
    for condition, values in results.items():
        gaps = values["gaps"]
        summary[condition] = {
            "ttft_p50_ms": round(statistics.median(values["ttft"]) * 1e3, 1),
            "inter_token_p50_ms": round(statistics.median(gaps) * 1e3, 1),
            "inter_token_p90_ms": round(percentile(gaps, 0.9) * 1e3, 1),
            "longest_gap_ms": round(max(gaps) * 1e3, 1),
        }
    summary["isolation_ratio"] = round(
        summary["training"]["inter_token_p50_ms"] / summary["idle"]["inter_token_p50_ms"], 2
    )
    summary["ttft_ratio"] = round(summary["training"]["ttft_p50_ms"] / summary["idle"]["ttft_p50_ms"], 2)
    summary["training_step_s_p50"] = round(statistics.median(step_seconds), 3) if step_seconds else None
    summary["training_cpu_niceness"] = settings.training.cpu_niceness
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="ttserve settings (default: the embedded default)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds into training before the stream")
    parser.add_argument("--limit", action="store_true", help="smoke run: 1 round of 10 tokens, budget 2")
    parser.add_argument("--out", type=Path, default=Path("results/bench_isolation.json"))
    args = parser.parse_args()
    if args.limit:
        args.rounds, args.tokens, args.budget = 1, 10, 2
    summary = asyncio.run(run(args))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, **summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
