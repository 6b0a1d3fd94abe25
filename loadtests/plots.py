"""PNG plots of a load test over time: latency and time to first token, throughput, error, cancellation and
fallback rates, what test-time training did, and the server's resources as the monitor sampled them.

Requests are put in windows of equal width by the time they finished (about 30 windows over the run); each
point is one window. Everything takes the JSON forms (report.py's records, monitor.py's samples as dicts), so
the plots can be redrawn from a saved report. Figures are drawn without pyplot, so no display and no global
backend is involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from loadtests.report import CLIENT_CANCELLED, percentile

WINDOWS = 30

Record = dict[str, Any]  # report.py's Record, as written to JSON


def window_width(duration_s: float, windows: int = WINDOWS) -> float:
    """A round width (1, 2 or 5 times a power of ten seconds, at least 1 s) giving about `windows` windows."""
    raw = max(duration_s / windows, 1.0)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def by_window(records: list[Record], width: float) -> list[tuple[float, list[Record]]]:
    """(window middle, records that finished in it) for every window up to the last finished request."""
    finished = [(r["start_s"] + (r["latency_s"] or 0.0), r) for r in records]
    if not finished:
        return []
    count = int(max(t for t, _ in finished) // width) + 1
    windows: list[list[Record]] = [[] for _ in range(count)]
    for t, record in finished:
        windows[int(t // width)].append(record)
    return [((i + 0.5) * width, rs) for i, rs in enumerate(windows)]


def _ok(records: list[Record]) -> list[Record]:
    return [r for r in records if r["status"] == "ok"]


def _share(part: Callable[[Record], bool], of: list[Record]) -> float | None:
    return sum(map(part, of)) / len(of) if of else None


def _failed(record: Record) -> bool:
    return record["status"] not in ("ok", CLIENT_CANCELLED)


def _cancelled(record: Record) -> bool:
    return record["status"] == CLIENT_CANCELLED


def _pct(field: str, q: float) -> Callable[[list[Record]], float | None]:
    return lambda rs: percentile([r[field] for r in _ok(rs) if r[field] is not None], q)


def _decision_share(decision: str) -> Callable[[list[Record]], float | None]:
    return lambda rs: _share(lambda r: r["decision"] == decision, _ok(rs))


def _panel(ax, windows, lines: dict[str, Callable[[list[Record]], float | None]], ylabel: str) -> None:
    times = [t for t, _ in windows]
    for label, value in lines.items():
        ys = [value(rs) for _, rs in windows]
        ax.plot(times, [math.nan if y is None else y for y in ys], marker=".", label=label)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _figure(rows: int, title: str) -> tuple[Figure, list]:
    figure = Figure(figsize=(10, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    figure.suptitle(title)
    axes[-1].set_xlabel("seconds since the load test started")
    return figure, list(axes)


def plot_latency(records: list[Record], width: float, path: Path) -> Path:
    windows = by_window(records, width)
    figure, (latency, ttft) = _figure(2, f"Latency of successful requests ({width:g} s windows)")
    _panel(latency, windows, {f"p{q}": _pct("latency_s", q) for q in (50, 90, 99)}, "latency s")
    _panel(ttft, windows, {f"TTFT p{q}": _pct("ttft_s", q) for q in (50, 90)}, "time to first token s")
    figure.savefig(path, dpi=90)
    return path


def plot_throughput(records: list[Record], width: float, path: Path) -> Path:
    windows = by_window(records, width)
    figure, (requests, tokens) = _figure(2, f"Throughput of successful requests ({width:g} s windows)")
    _panel(requests, windows, {"req/s": lambda rs: len(_ok(rs)) / width}, "requests / s")
    out = {"out tok/s": lambda rs: sum(r["output_tokens"] or 0 for r in _ok(rs)) / width}
    _panel(tokens, windows, out, "output tokens / s")
    figure.savefig(path, dpi=90)
    return path


def plot_outcomes(records: list[Record], width: float, path: Path) -> Path:
    windows = by_window(records, width)
    figure, (rates, decisions) = _figure(2, f"Outcomes ({width:g} s windows)")
    rates_of = {
        "errors / requests": lambda rs: _share(_failed, rs),
        "cancelled by client / requests": lambda rs: _share(_cancelled, rs),
        "fallback / answers": _decision_share("fallback"),
    }
    _panel(rates, windows, rates_of, "share")
    shares = {decision: _decision_share(decision) for decision in ("trained", "reused", "skipped")}
    _panel(decisions, windows, shares, "share of answers")
    for ax in (rates, decisions):
        ax.set_ylim(-0.03, 1.03)
    figure.savefig(path, dpi=90)
    return path


RESOURCE_PANELS = {  # panel label -> the sample series it draws
    "resident memory MB (process tree)": ("rss_mb",),
    "open file descriptors": ("fds",),
    "threads": ("threads",),
    "adapters": ("adapters_cached", "adapters_loaded", "adapters_on_disk"),
}


def plot_resources(samples: list[dict[str, Any]], started_unix: float | None, path: Path) -> Path:
    """The monitor's samples; their time axis is the load test's when `started_unix` says when it began."""
    figure, axes = _figure(len(RESOURCE_PANELS), "Server resources (monitor samples)")
    origin = started_unix if started_unix is not None else (samples[0]["unix_s"] if samples else 0.0)
    times = [s["unix_s"] - origin for s in samples]
    for ax, (label, names) in zip(axes, RESOURCE_PANELS.items(), strict=True):
        for name in names:
            ys = [s.get(name, s["gauges"].get(name)) for s in samples]
            if any(y is not None for y in ys):
                ax.plot(times, [math.nan if y is None else y for y in ys], marker=".", label=name)
        ax.set_ylabel(label, fontsize="small")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.savefig(path, dpi=90)
    return path


def write_plots(report: dict[str, Any], samples: list[dict[str, Any]] | None, out_dir: Path) -> list[Path]:
    """The four figures in `out_dir` (resources only with samples); returns their paths."""
    records = report["records"]
    width = window_width(report["elapsed_s"])
    paths = [
        plot_latency(records, width, out_dir / "latency.png"),
        plot_throughput(records, width, out_dir / "throughput.png"),
        plot_outcomes(records, width, out_dir / "outcomes.png"),
    ]
    if samples:
        paths.append(plot_resources(samples, report.get("started_unix"), out_dir / "resources.png"))
    return paths
