"""Locust load test for ttserve's OpenAI-compatible API, with a mix of per-request compute budgets.

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s --stop-timeout 30 \
        --host http://127.0.0.1:8000 --budget-mix 0:0.7,8:0.2,32:0.1

Locust runs the users, the clock and its own statistics. This file adds ttserve's parts: each request
draws its `compute_budget` from `--budget-mix` and is named by it (`chat budget=8`), so locust's table
splits by budget; it is streamed or not (`--stream-share`), and a stream may be abandoned after its first
chunk (`--cancel-share`); each response's `ttt.decision` is tallied as a custom event (`ttt`, `budget=8
trained`); `--max-requests` ends the run by itself; and at test stop the ttserve report (report.py) is
printed, and written with `--report-json`.
Exit status: 0 when at least one request succeeded, 1 when none did, 2 for bad options.
See loadtests/README.md for the user model and how to read the results.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import gevent
import requests
import urllib3
from gevent import GreenletExit
from locust import HttpUser, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner

# isort: split
# This file's siblings, none of which imports locust: locust puts this directory first on sys.path while it
# imports a locustfile.
from completion import error_message, read_stream, read_whole
from prompts import prompt_source
from report import CLIENT_CANCELLED, Record, answer_hash, build_report, markdown, run_config, write_json
from workload import Workload, checked_budget_mix, parse_budget_mix

MAX_PAUSE_S = 60.0  # the longest Retry-After honoured, so one header cannot idle a user for a whole run


# --- options --------------------------------------------------------------------------------------------
def _number(minimum: float, above: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > minimum if above else value >= minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if above else '>='} {minimum:g}")
        return value

    return parse


def _share(text: str) -> float:
    value = _number(0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError("must be a share between 0 and 1")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _prompts(text: str) -> str:
    """Read the prompts once here, so a missing or empty file stops locust before the test starts."""
    try:
        prompt_source(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    # Values stay str, int, float or bool: locust's web UI writes edits back with the type it finds.
    parser.add_argument(
        "--budget-mix",
        type=checked_budget_mix,
        default="0:0.7,8:0.2,32:0.1",
        help="BUDGET:WEIGHT,... compute_budget values and their shares; BUDGET 'default' sends none",
    )
    parser.add_argument(
        "--prompts",
        "--prompts-file",
        dest="prompts",
        type=_prompts,
        default="builtin",
        help="builtin (20 prompts), stdlib (about a thousand 'What does `json.dumps` do?' prompts), "
        "stdlib:N (the first N of those), or a file: one prompt per line, plain text or a JSON string",
    )
    parser.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="/v1/chat/completions or /v1/completions",
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model id (see GET /v1/models)")
    parser.add_argument(
        "--api-key",
        default="",
        env_var="OPENAI_API_KEY",
        is_secret=True,
        help="bearer token when the server sets server.api_key (default: $OPENAI_API_KEY)",
    )
    parser.add_argument(
        "--stream-share",
        type=_share,
        default=1.0,
        help="the share of requests streamed, the rest answered whole; streams give time to first token "
        "(default 1; --stream and --no-stream are 1 and 0)",
    )
    for flag, share in (("--stream", 1.0), ("--no-stream", 0.0)):  # shorthands; the web UI shows the share
        parser.add_argument(
            flag,
            dest="stream_share",
            action="store_const",
            const=share,
            default=argparse.SUPPRESS,  # --stream-share's default stands
            include_in_web_ui=False,
            help=f"--stream-share {share:g}",
        )
    parser.add_argument(
        "--cancel-share",
        type=_share,
        default=0.0,
        help="the share of streamed requests the client abandons (closes the connection) after the first "
        "piece of content; counted as client_cancelled, not as errors",
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--temperature", type=_number(0), default=0.0, help="sampling temperature")
    parser.add_argument(
        "--ttt-mode",
        choices=("", "auto", "always", "off"),
        default="",
        help="sent as ttt.mode: 'always' spends the budget, 'off' never trains (default: the server's auto)",
    )
    parser.add_argument(
        "--ttt-deadline",
        type=_number(0),
        default=0.0,
        help="sent as ttt.deadline_s: seconds within which training must finish (0: none sent)",
    )
    parser.add_argument(
        "--timeout",
        type=_number(0, above=True),
        default=300.0,
        help="seconds the server may stay silent: connecting, before the headers, or mid-stream",
    )
    parser.add_argument(
        "--arrival-rate",
        type=_number(0),
        default=0.0,
        help="Poisson arrivals at this many requests/s over all users of this process, dropping "
        "arrivals that find their user busy (0: closed loop, each user sends again at once)",
    )
    parser.add_argument(
        "--max-requests",
        type=_count,
        default=0,
        help="stop the run after this many requests have been sent, then let those in flight finish for "
        "--stop-timeout (0: no limit; -t still bounds the run in time)",
    )
    parser.add_argument(
        "--report-json",
        default="",
        help="also write the ttserve report as JSON here: configuration, summaries, every request",
    )


# --- one test run ---------------------------------------------------------------------------------------
class LoadTest:
    """What one run of the test (start to stop) sends and what it recorded, in this process."""

    def __init__(self, options) -> None:
        ttt = {"mode": options.ttt_mode} if options.ttt_mode else {}
        if options.ttt_deadline:
            ttt["deadline_s"] = options.ttt_deadline
        self.workload = Workload(
            endpoint=options.endpoint,
            model=options.model,
            budget_mix=parse_budget_mix(options.budget_mix),
            prompts=prompt_source(options.prompts),
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            stream_share=options.stream_share,
            cancel_share=options.cancel_share,
            ttt=ttt,
        )
        self.options = options
        self.headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.records: list[Record] = []
        self.sent = 0
        self.dropped = 0  # Poisson arrivals that found their user busy
        self.started = time.perf_counter()
        self.started_unix = time.time()
        self.issuing_s: float | None = None
        self.json_error: str | None = None  # why --report-json could not be written

    def clock(self) -> float:
        return time.perf_counter() - self.started

    def take_turn(self, runner) -> bool:
        """Count a request about to be sent; False once --max-requests have been. The last one stops the
        test as -t does: requests in flight get --stop-timeout, and a headless locust then quits."""
        limit = self.options.max_requests
        if limit and self.sent >= limit:
            return False
        self.sent += 1
        if self.sent == limit:
            gevent.spawn(runner.quit if self.options.headless else runner.stop)
        return True

    def report(self) -> dict:
        elapsed = self.clock()
        return build_report(
            self.records,
            run_config(vars(self.options)),
            budgets=list(self.workload.budget_mix),
            elapsed_s=elapsed,
            issuing_s=self.issuing_s if self.issuing_s is not None else elapsed,
            dropped=self.dropped,
            started_unix=round(self.started_unix, 3),
        )


load_test: LoadTest | None = None  # the run in progress, or the last one; none in a distributed master


# --- the user -------------------------------------------------------------------------------------------
class CompletionUser(HttpUser):
    """A client that sends one completion at a time: again at once, or at its next Poisson arrival."""

    def on_start(self) -> None:
        self.rng = random.Random()
        self.pause_s = 0.0  # a back-off before the next request, after a 429, a 503 or a refused connection
        self.next_arrival = time.monotonic()
        if load_test.options.arrival_rate:
            self.wait()  # until its first arrival; locust stops a waiting user at once, a sleeping one not

    def wait_time(self) -> float:
        pause, self.pause_s = self.pause_s, 0.0
        if not load_test.options.arrival_rate:
            return pause
        now = time.monotonic()
        self.next_arrival += self._gap()
        # Arrivals while this user was busy or pausing are dropped, as an open loop with a cap on requests
        # in flight drops them: sending them late would hide their wait from the latencies.
        while self.next_arrival < now + pause:
            load_test.dropped += 1
            self.next_arrival += self._gap()
        return self.next_arrival - now

    def _gap(self) -> float:
        # Each user's arrivals are Poisson at rate/users, so together they are Poisson at the rate,
        # also while users are still being spawned.
        users = max(1, self.environment.runner.user_count)
        return self.rng.expovariate(load_test.options.arrival_rate / users)

    @task
    def complete(self) -> None:
        if load_test.issuing_s is not None or not load_test.take_turn(self.environment.runner):
            raise StopUser()  # the test is stopping (-t, or --max-requests sent) as this user woke
        workload = load_test.workload
        draw = workload.draw(self.rng)
        record = Record(
            budget=draw.budget,
            prompt_index=draw.prompt_index,
            start_s=round(load_test.clock(), 6),
            stream=draw.stream,
            max_tokens=workload.max_tokens,
            temperature=workload.temperature,
        )
        started = time.perf_counter()
        try:
            with self.client.post(
                workload.path,
                json=workload.body(draw),
                headers=load_test.headers,
                stream=True,  # the body is read below, so that its time and its failures count too
                timeout=load_test.options.timeout,
                name=f"{workload.endpoint} budget={draw.budget}",
                catch_response=True,
            ) as response:
                self._read(response, record, started, draw.stream, draw.cancel)
                record.latency_s = round(time.perf_counter() - started, 6)
                # locust timed the request up to its headers; its table should show the whole request
                response.request_meta["response_time"] = record.latency_s * 1000
                if record.status == "ok":
                    response.success()
                else:
                    response.failure(f"{record.status}: {record.error}")
        except GreenletExit:  # the test stopped with this request in flight (see --stop-timeout)
            record.status, record.error = "cancelled", "still in flight when the test stopped"
            raise
        except Exception as error:  # a fault here, or a --host requests cannot use: locust logs it too
            record.status, record.error = type(error).__name__, str(error)
            raise
        finally:
            if record.latency_s is None:
                record.latency_s = round(time.perf_counter() - started, 6)
            load_test.records.append(record)
        self._tally(record)

    def _read(self, response, record: Record, started: float, stream: bool, cancel: bool) -> None:
        """Fill the record from the response. A failure becomes its status, never an exception."""
        try:
            if response.status_code == 0:  # no response at all: locust's client kept the exception
                raise response.error
            if not response.ok:
                record.status, record.error = str(response.status_code), error_message(response.content)
                self.pause_s = _back_off(response, self.rng)
                return
            if stream:
                reading = read_stream(
                    response.iter_lines(chunk_size=None), started, stop_at_first_content=cancel
                )
            else:
                reading = read_whole(response.content)
        except requests.RequestException as error:
            record.status, record.error = _failure_kind(error), str(error)
            if record.status == "connection":
                self.pause_s = 1.0  # a refused connection fails at once: do not spin on a dead server
            return
        except ValueError as error:  # a body that is not the JSON the API promises
            record.status, record.error = "bad_response", str(error)
            return
        record.ttft_s = None if reading.ttft_s is None else round(reading.ttft_s, 6)
        record.prompt_tokens, record.output_tokens = reading.prompt_tokens, reading.output_tokens
        if reading.ttt is not None:
            record.take_ttt(reading.ttt)
        if reading.stream_error is not None:
            record.status, record.error = "stream_error", reading.stream_error
        elif reading.abandoned:
            response.close()  # with the body unread, this closes the connection: the server sees a client gone
            record.status, record.error = CLIENT_CANCELLED, "closed by the client after the first chunk"
        else:
            record.answer_hash = answer_hash(reading.text)

    def _tally(self, record: Record) -> None:
        """One `ttt` event per answered request, so locust's table and CSV count decisions per budget."""
        if record.status != "ok" or record.decision is None:
            return
        self.environment.events.request.fire(
            request_type="ttt",
            name=f"budget={record.budget} {record.decision}",
            # the event's time columns then show training time per budget and decision
            response_time=(record.training_seconds or 0.0) * 1000,
            response_length=0,
            exception=None,
            context={},
        )


def _back_off(response, rng: random.Random) -> float:
    """After a 429 or a 503, wait what Retry-After says; else 0.25-1 s after a 429, 1 s after a 503."""
    if response.status_code not in (429, 503):
        return 0.0
    try:
        return min(float(response.headers["Retry-After"]), MAX_PAUSE_S)
    except (KeyError, ValueError):  # absent, or an HTTP date
        return rng.uniform(0.25, 1.0) if response.status_code == 429 else 1.0


def _failure_kind(error: requests.RequestException) -> str:
    # requests wraps a read timeout in the middle of a body in a ConnectionError
    if isinstance(error, requests.Timeout) or any(
        isinstance(arg, urllib3.exceptions.TimeoutError) for arg in error.args
    ):
        return "timeout"
    if isinstance(error, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
        return "connection"  # refused, reset, or a body cut short
    return type(error).__name__


# --- the run's start, stop and exit status ----------------------------------------------------------------
@events.test_start.add_listener
def start_run(environment, **_) -> None:
    global load_test
    if not isinstance(environment.runner, MasterRunner):  # a master sends no requests
        load_test = LoadTest(environment.parsed_options)


@events.test_stopping.add_listener
def stop_issuing(environment, **_) -> None:
    if load_test is not None:
        load_test.issuing_s = load_test.clock()


@events.test_stop.add_listener
def print_report(environment, **_) -> None:
    if load_test is None:
        return
    report = load_test.report()
    print("\n" + markdown(report) + "\n", flush=True)
    if load_test.options.report_json:
        try:
            write_json(report, Path(load_test.options.report_json))
        except OSError as error:
            load_test.json_error = f"could not write {load_test.options.report_json}: {error}"
            print(load_test.json_error, file=sys.stderr)


@events.quitting.add_listener
def set_exit_status(environment, **_) -> None:
    if load_test is not None:
        answered = any(r.status == "ok" for r in load_test.records)
        environment.process_exit_code = 0 if answered and load_test.json_error is None else 1
