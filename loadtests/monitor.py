"""Watching a server while a load test runs: its process tree, its /metrics gauges and its adapters on disk.

Every `interval_s` a background thread takes a `Sample`: the resident memory, open file descriptors, threads
and processes of the server's process and all its descendants (under Ray these are the raylet, the workers
and the replicas; psutil), the gauges of GET /metrics that are present, and the adapter directories in the
server's scratch directory. `summarise` then says how each series grew after a warm-up: least-squares slope
per minute, maximum during the warm-up, maximum and last value.
"""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

# Gauges (and a counter) read from /metrics when the server exports them, by the short name a sample keeps.
GAUGES = {
    "adapters_cached": "ttserve_generator_adapters_cached",
    "adapters_loaded": "ttserve_generator_adapters_loaded",
    "adapter_bytes": "ttserve_generator_adapter_bytes",
    "requests_in_flight": "ttserve_requests_in_flight",
    "trainings_queued": "ttserve_generator_trainings_queued",
    "generations_running": "ttserve_generator_generations_running",
    "generations_waiting": "ttserve_generator_generations_waiting",
    "adapter_evictions": "ttserve_generator_adapter_evictions",  # a counter: its sample ends in _total
}
PROCESS_SERIES = ("rss_mb", "fds", "threads", "processes")
# The adapter cache's layout (ttserve/files.py, adapter_cache.py): one directory per serving process under
# the scratch root, one directory per cached adapter in it. Adapters being written are hidden (".adapter-").
SCRATCH_GLOB = "ttserve-adapters-*/adapter-*"


@dataclass
class Sample:
    t_s: float  # since the monitor started
    unix_s: float  # wall clock, to line samples up with the load test's records
    rss_mb: float | None = None
    fds: int | None = None
    threads: int | None = None
    processes: int | None = None
    adapters_on_disk: int | None = None
    gauges: dict[str, float] = field(default_factory=dict)
    rss_mb_by_process: dict[str, float] = field(default_factory=dict)  # by process name, to see who grows

    def value(self, series: str) -> float | None:
        return self.gauges.get(series) if series in GAUGES else getattr(self, series)


def process_tree_usage(pid: int) -> dict[str, Any]:
    """Resident memory (MB), open fds, threads and processes of `pid` and its descendants, summed, and the
    memory by process name (Ray names its workers after what they run). A child that exits while it is
    being read is left out."""
    root = psutil.Process(pid)
    rss = fds = threads = processes = 0
    by_name: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            with process.oneshot():
                resident = process.memory_info().rss
                fds += process.num_fds()
                threads += process.num_threads()
                name = _stable_name(process.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += resident
        by_name[name] = round(by_name.get(name, 0.0) + resident / 2**20, 1)
        processes += 1
    return {
        "rss_mb": rss / 2**20,
        "fds": fds,
        "threads": threads,
        "processes": processes,
        "rss_mb_by_process": by_name,
    }


def _stable_name(name: str) -> str:
    """A Ray worker's title says what it runs now ("ray::ServeReplica:ttserve:Generator.handle_request"):
    keep the actor ("ray::ServeReplica:ttserve:Generator"), so one process keeps one name."""
    return name.split(".", 1)[0] if name.startswith("ray::") else name


def read_gauges(metrics_text: str) -> dict[str, float]:
    """The `GAUGES` present in a Prometheus text exposition, summed over Generator replicas: unlabelled
    samples, or samples labelled with nothing but their `replica` (under Ray, one series per replica)."""
    wanted = {metric: short for short, metric in GAUGES.items()}
    gauges: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        short = wanted.get(family.name)
        for sample in family.samples:
            if (
                short is not None
                and sample.name in (family.name, f"{family.name}_total")
                and set(sample.labels) <= {"replica"}
            ):
                gauges[short] = gauges.get(short, 0.0) + sample.value
    return gauges


def adapters_on_disk(scratch_root: Path) -> int:
    return sum(1 for path in Path(scratch_root).glob(SCRATCH_GLOB) if path.is_dir())


class Monitor:
    """Samples in a daemon thread from `start()` to `stop()`. Each source is optional: `pid` (the server's
    process), `metrics_url` (its /metrics), `scratch_dir` (its adapters.scratch_dir)."""

    def __init__(
        self,
        pid: int | None = None,
        metrics_url: str | None = None,
        scratch_dir: Path | None = None,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.pid, self.metrics_url, self.scratch_dir = pid, metrics_url, scratch_dir
        self.interval_s = interval_s
        self.clock = clock
        self.samples: list[Sample] = []
        self.errors: list[str] = []  # the first few failed reads, for the report
        self._started = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-monitor", daemon=True)

    def start(self) -> Monitor:
        self._started = self.clock()
        self._thread.start()
        return self

    def stop(self, settle_s: float = 0.0) -> list[Sample]:
        """Stop sampling and take a last sample: called once the load is over, after waiting up to `settle_s`
        for /metrics to show no request in flight and no training queued, so that it shows what the server
        keeps at rest, which is what a leak check compares."""
        self._stop.set()
        self._thread.join()
        deadline = self.clock() + (settle_s if self.metrics_url else 0.0)
        while not at_rest(last := self.sample()) and self.clock() < deadline:
            time.sleep(0.2)
        self.samples.append(last)
        return self.samples

    def _run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> Sample:
        sample = Sample(t_s=round(self.clock() - self._started, 3), unix_s=round(time.time(), 3))
        if self.pid is not None:
            self._try(lambda: _fill(sample, process_tree_usage(self.pid)))
        if self.metrics_url is not None:
            self._try(lambda: sample.gauges.update(read_gauges(_get(self.metrics_url))))
        if self.scratch_dir is not None:
            sample.adapters_on_disk = adapters_on_disk(self.scratch_dir)
        return sample

    def _try(self, read: Callable[[], Any]) -> None:
        try:
            read()
        except (OSError, psutil.Error, ValueError) as error:  # a server going away, a scrape timing out
            if len(self.errors) < 5:
                self.errors.append(f"{type(error).__name__}: {error}")


def at_rest(sample: Sample) -> bool:
    """/metrics says that no request is in flight and no training queued."""
    return sample.gauges.get("requests_in_flight") == 0 and not sample.gauges.get("trainings_queued")


def _fill(sample: Sample, values: dict[str, float]) -> None:
    for name, value in values.items():
        setattr(sample, name, value)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode("utf-8")


# --- how the series grew --------------------------------------------------------------------------------
def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of (seconds, value) points, per minute; None for fewer than two times."""
    if len({t for t, _ in points}) < 2:
        return None
    times, values = zip(*points, strict=True)
    return statistics.linear_regression(times, values).slope * 60


def summarise(samples: list[Sample], warmup_fraction: float = 0.2) -> dict[str, Any]:
    """Per series present: max and last value, the max during the warm-up (the first `warmup_fraction` of
    the sampled time) and the slope per minute after it; and the memory slope of each process by name."""
    if not samples:
        return {"samples": 0, "series": {}}
    start, end = samples[0].t_s, samples[-1].t_s
    warm = start + warmup_fraction * (end - start)
    after = [s for s in samples if s.t_s >= warm]
    series = {}
    for name in [*PROCESS_SERIES, "adapters_on_disk", *GAUGES]:
        points = _points(samples, lambda s, name=name: s.value(name))
        if not points:
            continue
        warmup = [v for t, v in points if t <= warm]
        series[name] = {
            "max": max(v for _, v in points),
            "last": points[-1][1],
            "warmup_max": max(warmup) if warmup else None,
            "slope_per_min": _round(slope_per_min(_points(after, lambda s, name=name: s.value(name)))),
        }
    processes = sorted({name for s in samples for name in s.rss_mb_by_process})
    return {
        "samples": len(samples),
        "seconds": round(end - start, 3),
        "warmup_s": round(warm - start, 3),
        "series": series,
        "rss_slope_per_min_by_process": {
            name: _round(slope_per_min(_points(after, lambda s, name=name: s.rss_mb_by_process.get(name))))
            for name in processes
        },
    }


def _points(samples: list[Sample], read: Callable[[Sample], float | None]) -> list[tuple[float, float]]:
    return [(s.t_s, v) for s in samples if (v := read(s)) is not None]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
