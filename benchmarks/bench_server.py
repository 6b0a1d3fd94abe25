"""The whole server in one process against its engine: HTTP overhead at budget 0, and latency with training.

    .venv/bin/python benchmarks/bench_server.py --json results/bench_server.json       # ~2 min
    .venv/bin/python benchmarks/bench_server.py --repeats 2 --overhead-repeats 5        # smoke run
    .venv/bin/python benchmarks/bench_server.py --engine vllm                           # vLLM engine
    .venv/bin/python benchmarks/bench_server.py --chat --budgets 0,4,8,16 --overhead-repeats 0  # chat latency

The server is ttserve's in-process stack (`ttserve.serving.local.start_local`: FastAPI app, generator replica,
SIFT retriever over the default standard-library datastore, the embedded default model on the CPU)
under uvicorn on a local port, with the app and the engine on ONE event loop in a background thread. The
client is the official `openai` package (one client, keep-alive), non-streaming `/v1/completions`,
`max_tokens=32`, `temperature=0`. Prompts are the first lines of standard-library functions (two per
module, modules in name order), so every request can have a prompt of its own.

1. Overhead at budget 0 (`extra_body={"compute_budget": 0}`: no retrieval, no training). Server and
   engine-direct requests alternate, in alternating order, with the server otherwise idle. Engine-direct
   is `collect(engine.generate(prompt_ids, SamplingParams(max_tokens=32, temperature=0)))` on the
   server's own engine and event loop, with the ids the server's tokenizer gives, submitted from the main
   thread as the client's requests are. Both must produce the same number of tokens (asserted).
   Goal: the server adds at most 10% (median).
2. Latency with test-time training: `extra_body={"compute_budget": B, "ttt": {"mode": "always"}}` for
   B = 8 and 32, each request with a prompt not used before, so each trains a fresh adapter (retrieval,
   training, adapter load, generation). Right after each budget-32 request, the same prompt again: its
   adapter comes from the cache ("adapter reused"). The ttt object's `decision` is counted per row, and
   its `training_seconds`, `steps` and `retrieval_ms` are averaged. One untimed warm-up request per
   budget first (it loads the embedder and builds the optimizer's state the first time).

`--chat` sends `/v1/chat/completions` instead, with questions a user would ask about the standard library
("In Python, what does json.dumps() do, and how do I call it?"), one per request; budget 0 is then a row of
its own (no retrieval, no training), and the overhead comparison is skipped (`--overhead-repeats 0`).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU backend needs it set
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import argparse  # noqa: E402
import ast  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sysconfig  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from ttserve.config import Settings  # noqa: E402
from ttserve.engines import SamplingParams, collect  # noqa: E402

MAX_TOKENS = 32
MODEL_ID = "bench"


def stdlib_modules():
    """(path, source, syntax tree) of each public top-level standard-library module, in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            yield path, source, ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue


def code_prompts(count: int, per_module: int = 2, lines: int = 3) -> list[str]:
    """`count` distinct snippets: the first `lines` lines of public standard-library functions."""
    prompts: list[str] = []
    for _, source, tree in stdlib_modules():
        source_lines = source.splitlines()
        taken = 0
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            snippet = textwrap.dedent("\n".join(source_lines[node.lineno - 1 : node.lineno - 1 + lines]))
            if 40 <= len(snippet) <= 300 and snippet not in prompts:
                prompts.append(snippet + "\n")
                taken += 1
                if len(prompts) == count:
                    return prompts
                if taken == per_module:
                    break
    raise ValueError(f"only {len(prompts)} prompts found, {count} needed")


def chat_prompts(count: int) -> list[str]:
    """`count` distinct questions about public standard-library functions, at most two per module."""
    questions: list[str] = []
    for path, _, tree in stdlib_modules():
        names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
        for name in names[:2]:
            questions.append(f"In Python, what does {path.stem}.{name}() do, and how do I call it?")
            if len(questions) == count:
                return questions
    raise ValueError(f"only {len(questions)} questions found, {count} needed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopServer:
    """One event loop in a background thread, holding the generator replica (and its engine) and uvicorn."""

    def __init__(self, settings: Settings):
        import uvicorn

        from ttserve.serving.local import start_local

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-server-loop", daemon=True)
        self.thread.start()
        app, self.replica = self.run(start_local(settings), timeout=600)
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        )
        self.serving = asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or self.serving.done():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def run(self, coroutine, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.server.should_exit = True
        self.serving.result(30)
        engine = self.replica.pipeline.engine
        self.run(self.replica.close())
        if hasattr(engine, "llm"):
            # vLLM's AsyncLLM.__del__ shuts it down again at interpreter exit, when the globals it needs are
            # gone (a TypeError traceback). close() did shut it down: make the second time a no-op.
            engine.llm.shutdown = lambda timeout=None: None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def stats_ms(seconds: list[float]) -> dict[str, float]:
    return {
        "median_ms": 1e3 * statistics.median(seconds),
        "p90_ms": 1e3 * float(np.percentile(seconds, 90)),
        "n": len(seconds),
    }


CHAT = False  # --chat: questions through /v1/chat/completions


def complete(client, prompt: str, extra_body: dict):
    started = time.perf_counter()
    if CHAT:
        response = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body=extra_body,
        )
    else:
        response = client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra_body
        )
    return time.perf_counter() - started, response


def overhead(server: LoopServer, client, prompts: list[str], repeats: int) -> dict:
    engine = server.replica.pipeline.engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)

    def direct(prompt: str):
        ids = engine.encode(prompt)
        started = time.perf_counter()
        whole = server.run(collect(engine.generate(ids, params)))
        return time.perf_counter() - started, whole.usage.completion_tokens

    def via_server(prompt: str):
        seconds, response = complete(client, prompt, {"compute_budget": 0})
        ttt = response.model_extra["ttt"]
        assert ttt["decision"] == "skipped" and ttt["steps"] == 0, ttt
        return seconds, response.usage.completion_tokens

    for prompt in prompts:  # warm-up, and the token counts must agree
        assert direct(prompt)[1] == via_server(prompt)[1], "server and engine produced different lengths"
    times: dict[str, list[float]] = {"server": [], "direct": []}
    tokens: list[int] = []
    for i in range(repeats):
        prompt = prompts[i % len(prompts)]
        for side in ("server", "direct") if i % 2 == 0 else ("direct", "server"):
            seconds, produced = via_server(prompt) if side == "server" else direct(prompt)
            times[side].append(seconds)
            tokens.append(produced)
    server_stats, direct_stats = stats_ms(times["server"]), stats_ms(times["direct"])
    return {
        "server": server_stats,
        "direct": direct_stats,
        "overhead_pct": 100 * (server_stats["median_ms"] / direct_stats["median_ms"] - 1),
        "overhead_p90_pct": 100 * (server_stats["p90_ms"] / direct_stats["p90_ms"] - 1),
        "mean_completion_tokens": statistics.mean(tokens),
        "raw_s": times,
    }


def training_rows(client, prompts: list[str], budgets: list[int], repeats: int) -> list[dict]:
    fresh = iter(prompts)
    for budget in budgets:  # warm-up
        complete(client, next(fresh), {"compute_budget": budget, "ttt": {"mode": "always"}})
    runs: dict[str, list[tuple[float, object]]] = collections.defaultdict(list)
    for _ in range(repeats):
        for budget in budgets:
            prompt = next(fresh)
            body = {"compute_budget": budget, "ttt": {"mode": "always"}}
            seconds, response = complete(client, prompt, body)
            runs[f"budget {budget}, new prompt"].append((seconds, response))
            print(f"# budget {budget}, new prompt: {seconds:.2f} s", flush=True)
            if budget == max(budgets) and budget > 0:
                seconds, response = complete(client, prompt, body)
                runs[f"budget {budget}, same prompt again (adapter reused)"].append((seconds, response))
                print(f"# budget {budget}, same prompt again: {seconds:.2f} s", flush=True)
    rows = []
    for label, results in runs.items():
        ttts = [response.model_extra["ttt"] for _, response in results]
        rows.append(
            {
                "row": label,
                **stats_ms([seconds for seconds, _ in results]),
                "decisions": dict(collections.Counter(t["decision"] for t in ttts)),
                "mean_steps": statistics.mean(t["steps"] for t in ttts),
                "mean_training_s": statistics.mean(t["training_seconds"] or 0.0 for t in ttts),
                "mean_retrieval_ms": statistics.mean(t["retrieval_ms"] or 0.0 for t in ttts),
                "mean_training_tokens": statistics.mean(t["training_tokens"] for t in ttts),
                # Answers differ in length (an adapted model may run to max_tokens), so say how long.
                "mean_completion_tokens": statistics.mean(r.usage.completion_tokens for _, r in results),
            }
        )
    return rows


def report(results: dict, args) -> None:
    endpoint = "/v1/chat/completions" if CHAT else "/v1/completions"
    print(f"\n{results['engine']} engine, model {results['model']}, non-streaming {endpoint}, greedy")
    o = results.get("overhead")
    if o is None:
        return training_table(results, args)
    print(f"max_tokens {MAX_TOKENS}, {o['mean_completion_tokens']:.1f} tokens per answer on average")
    print(f"\nBudget 0, {args.overhead_repeats} requests each side, alternating")
    print("\n| path | median ms | p90 ms |")
    print("|---|---:|---:|")
    print(
        f"| engine direct (`collect(engine.generate(...))`) | {o['direct']['median_ms']:.1f} | {o['direct']['p90_ms']:.1f} |"
    )
    print(
        f"| HTTP: openai client -> uvicorn -> FastAPI -> pipeline -> engine | {o['server']['median_ms']:.1f} | {o['server']['p90_ms']:.1f} |"
    )
    print(
        f"| server overhead (goal: at most +10%) | {o['overhead_pct']:+.1f}% | {o['overhead_p90_pct']:+.1f}% |"
    )
    training_table(results, args)


def training_table(results: dict, args) -> None:
    print(f"\nWith test-time training (ttt mode always), {args.repeats} requests per row")
    print(
        "\n| request | median ms | p90 ms | decisions | mean steps | mean training_seconds | mean retrieval ms "
        "| mean completion tokens |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in results["training"]:
        decisions = ", ".join(f"{k} {v}" for k, v in sorted(r["decisions"].items()))
        print(
            f"| {r['row']} | {r['median_ms']:.0f} | {r['p90_ms']:.0f} | {decisions} | {r['mean_steps']:.1f} | "
            f"{r['mean_training_s']:.2f} | {r['mean_retrieval_ms']:.1f} | {r['mean_completion_tokens']:.1f} |"
        )


def main() -> None:
    global CHAT, MAX_TOKENS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model directory (default: the embedded default)")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--repeats", type=int, default=10, help="requests per row with training")
    parser.add_argument("--overhead-repeats", type=int, default=50, help="budget-0 requests per side")
    parser.add_argument("--budgets", default="8,32", help="comma-separated compute budgets to train with")
    parser.add_argument("--chat", action="store_true", help="questions through /v1/chat/completions")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    args = parser.parse_args()
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    if args.repeats < 1 or args.overhead_repeats < 0 or min(budgets) < 0:
        parser.error("--repeats must be >= 1; --overhead-repeats and budgets >= 0")
    CHAT, MAX_TOKENS = args.chat, args.max_tokens

    import openai

    from ttserve.datastore.local_corpus import ensure_datastore

    # Sections as dicts, not config objects: pydantic-settings merges a dict with the environment, while an
    # object replaces the whole section, and TTSERVE_MODEL__DTYPE=... (say) would be silently ignored.
    settings = Settings(
        model={"name_or_path": args.model, "device": "cpu"},
        engine={"kind": args.engine},
        server={
            "served_model_name": MODEL_ID,
            "default_compute_budget": 0,
            "max_compute_budget": max(budgets),
        },
    )
    print(
        f"# model dtype {settings.model.dtype}, engine {settings.engine}, training {settings.training}",
        flush=True,
    )
    ensure_datastore(settings)
    prompts = (chat_prompts if args.chat else code_prompts)(4 + len(budgets) * (args.repeats + 2))
    server = LoopServer(settings)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)
        results = {"engine": args.engine, "model": server.replica.pipeline.trainer.base_name}
        if args.overhead_repeats:
            if args.chat:
                parser.error("the overhead comparison is for /v1/completions: add --overhead-repeats 0")
            results["overhead"] = overhead(server, client, prompts[:4], args.overhead_repeats)
            print(f"# overhead {results['overhead']['overhead_pct']:+.1f}%", flush=True)
        results["training"] = training_rows(client, prompts[4:], budgets, args.repeats)
        client.close()
    finally:
        server.close()
    report(results, args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
