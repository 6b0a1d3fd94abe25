"""Named load-test scenarios, run end to end: start `ttserve serve`, watch it, load it with locust, stop it,
then write the report (markdown, JSON, PNG plots) and hold the server to the scenario's checks.

    python -m loadtests.scenarios list
    python -m loadtests.scenarios run soak --model tiny --out /tmp/soak

Exit status: 0 when every check passes, 1 when one fails, 2 when the run itself failed (the server did not
start, locust wrote no report, the time limit was reached). See loadtests/README.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtests import checks
from loadtests.monitor import Monitor, Sample, summarise
from loadtests.plots import write_plots
from loadtests.report import markdown
from loadtests.server import ServeProcess, served_model

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
SERVER_DEFAULT_MAX_ADAPTERS = 16  # adapters.max_adapters when nothing sets it


@dataclass(frozen=True)
class Scenario:
    about: str
    budget_mix: str
    users: int
    requests: int  # locust --max-requests
    duration_s: float  # locust -t: the upper bound in time
    max_tokens: int = 32
    stream_share: float = 0.5
    cancel_share: float = 0.0
    prompts: str = "builtin"
    ttt_mode: str = "always"  # spend the budget as asked, so that training happens whatever the policy says
    ttt_deadline_s: float = 0.0
    arrival_rate: float = 0.0  # Poisson arrivals per second; 0: closed loop
    timeout_s: float = 300.0  # how long the client lets the server stay silent
    max_adapters: int | None = None  # set on the server; None: its default
    server_env: dict[str, str] = field(default_factory=dict)
    # which checks beyond the common ones (answered, no server failures, no wrong adapters, adapter bounds)
    base_only: bool = False
    overload: bool = False
    soak: bool = False


SCENARIOS = {
    "base-only": Scenario(
        about="budget 0 only: the base model's latency and throughput, streaming and not",
        budget_mix="0:1",
        users=4,
        requests=200,
        duration_s=180,
        base_only=True,
    ),
    "mixed": Scenario(
        about="mostly base-model requests, some training with budgets 4 and 8, repeated and fresh prompts",
        budget_mix="0:0.6,4:0.3,8:0.1",
        users=4,
        requests=200,
        duration_s=600,
        prompts="stdlib:100",
    ),
    "overload": Scenario(
        about="Poisson arrivals far above capacity, with the server's default limits and a 10 s training "
        "deadline: the server should refuse (429/503 with Retry-After) or answer with the base model, never "
        "leave a client waiting past its limits",
        budget_mix="0:0.7,4:0.2,8:0.1",
        users=64,
        requests=2000,
        duration_s=60,
        max_tokens=16,
        arrival_rate=20,
        timeout_s=120,  # above the server's own bounds (training deadline + generation wait + the answer)
        ttt_deadline_s=10,
        overload=True,
    ),
    "soak": Scenario(
        about="many requests with training (budgets 1-4, repeats and fresh prompts), streamed and not, some "
        "abandoned mid-stream, through a small adapter cache: nothing may grow, no answer may come from a "
        "wrong adapter",
        budget_mix="0:0.4,1:0.2,2:0.2,4:0.2",
        users=4,
        requests=500,
        duration_s=1800,
        max_tokens=8,
        cancel_share=0.2,
        prompts="stdlib:60",
        max_adapters=4,
        soak=True,
    ),
}

ScenarioName = Enum("ScenarioName", {name: name for name in SCENARIOS}, type=str)  # typer's choices
StopSignal = Enum("StopSignal", {name: name for name in ("TERM", "INT")}, type=str)

# A soak's leak checks allow this much over the warm-up's maximum: Ray starts and retires helper threads
# (and their descriptors) on its own schedule, which is not growth.
FD_SLACK = 32
THREAD_SLACK = 16

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])


@app.command("list")
def list_scenarios() -> None:
    """The scenarios and what each one sends."""
    for name, s in SCENARIOS.items():
        load = f"Poisson {s.arrival_rate:g} req/s, {s.users} users" if s.arrival_rate else f"{s.users} users"
        typer.echo(f"{name}: {s.about}\n  {s.requests} requests or {s.duration_s:g} s, {load}, "
                   f"budgets {s.budget_mix}, max_tokens {s.max_tokens}, prompts {s.prompts}")  # fmt: skip


@app.command()
def run(
    scenario: Annotated[ScenarioName, typer.Argument(help="which scenario (see `list`)")],
    out: Annotated[Path, typer.Option(help="directory for report.md, report.json, the plots and the logs")],
    model: Annotated[
        str, typer.Option(help="default (SmolLM2-135M-Instruct), tiny (configs/tiny.yaml) or a model path")
    ] = "default",
    datastore: Annotated[Path | None, typer.Option(help="the server's datastore.path")] = None,
    server_env: Annotated[
        list[str] | None,
        typer.Option("--server-env", help="KEY=VALUE for the server's environment, repeatable"),
    ] = None,
    server_url: Annotated[
        str | None, typer.Option(help="load this running server instead (only its /metrics is watched)")
    ] = None,
    requests: Annotated[int | None, typer.Option(help="requests to send")] = None,
    duration: Annotated[float | None, typer.Option(help="seconds at most to send them in")] = None,
    users: Annotated[int | None, typer.Option(help="simulated users (requests in flight at most)")] = None,
    rate: Annotated[float | None, typer.Option(help="Poisson arrivals per second (0: closed loop)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="max_tokens per request")] = None,
    budget_mix: Annotated[str | None, typer.Option(help="BUDGET:WEIGHT,... (see the locustfile)")] = None,
    prompts: Annotated[str | None, typer.Option(help="builtin, stdlib, stdlib:N or a prompts file")] = None,
    max_adapters: Annotated[
        int | None,
        typer.Option(
            help="adapters.max_adapters: set on the server started here; with --server-url, the bound "
            "the checks use (default: the scenario's, else the server's default of 16)"
        ),
    ] = None,
    interval: Annotated[float, typer.Option(help="seconds between monitor samples")] = 1.0,
    warmup: Annotated[float, typer.Option(help="the share of the run counted as warm-up")] = 0.2,
    startup_timeout: Annotated[float, typer.Option(help="seconds the server may take to start")] = 600,
    stop_signal: Annotated[
        StopSignal,
        typer.Option(
            help="how the server started here is stopped: TERM as a service manager does, INT as Ctrl-C"
        ),
    ] = StopSignal.TERM,
    time_limit: Annotated[
        float | None,
        typer.Option(help="hard wall-clock limit for the whole scenario (default: duration + 15 min)"),
    ] = None,
) -> None:
    """Run one scenario and write its report; the exit status says whether its checks passed."""
    chosen = replace(
        SCENARIOS[scenario.value],
        **{
            name: value
            for name, value in (
                ("requests", requests),
                ("duration_s", duration),
                ("users", users),
                ("arrival_rate", rate),
                ("max_tokens", max_tokens),
                ("budget_mix", budget_mix),
                ("prompts", prompts),
                ("max_adapters", max_adapters),
            )
            if value is not None
        },
    )
    target = Target(
        model=model,
        datastore=datastore,
        env=dict(_key_value(item) for item in server_env or []),
        url=server_url.rstrip("/") if server_url else None,
        startup_timeout_s=startup_timeout,
        stop_signal=signal.Signals[f"SIG{stop_signal.value}"],
    )
    out.mkdir(parents=True, exist_ok=True)
    limit = time_limit if time_limit is not None else chosen.duration_s + 900
    try:
        result = run_scenario(scenario.value, chosen, target, out, time.monotonic() + limit, interval, warmup)
    except RunFailed as failure:
        typer.echo(f"{scenario.value}: the run failed: {failure}", err=True)
        raise typer.Exit(2) from None
    typer.echo((out / "report.md").read_text())
    failed = [c for c in result if c.passed is False]
    raise typer.Exit(1 if failed else 0)


class RunFailed(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """The server a scenario loads: one it starts (model, datastore, more environment), or one at `url`."""

    model: str = "default"  # default, tiny, or a model path
    datastore: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    startup_timeout_s: float = 600
    stop_signal: signal.Signals = signal.SIGTERM


def run_scenario(
    name: str,
    scenario: Scenario,
    target: Target,
    out: Path,
    deadline: float,
    interval_s: float = 1.0,
    warmup: float = 0.2,
) -> list[checks.Check]:
    """Load the target with the scenario, write the report into `out`, and return the checks. `deadline`
    (time.monotonic()) bounds everything but stopping the server."""
    server = None
    if target.url is None:
        scratch = out / "scratch"
        env = server_environment(scenario, target, scratch)
        bound = int(env["TTSERVE_ADAPTERS__MAX_ADAPTERS"])
        server = ServeProcess(
            ["--config", str(TINY_CONFIG)] if target.model == "tiny" else [], env, out / "server.log"
        )
        try:
            server.start(min(target.startup_timeout_s, _left(deadline)))
        except RuntimeError as error:
            raise RunFailed(str(error)) from None
        url, served = server.url, server.model
        monitor = Monitor(server.pid, f"{url}/metrics", scratch, interval_s)
    else:
        url, bound = target.url, scenario.max_adapters or SERVER_DEFAULT_MAX_ADAPTERS
        try:
            served = served_model(url)
        except (OSError, ValueError, KeyError, IndexError) as error:
            raise RunFailed(f"no model listed at {url}/v1/models: {error}") from None
        monitor = Monitor(None, f"{url}/metrics", None, interval_s)
    try:
        monitor.start()
        try:
            load = run_locust(scenario, url, served, out, deadline)
        finally:
            samples = monitor.stop(settle_s=30)
    finally:
        # past the time limit too: a scenario never leaves a server behind
        server_exit = server.stop(timeout_s=60, signal_number=target.stop_signal) if server else None

    summary = summarise(samples, warmup)
    results = scenario_checks(scenario, load, samples, summary, bound)
    if server is not None:
        stopped = f"exit code {server_exit} after {target.stop_signal.name}"
        results.append(checks.Check("server stopped cleanly", server_exit == 0, stopped))
    sample_dicts = [asdict(s) for s in samples]
    plots = write_plots(load, sample_dicts, out)
    context = {
        "scenario": name,
        "about": scenario.about,
        "settings": asdict(scenario),
        "server": {"url": url, "model": served, "started_here": server is not None, "exit_code": server_exit},
        "max_adapters": bound,
    }
    (out / "report.md").write_text(report_markdown(context, load, summary, monitor.errors, results, plots))
    full = context | {
        "checks": [asdict(c) for c in results],
        "monitor": {"summary": summary, "errors": monitor.errors, "samples": sample_dicts},
        "load": load,
    }
    (out / "report.json").write_text(json.dumps(full, indent=1) + "\n")
    return results


def server_environment(scenario: Scenario, target: Target, scratch: Path) -> dict[str, str]:
    """This environment, the scenario's server settings, then the target's. adapters.max_adapters is always
    set, so that the checks hold the server to the bound it really has."""
    env = {**os.environ, "TTSERVE_ADAPTERS__SCRATCH_DIR": str(scratch)}
    if target.model not in ("default", "tiny"):
        env["TTSERVE_MODEL__NAME_OR_PATH"] = target.model
    if target.datastore is not None:
        env["TTSERVE_DATASTORE__PATH"] = str(target.datastore)
    env.setdefault("TTSERVE_ADAPTERS__MAX_ADAPTERS", str(SERVER_DEFAULT_MAX_ADAPTERS))
    if scenario.max_adapters is not None:
        env["TTSERVE_ADAPTERS__MAX_ADAPTERS"] = str(scenario.max_adapters)
    return env | scenario.server_env | target.env


def run_locust(scenario: Scenario, url: str, model: str, out: Path, deadline: float) -> dict[str, Any]:
    """Locust, headless, as a subprocess (it patches the standard library with gevent on import)."""
    report_json = out / "load.json"
    report_json.unlink(missing_ok=True)
    stop_timeout = scenario.timeout_s + 10  # requests in flight at the end may take one client timeout
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(scenario.users), "-r", str(scenario.users), "-t", f"{scenario.duration_s:g}s",
        "--stop-timeout", f"{stop_timeout:g}", "--host", url, "--model", model,
        "--max-requests", str(scenario.requests), "--max-tokens", str(scenario.max_tokens),
        "--budget-mix", scenario.budget_mix, "--stream-share", f"{scenario.stream_share:g}",
        "--cancel-share", f"{scenario.cancel_share:g}", "--prompts", scenario.prompts,
        "--timeout", f"{scenario.timeout_s:g}", "--arrival-rate", f"{scenario.arrival_rate:g}",
        "--report-json", str(report_json),
    ]  # fmt: skip
    if scenario.ttt_mode:
        command += ["--ttt-mode", scenario.ttt_mode]
    if scenario.ttt_deadline_s:
        command += ["--ttt-deadline", f"{scenario.ttt_deadline_s:g}"]
    with open(out / "locust.log", "w") as log:
        try:
            subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=_left(deadline))
        except subprocess.TimeoutExpired:
            raise RunFailed("the time limit was reached while locust ran (see locust.log)") from None
    if not report_json.is_file():
        raise RunFailed(
            f"locust wrote no report; the end of locust.log:\n{(out / 'locust.log').read_text()[-3000:]}"
        )
    return json.loads(report_json.read_text())


def scenario_checks(
    scenario: Scenario, load: dict, samples: list[Sample], summary: dict, max_adapters: int
) -> list[checks.Check]:
    results = [checks.answered(load), checks.no_server_failures(load), checks.no_wrong_adapters(load)]
    if scenario.base_only:
        results.append(checks.never_trained(load))
    if scenario.overload:
        results += [checks.no_timeouts(load), checks.only_refusals(load)]
    results += checks.adapter_bounds(samples, max_adapters, scenario.users)
    if scenario.soak:
        results += [
            checks.no_growth(summary, "fds", "open file descriptors", FD_SLACK),
            checks.no_growth(summary, "threads", "threads", THREAD_SLACK),
        ]
    results.append(checks.memory_slope(summary))
    return results


def report_markdown(
    context: dict,
    load: dict,
    summary: dict,
    monitor_errors: list[str],
    results: list[checks.Check],
    plots: list[Path],
) -> str:
    lines = [
        f"# Scenario {context['scenario']}",
        "",
        f"{context['about']}. Server: {context['server']['model']} at {context['server']['url']}"
        + ("" if context["server"]["started_here"] else " (already running)")
        + f"; adapters.max_adapters {context['max_adapters']}.",
        "",
        "## Checks",
        "",
        checks.markdown(results),
        "",
        markdown(load).replace("## ttserve load test", "## Load"),
        "",
        "## Server resources",
        "",
        monitor_markdown(summary),
    ]
    if monitor_errors:
        lines += ["", "Monitor read errors (first few): " + "; ".join(monitor_errors)]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def monitor_markdown(summary: dict) -> str:
    if not summary["series"]:
        return "No samples."
    lines = [
        f"{summary['samples']} samples over {summary['seconds']:.0f} s; slopes after a warm-up of "
        f"{summary['warmup_s']:.0f} s.",
        "",
        "| series | warm-up max | max | last | slope / min |",
        "|---|---|---|---|---|",
    ]
    for name, v in summary["series"].items():
        slope = "–" if v["slope_per_min"] is None else f"{v['slope_per_min']:+.3g}"
        warm = "–" if v["warmup_max"] is None else f"{v['warmup_max']:.6g}"
        lines.append(f"| {name} | {warm} | {v['max']:.6g} | {v['last']:.6g} | {slope} |")
    by_process = {n: v for n, v in summary.get("rss_slope_per_min_by_process", {}).items() if v is not None}
    if by_process:
        steepest = sorted(by_process.items(), key=lambda item: -abs(item[1]))[:6]
        lines += ["", "Resident memory slope by process, MB/min after the warm-up (the steepest): "
                  + ", ".join(f"{name} {slope:+.3g}" for name, slope in steepest) + "."]  # fmt: skip
    return "\n".join(lines)


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--server-env")
    return key, value


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RunFailed("the scenario's time limit was reached")
    return left


if __name__ == "__main__":
    app()
