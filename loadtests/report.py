"""The load test's report: per-request records, summarised overall and per compute budget.

It prints a markdown table (one row for all requests, one per budget), the fallback reasons grouped with
their numbers blanked, the first error message of each kind, and the wrong-adapter check. The JSON form adds
the configuration, more detail per summary and every request's record. No locust here, so all of it is
unit-testable.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DECISIONS = ("trained", "reused", "skipped", "fallback")
# A streamed request the client abandoned after its first piece of content, on purpose (--cancel-share):
# counted on its own, not as an error of the server.
CLIENT_CANCELLED = "client_cancelled"

# The options a report shows, by their locust `dest` names. A whitelist, so the API key (or locust's own
# --web-login secrets) never lands in a report.
CONFIG_OPTIONS = (
    "host",
    "endpoint",
    "model",
    "stream_share",
    "cancel_share",
    "max_tokens",
    "temperature",
    "budget_mix",
    "ttt_mode",
    "ttt_deadline",
    "prompts",
    "timeout",
    "arrival_rate",
    "num_users",
    "spawn_rate",
    "run_time",
    "max_requests",
    "stop_timeout",
)


@dataclass
class Record:
    """One request. `status` is "ok", an HTTP status code, client_cancelled, or connection / timeout / ..."""

    budget: str
    prompt_index: int
    start_s: float  # since the test started
    stream: bool | None = None
    max_tokens: int | None = None
    temperature: float | None = None
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
    answer_hash: str | None = None  # of the answer's text, for complete "ok" answers only
    error: str | None = None

    def take_ttt(self, ttt: Mapping[str, Any]) -> None:
        self.decision = ttt.get("decision")
        self.trained = ttt.get("trained")
        self.steps = ttt.get("steps")
        self.training_seconds = ttt.get("training_seconds")
        self.reason = ttt.get("reason")
        self.adapter_id = ttt.get("adapter_id")


def answer_hash(text: str) -> str:
    """Short, but long enough that two different answers in one run never share it by chance."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_config(options: Mapping[str, Any]) -> dict[str, Any]:
    return {name: options.get(name) for name in CONFIG_OPTIONS}


def any_streamed(config: Mapping[str, Any]) -> bool:
    return bool(config.get("stream_share"))


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
    errors = Counter(r.status for r in records if r.status not in ("ok", CLIENT_CANCELLED))
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.output_tokens or 0 for r in ok)
    decisions = Counter(r.decision for r in ok if r.decision)
    trained = [r for r in ok if r.decision == "trained"]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "client_cancelled": sum(r.status == CLIENT_CANCELLED for r in records),
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


def answer_check(records: list[Record]) -> dict[str, Any]:
    """The wrong-adapter check. Greedy decoding of one prompt with one adapter (or the base model) gives one
    answer, every time: the server decodes each request on its own, and an adapter id names its weights.
    So complete answers at temperature 0 are grouped by (prompt, max_tokens, adapter id or None for the base
    model); a group with two different answers means a request was answered with the wrong adapter, or
    that decoding or training is not deterministic. Groups of one answer prove nothing and are not counted.
    """
    groups: dict[tuple[int, int | None, str | None], Counter] = defaultdict(Counter)
    for r in records:
        if r.status == "ok" and r.answer_hash is not None and r.temperature == 0:
            groups[(r.prompt_index, r.max_tokens, r.adapter_id)][r.answer_hash] += 1
    checked = {key: answers for key, answers in groups.items() if answers.total() > 1}
    mismatches = [
        {"prompt_index": p, "max_tokens": m, "adapter_id": a, "answers": dict(answers)}
        for (p, m, a), answers in checked.items()
        if len(answers) > 1
    ]
    return {
        "groups_checked": len(checked),
        "answers_checked": sum(answers.total() for answers in checked.values()),
        "mismatches": mismatches,
    }


def _budget_order(budget: str) -> tuple[int, int]:
    return (1, 0) if not budget.isdigit() else (0, int(budget))  # numbers first, then "default"


def build_report(
    records: list[Record],
    config: dict[str, Any],
    budgets: list[str],
    elapsed_s: float,
    issuing_s: float,
    dropped: int = 0,
    started_unix: float | None = None,
) -> dict[str, Any]:
    """`budgets`: the mix's budgets, each of which gets a row even when no request drew it. `started_unix`:
    the wall-clock time the records' `start_s` count from, to line them up with other timelines."""
    by_budget: dict[str, list[Record]] = {b: [] for b in budgets}
    for record in records:
        by_budget.setdefault(record.budget, []).append(record)
    fallbacks = Counter(
        fallback_kind(r.reason) for r in records if r.status == "ok" and r.decision == "fallback" and r.reason
    )
    first_errors: dict[str, str] = {}
    for record in records:
        if record.status not in ("ok", CLIENT_CANCELLED):
            first_errors.setdefault(record.status, record.error or "")
    return {
        "config": config,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "started_unix": started_unix,
        "elapsed_s": round(elapsed_s, 3),
        "issuing_s": round(issuing_s, 3),
        "dropped": dropped,
        "overall": summarise(records, elapsed_s, any_streamed(config)),
        "by_budget": {
            b: summarise(by_budget[b], elapsed_s, any_streamed(config))
            for b in sorted(by_budget, key=_budget_order)
        },
        "fallback_reasons": dict(fallbacks.most_common()),
        "error_examples": first_errors,
        "answer_check": answer_check(records),
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
    share = config.get("stream_share") or 0
    parts = [
        load,
        f"{report['elapsed_s']:.1f}s elapsed ({report['issuing_s']:.1f}s issuing, then draining)",
        {0: "not streaming", 1: "streaming"}.get(share, f"{share:.0%} streamed"),
        f"max_tokens {config['max_tokens']}",
        f"budget mix {config['budget_mix']}",
    ]
    if config.get("cancel_share"):
        parts.append(f"{config['cancel_share']:.0%} of streams abandoned after their first chunk")
    if config.get("prompts"):
        parts.append(f"prompts {config['prompts']}")
    if config.get("max_requests"):
        parts.append(f"at most {config['max_requests']} requests")
    if config.get("ttt_mode"):
        parts.append(f"ttt mode {config['ttt_mode']}")
    if config.get("ttt_deadline"):
        parts.append(f"ttt deadline {config['ttt_deadline']:g}s")
    if report["dropped"]:
        parts.append(f"{report['dropped']} arrivals dropped (their user was still busy)")
    return "; ".join(parts)


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    cancelling = bool(config.get("cancel_share"))
    lines = [
        f"## ttserve load test: {config['model']} at {config['host']} ({config['endpoint']})",
        "",
        _describe_run(report),
        "",
    ]
    head = ["budget", "requests", "ok", "errors"]
    if cancelling:
        head.append("client cancelled")
    head += ["req/s", "out tok/s", "p50 s", "p90 s", "p99 s"]
    if any_streamed(config):
        head += ["TTFT p50 s", "TTFT p90 s"]
    head += [*DECISIONS, "mean train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, summary in [("all", report["overall"]), *report["by_budget"].items()]:
        lines.append("| " + " | ".join(_row(name, summary, any_streamed(config), cancelling)) + " |")
    missing = report["overall"]["ttt"]["missing"]
    if missing:
        lines += ["", f"{missing} successful responses carried no `ttt` object (not a ttserve server?)."]
    if report["fallback_reasons"]:
        lines += ["", "Fallback reasons (numbers shown as N):", ""]
        lines += [f"- {n} × {reason}" for reason, n in report["fallback_reasons"].items()]
    if report["error_examples"]:
        lines += ["", "Errors (first message of each kind):", ""]
        lines += [f"- {kind}: {message[:300]}" for kind, message in report["error_examples"].items()]
    lines += ["", _describe_answer_check(report["answer_check"])]
    return "\n".join(lines)


def _describe_answer_check(check: dict[str, Any]) -> str:
    mismatches = check["mismatches"]
    text = (
        f"Wrong-adapter check: {check['groups_checked']} groups of identical greedy requests "
        f"({check['answers_checked']} answers), {len(mismatches)} with differing answers."
    )
    if mismatches:
        text += "\n"
    for m in mismatches[:10]:
        adapter = m["adapter_id"] or "the base model"
        text += f"\n- prompt {m['prompt_index']}, max_tokens {m['max_tokens']}, {adapter}: {m['answers']}"
    return text


def _row(name: str, summary: dict[str, Any], streaming: bool, cancelling: bool) -> list[str]:
    latency, ttt = summary["latency_s"], summary["ttt"]
    cells = [name, str(summary["requests"]), str(summary["ok"]), _fmt_errors(summary["errors"])]
    if cancelling:
        cells.append(str(summary["client_cancelled"]))
    cells += [
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
