"""Engine throughput with and without adapters, adapter load-to-first-token latency, and vLLM's LoRA cost.

    .venv/bin/python benchmarks/bench_engines.py --json results/bench_engines.json   # both engines, ~5 min
    .venv/bin/python benchmarks/bench_engines.py --engines transformers --concurrency 4
    .venv/bin/python benchmarks/bench_engines.py --max-tokens 16 --repeats 1 --adapters 3   # smoke run

All on the CPU with the embedded default model (or `--model DIR`), through ttserve's `Engine` API, greedy,
`ignore_eos=True` so that every stream produces exactly `--max-tokens` tokens. One adapter is trained
once (TestTimeTrainer, 8 steps on the start of 8 standard-library modules); every "adapted" stream uses a copy of it. vLLM
runs in float32 with the server's default EngineConfig (`--enforce-eager` to skip compilation).

1. Throughput. S streams start at once (S = 1, then S = `--concurrency`) on different code prompts; the
   aggregate rate is all streams' tokens over the wall time from submitting the first to the last token
   (prefill included: the prompts are ~10-20 tokens). Per-stream decode excludes the first token:
   (tokens - 1) / (end - first token). Rows: base model; one adapter for all streams; and, for S > 1, a
   different adapter per stream (what a server with test-time training sees). One untimed warm-up
   round, then the median over `--repeats` rounds.
2. Adapter add-to-first-token. R fresh copies of the trained adapter (copied before timing; the engine
   names each anew, so nothing is cached), one after another: `add_adapter`, then a `max_tokens=1`
   generation with it (prefill + the first token), then `remove_adapter`. One untimed warm-up first.
   For reference, the same one-token generation with the base model and with an adapter already in use.
3. vLLM's LoRA cost (`--engines` must include vllm). Base-model throughput on (i) a plain vLLM
   `AsyncLLM` with enable_lora=False, (ii) ttserve's VLLMEngine (enable_lora=True) with base requests sent
   without a LoRA request (what the LoRA gate does while no LoRA request is in flight), and (iii) the
   same engine with a LoRA request held in flight, so that base requests go through the all-zero adapter.
   (i) goes through the same `VLLMEngine.generate` code as (ii) and (iii). Only one vLLM engine exists at
   a time: VLLMEngine is started, measured and shut down before the plain one starts (~25 s each).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU backend needs it set
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from ttserve.config import EngineConfig, ModelConfig, TrainingConfig  # noqa: E402
from ttserve.engines import Adapter, Engine, SamplingParams  # noqa: E402
from ttserve.lm import load_model  # noqa: E402
from ttserve.training import TestTimeTrainer  # noqa: E402

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Config:\n    def __init__(self, path):\n        ",
    "def parse_config(path):\n    with open(path) as handle:\n        return",
    "# Utilities for reading and writing files\nimport json\n\n\ndef load(",
    "for i, line in enumerate(lines):\n    if not line.strip():\n        ",
    "try:\n    import threading\nexcept ImportError:\n    ",
    "def _check_arg(value, name):\n    if not isinstance(value, int):\n        raise",
    "@property\ndef name(self):\n    return self._name\n\n",
]


def stdlib_text(max_chars: int = 1500) -> list[str]:
    """Training text for the one benchmark adapter: the start of a few standard-library modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = ("textwrap", "shlex", "fnmatch", "glob", "bisect", "keyword", "colorsys", "stringprep")
    return [(root / f"{name}.py").read_text()[:max_chars] for name in modules]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "max": float(max(values)),
    }


# --- throughput ----------------------------------------------------------------------------------------
async def one_stream(engine: Engine, prompt_ids: list[int], params: SamplingParams, adapter):
    """(completion tokens, seconds to the first token, seconds to the end) of one stream."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async for chunk in engine.generate(prompt_ids, params, adapter):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - started
        if chunk.final:
            tokens = chunk.usage.completion_tokens
    return tokens, first, time.perf_counter() - started


async def throughput(
    engine: Engine,
    prompts: list[list[int]],
    adapters: list[Adapter | None],
    streams: int,
    max_tokens: int,
    repeats: int,
) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def round_() -> tuple[float, list]:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                one_stream(engine, prompts[i % len(prompts)], params, adapters[i % len(adapters)])
                for i in range(streams)
            )
        )
        return time.perf_counter() - started, results

    await round_()  # warm-up
    rates, decode_rates, ttfts = [], [], []
    for _ in range(repeats):
        wall, results = await round_()
        assert all(tokens == max_tokens for tokens, _, _ in results), results
        rates.append(sum(tokens for tokens, _, _ in results) / wall)
        decode_rates.append(statistics.median((tokens - 1) / (end - first) for tokens, first, end in results))
        ttfts.append(statistics.median(first for _, first, _ in results))
    return {
        "tok_s": statistics.median(rates),
        "tok_s_rounds": rates,
        "stream_decode_tok_s": statistics.median(decode_rates),
        "ttft_ms": 1e3 * statistics.median(ttfts),
    }


async def throughput_rows(engine, kind, prompts, adapters, args) -> list[dict]:
    """Table 1 for one engine: base, one adapter, and (S > 1) one adapter per stream, at S = 1 and S = N."""
    rows = []
    for streams in sorted({1, args.concurrency}):
        cases = [("base", [None]), ("adapted (one adapter)", adapters[:1])]
        if streams > 1:
            cases.append((f"adapted ({streams} adapters)", adapters[:streams]))
        base = None
        for label, used in cases:
            result = await throughput(engine, prompts, used, streams, args.max_tokens, args.repeats)
            base = base or result["tok_s"]
            rows.append(
                {
                    "engine": kind,
                    "model": label,
                    "streams": streams,
                    **result,
                    "vs_base": result["tok_s"] / base - 1,
                }
            )
            print(f"# {kind} {label} streams={streams}: {result['tok_s']:.1f} tok/s", flush=True)
    return rows


# --- adapter add-to-first-token ----------------------------------------------------------------------
async def first_token(engine: Engine, prompt_ids: list[int], adapter) -> float:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    async for chunk in engine.generate(prompt_ids, params, adapter):
        assert chunk.final and chunk.usage.completion_tokens == 1  # one token: its chunk is the last
    return time.perf_counter() - started


async def adapter_latency(engine: Engine, kind: str, prompt_ids, adapter_dir: Path, scratch: Path, args):
    copies = []
    for i in range(args.adapters + 1):
        copies.append(scratch / f"{kind}-copy-{i}")
        shutil.copytree(adapter_dir, copies[-1])
    loaded = engine.loaded_adapters()
    add, first, total, remove = [], [], [], []
    for i, directory in enumerate(copies):
        started = time.perf_counter()
        adapter = await engine.add_adapter(directory)
        added = time.perf_counter()
        await first_token(engine, prompt_ids, adapter)
        answered = time.perf_counter()
        await engine.remove_adapter(adapter)
        removed = time.perf_counter()
        if i == 0:
            continue  # warm-up
        add.append(1e3 * (added - started))
        first.append(1e3 * (answered - added))
        total.append(1e3 * (answered - started))
        remove.append(1e3 * (removed - answered))
    assert engine.loaded_adapters() == loaded, "adapters leaked"
    return {
        "add_ms": summary(add),
        "first_token_ms": summary(first),
        "total_ms": summary(total),
        "remove_ms": summary(remove),
        "raw": {"add": add, "first": first, "remove": remove},
    }


async def reference_first_token(engine: Engine, prompt_ids, adapter, repeats: int) -> dict:
    await first_token(engine, prompt_ids, adapter)
    return summary([1e3 * await first_token(engine, prompt_ids, adapter) for _ in range(max(repeats, 3))])


# --- engines ---------------------------------------------------------------------------------------------
def plain_vllm_engine(model: str, config: EngineConfig, dtype: str):
    """vLLM's AsyncLLM with enable_lora=False, behind VLLMEngine's own generate (same code path)."""
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs

    from ttserve.engines.vllm import VLLMEngine

    class PlainVLLM(VLLMEngine):
        def __init__(self):  # noqa: D107 - deliberately skips VLLMEngine.__init__ (it enables LoRA)
            Engine.__init__(self)
            self.model_name = model
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            args = AsyncEngineArgs(
                model=model,
                dtype=dtype,
                max_model_len=config.max_model_len,
                enable_lora=False,
                max_logprobs=config.max_logprobs,
                gpu_memory_utilization=config.gpu_memory_utilization,
                enforce_eager=config.enforce_eager,
                disable_log_stats=True,
            )
            self._start_llm(args, None)  # and list its shared memory, which close() frees
            self.max_model_len = self.llm.vllm_config.model_config.max_model_len
            self._adapters, self._requests = {}, {}
            self.routes_base_through_zero_adapter = False
            self._zero_request = None
            self._zero_dir = Path(tempfile.gettempdir()) / "no-zero-adapter-here"

    return PlainVLLM()


def quiet_exit(engine) -> None:
    """vLLM's AsyncLLM.__del__ shuts it down again at interpreter exit, when the globals it needs are gone
    (a TypeError traceback). The engine's close() did shut it down: make the second time a no-op."""
    engine.llm.shutdown = lambda timeout=None: None


async def run(args) -> dict:
    from ttserve.models import resolve_model

    model = resolve_model(args.model)  # the embedded default, an embedded model's name, or a directory
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    results: dict = {"throughput": [], "adapter_latency": [], "lora_cost": []}
    scratch = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    try:
        trainer = TestTimeTrainer(load_model(ModelConfig(name_or_path=model, device="cpu")), TrainingConfig())
        results["model"] = trainer.base_name
        adapter_dir = scratch / "trained"
        trained = trainer.train(stdlib_text(), 8, output_dir=adapter_dir)
        print(f"# trained the benchmark adapter: {trained.steps} steps, {trained.seconds:.1f} s", flush=True)
        copies_needed = max(1, args.concurrency)

        async def measure(engine: Engine, kind: str) -> None:
            prompts = [engine.encode(p) for p in PROMPTS]
            adapters = []
            for i in range(copies_needed):
                shutil.copytree(adapter_dir, scratch / f"{kind}-stream-{i}")
                adapters.append(await engine.add_adapter(scratch / f"{kind}-stream-{i}"))
            results["throughput"] += await throughput_rows(engine, kind, prompts, adapters, args)
            reference = {
                "base_first_token_ms": await reference_first_token(engine, prompts[0], None, args.repeats),
                "loaded_adapter_first_token_ms": await reference_first_token(
                    engine, prompts[0], adapters[0], args.repeats
                ),
            }
            latency = await adapter_latency(engine, kind, prompts[0], adapter_dir, scratch, args)
            results["adapter_latency"].append({"engine": kind, **latency, **reference})
            print(f"# {kind} adapter add-to-first-token p50 {latency['total_ms']['p50']:.1f} ms", flush=True)
            if kind == "vllm":
                # LoRA enabled, base requests without a LoRA request (vLLM's own "no LoRA" path).
                engine.routes_base_through_zero_adapter = False
                for streams in sorted({1, args.concurrency}):
                    result = await throughput(engine, prompts, [None], streams, args.max_tokens, args.repeats)
                    results["lora_cost"].append(
                        {
                            "engine": "vLLM, enable_lora, base without LoRA request (no LoRA traffic)",
                            "streams": streams,
                            **result,
                        }
                    )
                engine.routes_base_through_zero_adapter = True
                # As if a LoRA request were in flight: the gate then sends base requests through the
                # zero adapter (what base traffic costs while adapted traffic is being served).
                async with engine.gate.adapted():
                    for streams in sorted({1, args.concurrency}):
                        result = await throughput(
                            engine, prompts, [None], streams, args.max_tokens, args.repeats
                        )
                        results["lora_cost"].append(
                            {
                                "engine": "vLLM, enable_lora, base via zero adapter (LoRA traffic present)",
                                "streams": streams,
                                **result,
                            }
                        )
            for adapter in adapters:
                await engine.remove_adapter(adapter)

        if "transformers" in engines:
            from ttserve.engines.transformers import TransformersEngine

            engine = TransformersEngine(trainer.shared)
            try:
                await measure(engine, "transformers")
            finally:
                await engine.close()
        if "vllm" in engines:
            from ttserve.engines.vllm import VLLMEngine

            config = EngineConfig(enforce_eager=args.enforce_eager)
            started = time.perf_counter()
            engine = await VLLMEngine(
                model, config, TrainingConfig(), dtype="float32", scratch_dir=scratch
            ).start()
            results["vllm_start_s"] = time.perf_counter() - started
            print(f"# vLLM engine (LoRA) started in {results['vllm_start_s']:.1f} s", flush=True)
            try:
                await measure(engine, "vllm")
            finally:
                await engine.close()
                quiet_exit(engine)
            started = time.perf_counter()
            plain = plain_vllm_engine(model, config, "float32")
            results["plain_vllm_start_s"] = time.perf_counter() - started
            print(f"# plain vLLM engine started in {results['plain_vllm_start_s']:.1f} s", flush=True)
            try:
                prompts = [plain.encode(p) for p in PROMPTS]
                for streams in sorted({1, args.concurrency}):
                    result = await throughput(plain, prompts, [None], streams, args.max_tokens, args.repeats)
                    results["lora_cost"].append(
                        {"engine": "vLLM, plain AsyncLLM (enable_lora=False)", "streams": streams, **result}
                    )
            finally:
                await plain.close()
                quiet_exit(plain)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


# --- report ----------------------------------------------------------------------------------------------
def report(results: dict, args) -> None:
    print(
        f"\nmodel {results['model']}, {args.max_tokens} tokens per stream (ignore_eos, greedy), "
        f"median of {args.repeats} rounds after a warm-up"
    )
    print("\n| engine | model | streams | aggregate tok/s | per-stream decode tok/s | TTFT ms | vs base |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results["throughput"]:
        print(
            f"| {r['engine']} | {r['model']} | {r['streams']} | {r['tok_s']:.1f} | "
            f"{r['stream_decode_tok_s']:.1f} | {r['ttft_ms']:.1f} | {100 * r['vs_base']:+.1f}% |"
        )
    if results["adapter_latency"]:
        print(f"\nAdapter add-to-first-token, {args.adapters} fresh adapters each (ms, p50 / p90 / max)")
        print(
            "\n| engine | add_adapter | first token | add + first token | remove_adapter | "
            "first token, base | first token, loaded adapter |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")

        def three(s: dict) -> str:
            return f"{s['p50']:.1f} / {s['p90']:.1f} / {s['max']:.1f}"

        for r in results["adapter_latency"]:
            print(
                f"| {r['engine']} | {three(r['add_ms'])} | {three(r['first_token_ms'])} | "
                f"{three(r['total_ms'])} | {three(r['remove_ms'])} | {r['base_first_token_ms']['p50']:.1f} | "
                f"{r['loaded_adapter_first_token_ms']['p50']:.1f} |"
            )
    if results["lora_cost"]:
        print(
            f"\nvLLM base-model throughput, LoRA off vs on (aggregate tok/s; engine start "
            f"{results.get('vllm_start_s', 0):.0f} s with LoRA, {results.get('plain_vllm_start_s', 0):.0f} s plain)"
        )
        print("\n| engine | streams | aggregate tok/s | per-stream decode tok/s | TTFT ms | vs plain |")
        print("|---|---:|---:|---:|---:|---:|")
        plain = {r["streams"]: r["tok_s"] for r in results["lora_cost"] if "plain" in r["engine"]}
        order = ("plain", "without", "zero")
        rows = sorted(
            results["lora_cost"],
            key=lambda r: (r["streams"], next(i for i, k in enumerate(order) if k in r["engine"])),
        )
        for r in rows:
            versus = (
                f"{100 * (r['tok_s'] / plain[r['streams']] - 1):+.1f}%" if r["streams"] in plain else "n/a"
            )
            print(
                f"| {r['engine']} | {r['streams']} | {r['tok_s']:.1f} | {r['stream_decode_tok_s']:.1f} | "
                f"{r['ttft_ms']:.1f} | {versus} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model: a directory or an embedded model's name (default: the default)"
    )
    parser.add_argument("--engines", default="transformers,vllm", help="comma-separated: transformers,vllm")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (median)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--concurrency", type=int, default=4, help="streams at once in the concurrent rows")
    parser.add_argument("--adapters", type=int, default=20, help="fresh adapters for add-to-first-token")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM: no graph compilation")
    parser.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    args = parser.parse_args()
    if args.max_tokens < 2 or args.repeats < 1 or args.adapters < 1 or args.concurrency < 1:
        parser.error("--max-tokens must be >= 2; --repeats, --adapters and --concurrency >= 1")

    results = asyncio.run(run(args))
    report(results, args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
