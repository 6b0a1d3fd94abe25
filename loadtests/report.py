"""The load test's report: per-request records, summarised overall and per compute budget.

It prints a markdown table (one row for all requests, one per budget), the fallback reasons grouped with
their numbers blanked, and the first error message of each kind. The JSON form adds the configuration,
more detail per summary and every request's record. No locust here, so all of it is unit-testable.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DECISIONS = ("trained", "reused", "skipped", "fallback")

# The options a report shows, by their locust `dest` names. A whitelist, so the API key (or locust's own
# --web-login secrets) never lands in a report.
CONFIG_OPTIONS = (
    "host",
    "endpoint",
    "model",
    "stream",
    "max_tokens",
    "temperature",
    "budget_mix",
    "ttt_mode",
    "ttt_deadline",
    "prompts_file",
    "timeout",
    "arrival_rate",
    "num_users",
    "spawn_rate",
    "run_time",
    "stop_timeout",
)


@dataclass
class Record:
    """One request. `status` is "ok", an HTTP status code, or connection / timeout / stream_error / ..."""

    budget: str
    prompt_index: int
    start_s: float  # since the test started
    status: str = "ok"
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

    def take_ttt(self, ttt: Mapping[str, Any]) -> None:
        self.decision = ttt.get("decision")
        self.trained = ttt.get("trained")
        self.steps = ttt.get("steps")
        self.training_seconds = ttt.get("training_seconds")
        self.reason = ttt.get("reason")
        self.adapter_id = ttt.get("adapter_id")


def run_config(options: Mapping[str, Any]) -> dict[str, Any]:
    return {name: options.get(name) for name in CONFIG_OPTIONS}


# --- statistics ---------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarise(records: list[Record], elapsed_s: float, streaming: bool) -> dict[str, Any]:
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
        "throughput_rps": _round(len(ok) / elapsed_s if elapsed_s > 0 else 0.0),
        "output_tokens": tokens,
        "output_tokens_per_s": _round(tokens / elapsed_s if elapsed_s > 0 else 0.0, 2),
        "latency_s": {
            "mean": _round(sum(latencies) / len(latencies)) if latencies else None,
            **{f"p{q}": _round(percentile(latencies, q)) for q in (50, 90, 99)},
        },
        "ttft_s": {f"p{q}": _round(percentile(ttfts, q)) for q in (50, 90, 99)} if streaming else None,
        "ttt": {
            # the four known decisions always, and any other a newer server sends
            "decisions": {d: decisions.get(d, 0) for d in DECISIONS} | dict(decisions),
            "missing": len(ok) - sum(decisions.values()),  # ok responses without a ttt object
            "mean_training_seconds": _round(
                sum(r.training_seconds or 0.0 for r in trained) / len(trained) if trained else None
            ),
            "mean_steps": _round(sum(r.steps or 0 for r in trained) / len(trained), 2) if trained else None,
        },
    }


def fallback_kind(reason: str) -> str:
    """'<plan>; <refusal>; answered with the base model' -> the refusal, with numbers shown as N."""
    parts = [p.strip() for p in reason.split(";")]
    core = parts[1] if len(parts) >= 3 else parts[0]
    return re.sub(r"\d+(\.\d+)?", "N", core)


def _budget_order(budget: str) -> tuple[int, int]:
    return (1, 0) if not budget.isdigit() else (0, int(budget))  # numbers first, then "default"


def build_report(
    records: list[Record],
    config: dict[str, Any],
    budgets: list[str],
    elapsed_s: float,
    issuing_s: float,
    dropped: int = 0,
) -> dict[str, Any]:
    """`budgets`: the mix's budgets, each of which gets a row even when no request drew it."""
    streaming = bool(config.get("stream"))
    by_budget: dict[str, list[Record]] = {b: [] for b in budgets}
    for record in records:
        by_budget.setdefault(record.budget, []).append(record)
    fallbacks = Counter(
        fallback_kind(r.reason) for r in records if r.status == "ok" and r.decision == "fallback" and r.reason
    )
    first_errors: dict[str, str] = {}
    for record in records:
        if record.status != "ok":
            first_errors.setdefault(record.status, record.error or "")
    return {
        "config": config,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed_s, 3),
        "issuing_s": round(issuing_s, 3),
        "dropped": dropped,
        "overall": summarise(records, elapsed_s, streaming),
        "by_budget": {
            b: summarise(by_budget[b], elapsed_s, streaming) for b in sorted(by_budget, key=_budget_order)
        },
        "fallback_reasons": dict(fallbacks.most_common()),
        "error_examples": first_errors,
        "records": [asdict(r) for r in records],
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


# --- the markdown report ------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_errors(errors: dict[str, int]) -> str:
    return " ".join(f"{kind}×{n}" for kind, n in errors.items()) or "0"


def _describe_run(report: dict[str, Any]) -> str:
    config = report["config"]
    users = f"{config['num_users']} user" + ("" if config["num_users"] == 1 else "s")
    load = (
        f"{users}, Poisson arrivals at {config['arrival_rate']:g} req/s"
        if config.get("arrival_rate")
        else f"{users}, closed loop"
    )
    parts = [
        load,
        f"{report['elapsed_s']:.1f}s elapsed ({report['issuing_s']:.1f}s issuing, then draining)",
        "streaming" if config["stream"] else "not streaming",
        f"max_tokens {config['max_tokens']}",
        f"budget mix {config['budget_mix']}",
    ]
    if config.get("ttt_mode"):
        parts.append(f"ttt mode {config['ttt_mode']}")
    if config.get("ttt_deadline"):
        parts.append(f"ttt deadline {config['ttt_deadline']:g}s")
    if report["dropped"]:
        parts.append(f"{report['dropped']} arrivals dropped (their user was still busy)")
    return "; ".join(parts)


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    streaming = bool(config["stream"])
    lines = [
        f"## ttserve load test: {config['model']} at {config['host']} ({config['endpoint']})",
        "",
        _describe_run(report),
        "",
    ]
    head = ["budget", "requests", "ok", "errors", "req/s", "out tok/s", "p50 s", "p90 s", "p99 s"]
    if streaming:
        head += ["TTFT p50 s", "TTFT p90 s"]
    head += [*DECISIONS, "mean train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, summary in [("all", report["overall"]), *report["by_budget"].items()]:
        lines.append("| " + " | ".join(_row(name, summary, streaming)) + " |")
    missing = report["overall"]["ttt"]["missing"]
    if missing:
        lines += ["", f"{missing} successful responses carried no `ttt` object (not a ttserve server?)."]
    if report["fallback_reasons"]:
        lines += ["", "Fallback reasons (numbers shown as N):", ""]
        lines += [f"- {n} × {reason}" for reason, n in report["fallback_reasons"].items()]
    if report["error_examples"]:
        lines += ["", "Errors (first message of each kind):", ""]
        lines += [f"- {kind}: {message[:300]}" for kind, message in report["error_examples"].items()]
    return "\n".join(lines)


def _row(name: str, summary: dict[str, Any], streaming: bool) -> list[str]:
    latency, ttt = summary["latency_s"], summary["ttt"]
    cells = [
        name,
        str(summary["requests"]),
        str(summary["ok"]),
        _fmt_errors(summary["errors"]),
        _fmt(summary["throughput_rps"], 2),
        _fmt(summary["output_tokens_per_s"], 1),
        _fmt(latency["p50"]),
        _fmt(latency["p90"]),
        _fmt(latency["p99"]),
    ]
    if streaming:
        cells += [_fmt(summary["ttft_s"]["p50"]), _fmt(summary["ttft_s"]["p90"])]
    cells += [str(ttt["decisions"][d]) for d in DECISIONS]
    cells.append(_fmt(ttt["mean_training_seconds"]))
    return cells
