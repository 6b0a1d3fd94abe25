"""What a scenario holds the server to, from the load test's report and the monitor's summary.

Each check passes, fails, or only reports (`passed` None: a number to read, such as the memory slope, or a
check with nothing to check, such as bounds without a monitor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loadtests.monitor import Sample, at_rest

# A refusal that says when to retry: the ingress's concurrency limit (429) and the replica's admission (503).
REFUSALS = {"429", "503"}


@dataclass
class Check:
    name: str
    passed: bool | None
    detail: str


def _errors(load: dict[str, Any]) -> dict[str, int]:
    return load["overall"]["errors"]


def answered(load: dict[str, Any]) -> Check:
    overall = load["overall"]
    return Check("answered", overall["ok"] > 0, f"{overall['ok']} of {overall['requests']} requests answered")


def no_server_failures(load: dict[str, Any]) -> Check:
    """5xx other than 503 (which is a refusal with Retry-After), errors in mid-stream, malformed answers."""
    failures = {
        kind: n
        for kind, n in _errors(load).items()
        if (kind.isdigit() and kind.startswith("5") and kind != "503")
        or kind in ("stream_error", "bad_response")
    }
    return Check("no server failures", not failures, _counts(failures) or "no 5xx but 503, no broken answers")


def no_wrong_adapters(load: dict[str, Any]) -> Check:
    check = load["answer_check"]
    mismatches = len(check["mismatches"])
    detail = (
        f"{mismatches} of {check['groups_checked']} groups of identical greedy requests "
        f"({check['answers_checked']} answers) had differing answers"
    )
    return Check("no wrong-adapter answers", mismatches == 0 if check["groups_checked"] else None, detail)


def no_timeouts(load: dict[str, Any]) -> Check:
    timeouts = _errors(load).get("timeout", 0)
    return Check("no timeouts", timeouts == 0, f"{timeouts} requests timed out on the client")


def only_refusals(load: dict[str, Any]) -> Check:
    """Under overload every request is answered (maybe by the base model) or refused with a retry time."""
    others = {kind: n for kind, n in _errors(load).items() if kind not in REFUSALS}
    refused = sum(n for kind, n in _errors(load).items() if kind in REFUSALS)
    detail = f"{refused} refused with 429/503" + (f"; other errors: {_counts(others)}" if others else "")
    return Check("errors are refusals", not others, detail)


def never_trained(load: dict[str, Any]) -> Check:
    decisions = load["overall"]["ttt"]["decisions"]
    trained = {d: n for d, n in decisions.items() if d != "skipped" and n}
    return Check("budget 0 never trains", not trained, _counts(trained) or "every answer skipped training")


def adapter_bounds(samples: list[Sample], max_adapters: int, users: int) -> list[Check]:
    """What the adapter cache (ttserve/adapter_cache.py) promises, sample by sample and at rest.

    The cache makes room before it adds a trained adapter, and never evicts an adapter a request is using:
    it goes over max_adapters only while the adapters it holds are in use, and each user has at most one
    request in flight, holding one adapter. So while the load runs the cache holds at most
    max_adapters + users. The engine gets an adapter before the
    cache lists it and loses it after the cache drops it, one at a time: at most one more than the cache. On
    disk, an adapter is written before it is added and deleted after it is unloaded: at most one more than
    the cache per request in flight, plus the one being deleted. At rest (the last sample, nothing in
    flight) the cache holds at most max_adapters, and the engine and the disk hold exactly what it holds.
    """
    cached = [(s, s.gauges["adapters_cached"]) for s in samples if "adapters_cached" in s.gauges]
    if not cached:
        return [
            Check("adapter cache within its bounds", None, "not measured (no adapters_cached in /metrics)")
        ]
    rest = samples[-1]
    rested = at_rest(rest) and "adapters_cached" in rest.gauges
    running_bound = max_adapters + users
    top = max(n for _, n in cached)
    detail = f"max {top:g} while loaded (bound {running_bound} = max_adapters {max_adapters} + {users} users)"
    passed = top <= running_bound
    if rested:
        detail += f"; {rest.gauges['adapters_cached']:g} at rest (bound {max_adapters})"
        passed = passed and rest.gauges["adapters_cached"] <= max_adapters
    else:
        detail += "; the server was not at rest when the last sample was taken"
    results = [Check("adapter cache within its bounds", passed, detail)]
    for name, value, slack in (
        ("adapters in the engine follow the cache", lambda s: s.gauges.get("adapters_loaded"), 1),
        ("adapters on disk follow the cache", lambda s: s.adapters_on_disk, users + 1),
    ):
        extra = [value(s) - n for s, n in cached if value(s) is not None]
        if not extra:
            results.append(Check(name, None, "not measured"))
            continue
        detail = f"at most {max(extra):+g} beyond the cache while loaded (bound +{slack})"
        passed = max(extra) <= slack
        if rested and value(rest) is not None:
            detail += f"; {value(rest):g} at rest, the cache {rest.gauges['adapters_cached']:g}"
            passed = passed and value(rest) == rest.gauges["adapters_cached"]
        results.append(Check(name, passed, detail))
    return results


def no_growth(summary: dict[str, Any], name: str, label: str, slack: float) -> Check:
    """The last value is at most the warm-up's maximum plus `slack`: what the server needs it takes while
    warming up, and a leak keeps adding."""
    values = summary.get("series", {}).get(name)
    if values is None or values["warmup_max"] is None:
        return Check(f"{label} do not grow", None, "not measured")
    last, warm, slope = values["last"], values["warmup_max"], values["slope_per_min"]
    detail = f"last {last:g}, warm-up max {warm:g} (+{slack:g} allowed), slope {_fmt(slope)}/min"
    return Check(f"{label} do not grow", last <= warm + slack, detail)


def memory_slope(summary: dict[str, Any]) -> Check:
    values = summary.get("series", {}).get("rss_mb")
    if values is None:
        return Check("resident memory slope", None, "not measured")
    return Check(
        "resident memory slope",
        None,
        f"{_fmt(values['slope_per_min'])} MB/min after warm-up; max {values['max']:.0f} MB, "
        f"last {values['last']:.0f} MB",
    )


def markdown(checks: list[Check]) -> str:
    marks = {True: "pass", False: "**FAIL**", None: "info"}
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {marks[c.passed]} | {c.detail} |" for c in checks]
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{kind}×{n}" for kind, n in counts.items())


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3g}"
