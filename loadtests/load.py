"""Load generator for ttserve's OpenAI-compatible API, with a mix of per-request compute budgets.

Closed loop (default): `--concurrency` workers, each sending its next request when the previous one has
finished. Open loop (`--rate R`): Poisson arrivals at R requests/s, whatever the server's speed, with at
most `--max-in-flight` outstanding (arrivals beyond that are counted as `dropped`, not sent).

Each request draws its `compute_budget` from `--budget-mix` and a prompt at random, sends it through
`openai.AsyncOpenAI` (no client retries), and records status, latency, time to first token (streaming),
output tokens and the response's `ttt` object. The report, overall and per budget: requests, errors by
status code, throughput, latency and TTFT percentiles, ttt decisions and mean training seconds; as a
markdown table on stdout and, with `--json`, as JSON with every request's record.

    python loadtests/load.py --duration 60 --concurrency 8 --budget-mix 0:0.7,8:0.2,32:0.1

Exit status: 0 when at least one request succeeded, 1 when none did, 2 for bad arguments.
See loadtests/README.md for how to read the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai

DEFAULT_PROMPTS = [
    "What does functools.lru_cache do, and when should I use it?",
    "Write a Python function that parses command line options with getopt.",
    "How do I read a CSV file with the csv module and skip the header row?",
    "Explain the difference between a list and a tuple in Python.",
    "Show how to use contextlib.contextmanager to time a block of code.",
    "How does asyncio.gather differ from asyncio.wait?",
    "Write a regular expression that matches an ISO 8601 date.",
    "What is the purpose of __slots__ in a Python class?",
    "How do I walk a directory tree with pathlib and list every .py file?",
    "Explain what a dataclass is and show a small example.",
    "How can I serialize a datetime object to JSON?",
    "Write a generator that yields the Fibonacci numbers.",
    "What does the GIL mean for multithreaded Python programs?",
    "How do I make an HTTP GET request with urllib.request?",
    "Summarise what the itertools.groupby function does.",
    "Write a function that merges two sorted lists into one sorted list.",
    "How do I use the logging module to write messages to a file?",
    "Explain how heapq can be used as a priority queue.",
    "Give a short explanation of how hash tables handle collisions.",
    "Write a haiku about a program that learns while it answers.",
]

DECISIONS = ("trained", "reused", "skipped", "fallback")
DEFAULT_BUDGET = "default"  # in --budget-mix: send no compute_budget (the server's default applies)


# --- arguments ------------------------------------------------------------------------------------------
def parse_budget_mix(text: str) -> list[tuple[str, float]]:
    """'0:0.7,8:0.2,32:0.1' -> [('0', 0.7), ('8', 0.2), ('32', 0.1)]; weights need not sum to 1."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        budget, sep, weight = part.partition(":")
        budget = budget.strip()
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in {part!r}: expected BUDGET:WEIGHT") from None
        if budget != DEFAULT_BUDGET and not budget.isdigit():
            raise argparse.ArgumentTypeError(
                f"bad budget {budget!r} in {part!r}: a non-negative integer or {DEFAULT_BUDGET!r}"
            )
        if budget != DEFAULT_BUDGET:
            budget = str(int(budget))
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"bad weight in {part!r}: must be a finite number >= 0")
        mix[budget] = mix.get(budget, 0.0) + value
    if not mix or sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("the budget mix needs at least one budget with a positive weight")
    return list(mix.items())


def parse_ttt(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--ttt is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('--ttt must be a JSON object, e.g. \'{"mode": "always"}\'')
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return int(text)


def load_prompts(path: Path) -> list[str]:
    """One prompt per line: a JSON string (for prompts with newlines) or plain text. Blank lines skipped."""
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith('"'):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, str):
                if value.strip():
                    prompts.append(value)
                continue
        prompts.append(line)
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="load.py",
        description="Load generator for ttserve's OpenAI-compatible API (closed loop, or open loop with --rate).",
    )
    p.add_argument(
        "--url", default="http://127.0.0.1:8000", help="server base URL, /v1 optional (%(default)s)"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="bearer token (default: $OPENAI_API_KEY, else 'unused')",
    )
    p.add_argument(
        "--model", default="ttserve-tiny", help="model id, or 'auto': the first of /v1/models (%(default)s)"
    )
    p.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="/v1/chat/completions or /v1/completions (%(default)s)",
    )
    p.add_argument(
        "--duration", type=positive_float, default=60.0, help="seconds to issue requests (%(default)s)"
    )
    p.add_argument("--concurrency", type=positive_int, default=8, help="closed-loop workers (%(default)s)")
    p.add_argument(
        "--rate",
        type=positive_float,
        default=None,
        help="open loop instead: Poisson arrivals at this many requests/s (--concurrency unused)",
    )
    p.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=256,
        help="open loop: most outstanding requests; later arrivals are dropped and counted (%(default)s)",
    )
    p.add_argument(
        "--max-requests", type=positive_int, default=None, help="stop issuing after this many requests"
    )
    p.add_argument(
        "--budget-mix",
        type=parse_budget_mix,
        default="0:0.7,8:0.2,32:0.1",
        help="BUDGET:WEIGHT,... compute_budget values and their shares; BUDGET 'default' sends no "
        "compute_budget (%(default)s)",
    )
    p.add_argument(
        "--ttt",
        type=parse_ttt,
        default=None,
        help='JSON ttt object for every request, e.g. \'{"mode": "always", "deadline_s": 30}\'',
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream responses; needed for time to first token (default: --stream)",
    )
    p.add_argument("--max-tokens", type=positive_int, default=32, help="max_tokens per request (%(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (%(default)s)")
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="file, one prompt per line: a JSON string or plain text (default: a built-in list of 20)",
    )
    p.add_argument(
        "--timeout", type=positive_float, default=300.0, help="per-request timeout, s (%(default)s)"
    )
    p.add_argument(
        "--drain",
        type=non_negative_float,
        default=30.0,
        help="seconds to let in-flight requests finish after --duration; the rest are cancelled (%(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for budget, prompt and arrival draws (%(default)s)"
    )
    p.add_argument(
        "--progress",
        type=non_negative_float,
        default=10.0,
        help="seconds between progress lines on stderr, 0 for none (%(default)s)",
    )
    p.add_argument(
        "--json", dest="json_out", type=Path, default=None, help="also write the results as JSON here"
    )
    return p


# --- one request ----------------------------------------------------------------------------------------
@dataclass
class Record:
    budget: str
    prompt_index: int
    start_s: float  # since the run began
    status: str = "ok"  # "ok", an HTTP status code, or connection / timeout / stream_error / cancelled / ...
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    decision: str | None = None
    trained: bool | None = None
    steps: int | None = None
    training_seconds: float | None = None
    reason: str | None = None
    adapter_id: str | None = None
    error: str | None = None
    backoff_s: float = field(default=0.0, repr=False)


def _retry_after(error: openai.APIStatusError) -> float | None:
    value = error.response.headers.get("retry-after") if error.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _take_ttt(record: Record, obj: Any) -> None:
    ttt = (getattr(obj, "model_extra", None) or {}).get("ttt")
    if not isinstance(ttt, dict):
        return
    record.decision = ttt.get("decision")
    record.trained = ttt.get("trained")
    record.steps = ttt.get("steps")
    record.training_seconds = ttt.get("training_seconds")
    record.reason = ttt.get("reason")
    record.adapter_id = ttt.get("adapter_id")


def _take_usage(record: Record, usage: Any) -> None:
    if usage is not None:
        record.prompt_tokens = usage.prompt_tokens
        record.output_tokens = usage.completion_tokens


class Runner:
    def __init__(self, args: argparse.Namespace, prompts: list[str]):
        self.args = args
        self.prompts = prompts
        self.rng = random.Random(args.seed)
        self.budgets = [b for b, _ in args.budget_mix]
        self.weights = [w for _, w in args.budget_mix]
        base = args.url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.client = openai.AsyncOpenAI(
            base_url=base, api_key=args.api_key, max_retries=0, timeout=args.timeout
        )
        self.records: list[Record] = []
        self.issued = 0
        self.in_flight = 0
        self.dropped = 0
        self.t0 = 0.0
        self.elapsed = 0.0
        self.issuing = 0.0  # seconds from the start until no new requests were issued
        self.stop = asyncio.Event()
        self.abandon = asyncio.Event()
        self.interrupts = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _claim(self) -> bool:
        """Count one more request, or set `stop` when the run is over."""
        if self.stop.is_set():
            return False
        if self.args.max_requests is not None and self.issued >= self.args.max_requests:
            self.stop.set()
            return False
        self.issued += 1
        return True

    async def request(self) -> Record:
        budget = self.rng.choices(self.budgets, self.weights)[0]
        index = self.rng.randrange(len(self.prompts))
        record = Record(budget=budget, prompt_index=index, start_s=round(self.now(), 6))
        extra: dict[str, Any] = {}
        if budget != DEFAULT_BUDGET:
            extra["compute_budget"] = int(budget)
        if self.args.ttt is not None:
            extra["ttt"] = self.args.ttt
        self.in_flight += 1
        started = time.perf_counter()
        try:
            await self._send(record, self.prompts[index], extra, started)
        except asyncio.CancelledError:
            record.status, record.error = "cancelled", "still in flight when the drain time ran out"
            record.latency_s = round(time.perf_counter() - started, 6)
            self.records.append(record)
            raise
        except openai.APIStatusError as error:
            record.status = str(error.status_code)
            record.error = _error_message(error)
            if error.status_code == 429:
                record.backoff_s = min(_retry_after(error) or self.rng.uniform(0.25, 1.0), 5.0)
            elif error.status_code == 503:
                record.backoff_s = 1.0
        except openai.APITimeoutError as error:
            record.status, record.error = "timeout", str(error)
        except openai.APIConnectionError as error:
            cause = error.__cause__
            record.status = "connection"
            record.error = f"{error}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
            record.backoff_s = 1.0  # a refused connection fails at once: do not spin
        except openai.APIError as error:  # an error event in the middle of a stream
            record.status, record.error = "stream_error", _error_message(error)
        except Exception as error:  # noqa: BLE001 - count anything else, never crash the run
            record.status, record.error = type(error).__name__, str(error)
        finally:
            self.in_flight -= 1
        record.latency_s = round(time.perf_counter() - started, 6)
        self.records.append(record)
        return record

    async def _send(self, record: Record, prompt: str, extra: dict[str, Any], started: float) -> None:
        args = self.args
        chat = args.endpoint == "chat"
        common: dict[str, Any] = {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "extra_body": extra or None,
        }
        api = self.client.chat.completions if chat else self.client.completions
        inputs = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        if not args.stream:
            response = await api.create(**inputs, **common)
            _take_usage(record, response.usage)
            _take_ttt(record, response)
            return
        stream = await api.create(**inputs, **common, stream=True, stream_options={"include_usage": True})
        pieces = 0
        try:
            async for chunk in stream:
                for choice in chunk.choices:
                    text = choice.delta.content if chat else choice.text
                    if text:
                        pieces += 1
                        if record.ttft_s is None:
                            record.ttft_s = round(time.perf_counter() - started, 6)
                if chunk.usage is not None:
                    _take_usage(record, chunk.usage)
                _take_ttt(record, chunk)
        finally:
            await stream.close()
        if record.output_tokens is None:  # a server that ignores include_usage: count text chunks
            record.output_tokens = pieces

    # --- the two loops ----------------------------------------------------------------------------------
    async def _pause(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking early on stop; always yields to the event loop."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def worker(self) -> None:
        while self._claim():
            record = await self.request()
            await self._pause(record.backoff_s)

    async def open_loop(self, tasks: set[asyncio.Task]) -> None:
        rate = self.args.rate
        next_at = 0.0
        while not self.stop.is_set():
            next_at += self.rng.expovariate(rate)
            await self._pause(next_at - self.now())
            if not self._claim():
                break
            if self.in_flight >= self.args.max_in_flight:
                self.issued -= 1
                self.dropped += 1
                continue
            task = asyncio.create_task(self.request())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def progress(self) -> None:
        every = self.args.progress
        while every > 0:
            await asyncio.sleep(every)
            ok = sum(r.status == "ok" for r in self.records)
            print(
                f"[{self.now():7.1f}s] done {len(self.records)} (ok {ok}, errors {len(self.records) - ok}),"
                f" in flight {self.in_flight}" + (f", dropped {self.dropped}" if self.dropped else ""),
                file=sys.stderr,
                flush=True,
            )

    def _on_interrupt(self) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            print("\ninterrupted: no new requests; Ctrl-C again to cancel those in flight", file=sys.stderr)
            self.stop.set()
        else:
            self.abandon.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
        if self.args.model == "auto":
            self.args.model = await self._first_model()
        self.t0 = time.perf_counter()
        timer = loop.call_later(self.args.duration, self.stop.set)
        reporter = asyncio.create_task(self.progress())
        tasks: set[asyncio.Task] = set()
        if self.args.rate is None:
            workers = [asyncio.create_task(self.worker()) for _ in range(self.args.concurrency)]
            await self._wait_for_stop(workers)
            pending = set(workers)
        else:
            await self.open_loop(tasks)
            pending = set(tasks)
        self.issuing = self.now()
        await self._drain(pending)
        self.elapsed = self.now()
        timer.cancel()
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        await self.client.close()

    async def _first_model(self) -> str:
        try:
            models = await self.client.models.list()
        except openai.APIError as error:
            raise SystemExit(
                f"--model auto: could not list models at {self.client.base_url}: {error}"
            ) from None
        if not models.data:
            raise SystemExit(f"--model auto: {self.client.base_url}models lists no model")
        return models.data[0].id

    async def _wait_for_stop(self, workers: list[asyncio.Task]) -> None:
        stopper = asyncio.create_task(self.stop.wait())
        await asyncio.wait([*workers, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not all(w.done() for w in workers):
            await stopper
        stopper.cancel()

    async def _drain(self, pending: set[asyncio.Task]) -> None:
        """Let in-flight requests finish for up to --drain seconds (or until a second Ctrl-C)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.args.drain
        abandoned = asyncio.create_task(self.abandon.wait())
        pending = {t for t in pending if not t.done()}
        while pending and not self.abandon.is_set():
            left = end - loop.time()
            if left <= 0:
                break
            await asyncio.wait([*pending, abandoned], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            pending = {t for t in pending if not t.done()}
        abandoned.cancel()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _error_message(error: openai.APIError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return str(error.message)


# --- statistics and the report ------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarise(records: list[Record], elapsed: float, streaming: bool) -> dict[str, Any]:
    ok = [r for r in records if r.status == "ok"]
    errors = Counter(r.status for r in records if r.status != "ok")
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.output_tokens or 0 for r in ok)
    decisions = Counter(r.decision for r in ok if r.decision)
    trained = [r for r in ok if r.decision == "trained"]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "throughput_rps": _round(len(ok) / elapsed if elapsed > 0 else 0.0),
        "output_tokens": tokens,
        "output_tokens_per_s": _round(tokens / elapsed if elapsed > 0 else 0.0, 2),
        "latency_s": {
            "mean": _round(sum(latencies) / len(latencies)) if latencies else None,
            **{f"p{q}": _round(percentile(latencies, q)) for q in (50, 90, 99)},
        },
        "ttft_s": {f"p{q}": _round(percentile(ttfts, q)) for q in (50, 90, 99)} if streaming else None,
        "ttt": {
            "decisions": {d: decisions.get(d, 0) for d in DECISIONS}
            | {d: n for d, n in decisions.items() if d not in DECISIONS},
            "missing": len(ok) - sum(decisions.values()),  # ok responses without a ttt object
            "mean_training_seconds": _round(
                sum(r.training_seconds or 0.0 for r in trained) / len(trained) if trained else None
            ),
            "mean_steps": _round(sum(r.steps or 0 for r in trained) / len(trained), 2) if trained else None,
        },
    }


def _budget_key(budget: str) -> tuple[int, int]:
    return (1, 0) if budget == DEFAULT_BUDGET else (0, int(budget))


def _reason_kind(reason: str) -> str:
    # "<plan reason>; <refusal>; answered with the base model": group by the refusal, numbers blanked.
    parts = [p.strip() for p in reason.split(";")]
    core = parts[1] if len(parts) >= 3 else parts[0]
    return re.sub(r"\d+(\.\d+)?", "N", core)


def build_report(runner: Runner) -> dict[str, Any]:
    args, records, elapsed = runner.args, runner.records, runner.elapsed
    by_budget: dict[str, list[Record]] = {b: [] for b, _ in args.budget_mix}  # every budget gets a row
    for record in records:
        by_budget.setdefault(record.budget, []).append(record)
    fallback = Counter(
        _reason_kind(r.reason) for r in records if r.status == "ok" and r.decision == "fallback" and r.reason
    )
    first_errors: dict[str, str] = {}
    for record in records:
        if record.status != "ok" and record.status not in first_errors:
            first_errors[record.status] = record.error or ""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["budget_mix"] = {b: w for b, w in args.budget_mix}
    config["prompts"] = str(args.prompts) if args.prompts else f"built-in ({len(runner.prompts)})"
    config.pop("api_key", None)
    return {
        "config": config,
        "mode": "closed" if args.rate is None else "open",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 3),
        "issuing_s": round(runner.issuing, 3),
        "issued": runner.issued,
        "dropped": runner.dropped,
        "overall": summarise(records, elapsed, args.stream),
        "by_budget": {
            b: summarise(by_budget[b], elapsed, args.stream) for b in sorted(by_budget, key=_budget_key)
        },
        "fallback_reasons": dict(fallback.most_common()),
        "error_examples": first_errors,
        "records": [{k: v for k, v in asdict(r).items() if k != "backoff_s"} for r in records],
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_errors(errors: dict[str, int]) -> str:
    return " ".join(f"{code}×{n}" for code, n in errors.items()) or "0"


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    streaming = config["stream"]
    load = (
        f"closed loop, {config['concurrency']} workers"
        if report["mode"] == "closed"
        else f"open loop, Poisson {config['rate']} req/s (max {config['max_in_flight']} in flight)"
    )
    lines = [
        f"## ttserve load test: {config['model']} at {config['url']} ({config['endpoint']})",
        "",
        f"{load}; {report['elapsed_s']:.1f}s elapsed ({report['issuing_s']:.1f}s issuing, then draining); "
        f"{'streaming' if streaming else 'not streaming'}; max_tokens {config['max_tokens']}; "
        f"budget mix {', '.join(f'{b}:{w:g}' for b, w in config['budget_mix'].items())}"
        + (f"; ttt {json.dumps(config['ttt'])}" if config["ttt"] else "")
        + (f"; {report['dropped']} arrivals dropped (max in flight)" if report["dropped"] else ""),
        "",
    ]
    head = ["budget", "requests", "ok", "errors", "req/s", "out tok/s", "p50 s", "p90 s", "p99 s"]
    if streaming:
        head += ["TTFT p50 s", "TTFT p90 s"]
    head += [*DECISIONS, "mean train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("all", report["overall"])] + list(report["by_budget"].items())
    for name, s in rows:
        ttt = s["ttt"]
        cells = [
            name,
            str(s["requests"]),
            str(s["ok"]),
            _fmt_errors(s["errors"]),
            _fmt(s["throughput_rps"], 2),
            _fmt(s["output_tokens_per_s"], 1),
            _fmt(s["latency_s"]["p50"]),
            _fmt(s["latency_s"]["p90"]),
            _fmt(s["latency_s"]["p99"]),
        ]
        if streaming:
            cells += [_fmt(s["ttft_s"]["p50"]), _fmt(s["ttft_s"]["p90"])]
        cells += [str(ttt["decisions"][d]) for d in DECISIONS]
        cells.append(_fmt(ttt["mean_training_seconds"]))
        lines.append("| " + " | ".join(cells) + " |")
    missing = report["overall"]["ttt"]["missing"]
    if missing:
        lines += ["", f"{missing} successful responses carried no `ttt` object (not a ttserve server?)."]
    if report["fallback_reasons"]:
        lines += ["", "Fallback reasons (numbers shown as N):", ""]
        lines += [f"- {n} × {reason}" for reason, n in report["fallback_reasons"].items()]
    if report["error_examples"]:
        lines += ["", "Errors (first message of each kind):", ""]
        lines += [f"- {code}: {message[:300]}" for code, message in report["error_examples"].items()]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get("OPENAI_API_KEY") or "unused"
    if args.prompts is not None:
        try:
            prompts = load_prompts(args.prompts)
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"--prompts {args.prompts}: {error}")
        if not prompts:
            parser.error(f"--prompts {args.prompts}: no prompts in the file")
    else:
        prompts = list(DEFAULT_PROMPTS)
    runner = Runner(args, prompts)
    try:
        asyncio.run(runner.run())
    except KeyboardInterrupt:  # only if a Ctrl-C arrives before the handler is installed or after removal
        print("interrupted", file=sys.stderr)
    report = build_report(runner)
    print(markdown(report))
    if args.json_out is not None:
        try:
            args.json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            print(f"could not write {args.json_out}: {error}", file=sys.stderr)
            return 1
        print(f"\nwrote {args.json_out}", file=sys.stderr)
    return 0 if report["overall"]["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
