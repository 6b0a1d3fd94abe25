"""The locust load test: its report, its request and response handling, the prompts, the server monitor, the
scenarios' checks and plots, and one short run against the server.

The run is a subprocess: locust monkey-patches the standard library with gevent on import, which must not
happen inside pytest's process. The other modules import no locust and are tested here directly. The soak
scenario end to end is tests/test_soak.py.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loadtests import checks
from loadtests.completion import error_message, read_stream, read_whole
from loadtests.monitor import Monitor, Sample, adapters_on_disk, read_gauges, slope_per_min, summarise
from loadtests.plots import window_width, write_plots
from loadtests.prompts import DEFAULT_PROMPTS, prompt_source, stdlib_prompts
from loadtests.report import (
    CLIENT_CANCELLED,
    Record,
    answer_check,
    answer_hash,
    build_report,
    fallback_kind,
    markdown,
    percentile,
    run_config,
    write_json,
)
from loadtests.workload import DEFAULT_BUDGET, Draw, Workload, parse_budget_mix

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"


def ok(budget: str, latency: float, decision: str, **fields) -> Record:
    return Record(budget=budget, prompt_index=0, start_s=0.0, latency_s=latency, decision=decision, **fields)


def failed(budget: str, status: str, error: str) -> Record:
    return Record(budget=budget, prompt_index=0, start_s=0.0, status=status, latency_s=0.01, error=error)


CONFIG = {
    "host": "http://127.0.0.1:8000",
    "endpoint": "chat",
    "model": "m",
    "stream_share": 1.0,
    "max_tokens": 16,
    "budget_mix": "0:0.7,8:0.2,32:0.1",
    "num_users": 4,
}


def table(text: str) -> dict[str, dict[str, str]]:
    """The markdown report's table: row name -> column name -> cell."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ")
    ]
    head, body = rows[0], rows[1:]
    return {row[0]: dict(zip(head, row, strict=True)) for row in body}


# --- report.py ------------------------------------------------------------------------------------------
def test_percentiles_interpolate_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_report_has_a_row_per_budget_with_its_own_statistics():
    records = [
        ok("0", 0.1, "skipped", output_tokens=10, ttft_s=0.05),
        ok("0", 0.3, "skipped", output_tokens=10, ttft_s=0.07),
        ok("8", 2.0, "trained", output_tokens=10, steps=8, training_seconds=1.5, ttft_s=1.6),
        ok("8", 1.0, "reused", output_tokens=10, steps=8, training_seconds=0.0, ttft_s=0.6),
        failed("8", "429", "4 requests in flight; retry later"),
    ]
    report = build_report(records, CONFIG, budgets=["0", "8", "32"], elapsed_s=2.0, issuing_s=1.5)
    assert list(report["by_budget"]) == ["0", "8", "32"]  # 32 drew no request and still has a row
    zero, eight = report["by_budget"]["0"], report["by_budget"]["8"]
    assert zero["requests"] == 2 and zero["ok"] == 2 and zero["latency_s"]["p50"] == pytest.approx(0.2)
    assert eight["requests"] == 3 and eight["ok"] == 2 and eight["errors"] == {"429": 1}
    assert eight["throughput_rps"] == 1.0 and eight["output_tokens_per_s"] == 10.0
    assert eight["ttt"]["mean_training_seconds"] == 1.5  # over trained responses only, not reused ones
    assert report["overall"]["requests"] == 5 and report["overall"]["ttft_s"]["p50"] == pytest.approx(0.335)

    rows = table(markdown(report))
    assert list(rows) == ["all", "0", "8", "32"]
    assert rows["0"]["skipped"] == "2" and rows["0"]["trained"] == "0"
    assert rows["8"]["trained"] == "1" and rows["8"]["reused"] == "1" and rows["8"]["errors"] == "429×1"
    assert rows["32"]["requests"] == "0" and rows["32"]["p50 s"] == "–"
    assert rows["all"]["TTFT p50 s"] == "0.335"


def test_default_budget_sorts_after_the_numbers_and_ttft_needs_streaming():
    records = [ok("default", 0.1, "skipped"), ok("16", 0.1, "skipped"), ok("2", 0.1, "skipped")]
    report = build_report(records, CONFIG | {"stream_share": 0.0}, ["default", "16", "2"], 1.0, 1.0)
    assert list(report["by_budget"]) == ["2", "16", DEFAULT_BUDGET]
    assert report["overall"]["ttft_s"] is None
    assert "TTFT p50 s" not in markdown(report)


def test_decisions_count_answered_requests_and_keep_unknown_ones():
    records = [
        ok("8", 1.0, "fallback", reason="plan; the training queue is full; answered with the base model"),
        ok("8", 1.0, "postponed"),  # a decision a newer server might send
        ok("8", 1.0, None),  # an answer without a ttt object
        failed("8", "timeout", "read timed out"),
    ]
    ttt = build_report(records, CONFIG, ["8"], 1.0, 1.0)["overall"]["ttt"]
    assert ttt["decisions"] == {"trained": 0, "reused": 0, "skipped": 0, "fallback": 1, "postponed": 1}
    assert ttt["missing"] == 1


def test_errors_are_counted_by_kind_with_the_first_message_of_each():
    records = [
        failed("0", "429", "first 429"),
        failed("0", "429", "second 429"),
        failed("0", "connection", "refused"),
        ok("0", 0.1, "skipped"),
    ]
    report = build_report(records, CONFIG, ["0"], 1.0, 1.0)
    assert report["overall"]["errors"] == {"429": 2, "connection": 1}
    assert report["error_examples"] == {"429": "first 429", "connection": "refused"}
    text = markdown(report)
    assert table(text)["all"]["errors"] == "429×2 connection×1"
    assert "- 429: first 429" in text and "second 429" not in text


def test_fallback_reasons_group_with_numbers_blanked():
    deadline = "train 8 steps; training could not finish within the deadline ({} s queued); answered with the base model"
    records = [
        ok("8", 1.0, "fallback", reason=deadline.format(12.5)),
        ok("8", 1.0, "fallback", reason=deadline.format(40)),
        ok("8", 1.0, "fallback", reason="retrieval failed: boom"),
    ]
    report = build_report(records, CONFIG, ["8"], 1.0, 1.0)
    assert report["fallback_reasons"] == {
        "training could not finish within the deadline (N s queued)": 2,
        "retrieval failed: boom": 1,
    }
    assert fallback_kind("budget 0 in 3.5 s") == "budget N in N s"
    assert "- 2 × training could not finish within the deadline (N s queued)" in markdown(report)


def test_json_report_has_every_record_and_no_secret(tmp_path):
    options = CONFIG | {"api_key": "sk-very-secret", "web_login": "admin:hunter2", "ttt_mode": "always"}
    records = [ok("0", 0.1, "skipped"), failed("0", "503", "loading")]
    path = tmp_path / "report.json"
    write_json(build_report(records, run_config(options), ["0"], 1.0, 1.0), path)
    text = path.read_text()
    assert "sk-very-secret" not in text and "hunter2" not in text
    saved = json.loads(text)
    assert saved["config"]["ttt_mode"] == "always" and saved["config"]["model"] == "m"
    assert [r["status"] for r in saved["records"]] == ["ok", "503"]


def answer(
    prompt: int, adapter: str | None, text: str, max_tokens: int = 8, temperature: float = 0.0
) -> Record:
    """A complete answer to prompt `prompt` with `adapter` (None: the base model)."""
    return Record(
        budget="4", prompt_index=prompt, start_s=0.0, max_tokens=max_tokens, temperature=temperature,
        latency_s=0.1, decision="reused", adapter_id=adapter, answer_hash=answer_hash(text),
    )  # fmt: skip


def test_the_wrong_adapter_check_passes_equal_answers_and_catches_a_different_one():
    same = [answer(0, "a1", "x"), answer(0, "a1", "x"), answer(0, None, "base"), answer(0, None, "base")]
    check = answer_check(same)
    assert check == {"groups_checked": 2, "answers_checked": 4, "mismatches": []}

    apart = [
        answer(0, "a1", "x"),
        answer(0, "a2", "y"),  # another adapter: another group
        answer(1, "a1", "z"),  # another prompt
        answer(0, "a1", "w", max_tokens=16),  # another length
        answer(0, "a1", "v", temperature=0.7),  # sampled: not checked
        failed("4", "503", "busy"),
    ]
    assert answer_check(apart) == {"groups_checked": 0, "answers_checked": 0, "mismatches": []}

    wrong = [answer(3, "a1", "x"), answer(3, "a1", "x"), answer(3, "a1", "from another adapter")]
    check = answer_check(wrong)
    assert check["groups_checked"] == 1 and len(check["mismatches"]) == 1
    mismatch = check["mismatches"][0]
    assert mismatch["prompt_index"] == 3 and mismatch["adapter_id"] == "a1" and mismatch["max_tokens"] == 8
    assert sorted(mismatch["answers"].values()) == [1, 2]
    report = build_report(wrong, CONFIG, ["4"], 1.0, 1.0)
    assert report["answer_check"] == check
    assert "Wrong-adapter check: 1 groups of identical greedy requests (3 answers), 1 with differing" in (
        markdown(report)
    )


def test_client_cancellations_are_counted_on_their_own_not_as_errors():
    cancelled = Record("0", 0, 0.0, stream=True, status=CLIENT_CANCELLED, latency_s=0.2, ttft_s=0.1)
    records = [cancelled, ok("0", 0.3, "skipped"), failed("0", "429", "busy")]
    report = build_report(records, CONFIG | {"cancel_share": 0.5}, ["0"], 1.0, 1.0)
    overall = report["overall"]
    assert overall["client_cancelled"] == 1 and overall["errors"] == {"429": 1} and overall["ok"] == 1
    assert CLIENT_CANCELLED not in report["error_examples"]
    text = markdown(report)
    assert table(text)["all"]["client cancelled"] == "1" and table(text)["all"]["errors"] == "429×1"
    assert "50% of streams abandoned after their first chunk" in text
    assert "client cancelled" not in markdown(build_report(records, CONFIG, ["0"], 1.0, 1.0))


# --- completion.py and workload.py ----------------------------------------------------------------------
def sse(*chunks) -> list[bytes]:
    return [line for c in chunks for line in (f"data: {json.dumps(c)}".encode(), b"")] + [b"data: [DONE]"]


def test_a_stream_times_the_first_content_and_takes_ttt_from_the_last_chunk():
    times = iter([10.25])  # the clock is read once, at the first non-empty piece of content
    lines = sse(
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "def"}}]},
        {"choices": [{"delta": {"content": " f"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}, "ttt": {"decision": "reused"}},
    )
    reading = read_stream(lines, started=10.0, clock=lambda: next(times))
    assert reading.ttft_s == 0.25 and reading.output_tokens == 2 and reading.prompt_tokens == 7
    assert reading.ttt == {"decision": "reused"} and reading.stream_error is None
    assert reading.text == "def f" and not reading.abandoned


def test_a_stream_read_for_cancelling_stops_at_the_first_content():
    lines = iter(
        sse(
            {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"delta": {"content": "def"}}]},
            {"choices": [{"delta": {"content": " f"}}]},
        )
    )
    reading = read_stream(lines, started=0.0, clock=lambda: 0.5, stop_at_first_content=True)
    assert reading.abandoned and reading.text == "def" and reading.ttft_s == 0.5
    assert next(lines) == b""  # the rest of the stream was left unread, for the caller to close


def test_a_stream_reports_an_error_event_and_counts_text_without_usage():
    lines = sse(
        {"choices": [{"text": "a"}]},
        {"choices": [{"text": "b"}]},
        {"error": {"message": "generation failed", "type": "server_error"}},
    )
    reading = read_stream(lines, started=0.0, clock=lambda: 1.0)
    assert reading.stream_error == "generation failed" and reading.output_tokens == 2


def test_whole_responses_and_error_bodies():
    body = {
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5},
        "ttt": {"decision": "skipped"},
    }
    reading = read_whole(json.dumps(body).encode())
    assert reading.output_tokens == 5 and reading.ttt["decision"] == "skipped" and reading.ttft_s is None
    chat_answer = {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}
    assert read_whole(json.dumps(chat_answer).encode()).text == "hi"
    assert read_whole(json.dumps({"choices": [{"text": "def"}]}).encode()).text == "def"
    assert error_message(b'{"error": {"message": "budget above 64", "type": "invalid_request_error"}}') == (
        "budget above 64"
    )
    assert error_message(b"<html>Bad Gateway</html>\n") == "<html>Bad Gateway</html>"


def test_budget_mix_parsing():
    assert parse_budget_mix("0:0.7, 8:0.2,08:0.1,default") == {
        "0": 0.7,
        "8": pytest.approx(0.3),
        "default": 1.0,
    }
    for bad in ("", "x:1", "8:-1", "8:nan", "0:0", "8:lots"):
        with pytest.raises(ValueError):
            parse_budget_mix(bad)


def workload(**fields) -> Workload:
    defaults = dict(
        endpoint="chat",
        model="m",
        budget_mix={"8": 1.0, DEFAULT_BUDGET: 1.0},
        prompts=["hello"],
        max_tokens=4,
        temperature=0.0,
        stream_share=1.0,
        ttt={"mode": "always"},
    )
    return Workload(**defaults | fields)


def test_request_bodies_carry_the_budget_and_the_ttt_object():
    body = workload().body(Draw("8", 0, stream=True, cancel=False))
    assert body["compute_budget"] == 8 and body["ttt"] == {"mode": "always"}
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["stream_options"] == {"include_usage": True}
    whole = workload().body(Draw(DEFAULT_BUDGET, 0, stream=False, cancel=False))
    assert "compute_budget" not in whole  # the server's default applies
    assert "stream" not in whole and "stream_options" not in whole


def test_a_share_of_requests_is_streamed_and_only_streams_are_cancelled():
    rng = random.Random(7)
    draws = [workload(stream_share=0.5, cancel_share=0.5).draw(rng) for _ in range(400)]
    streams = [d for d in draws if d.stream]
    assert 150 < len(streams) < 250
    assert all(d.stream for d in draws if d.cancel)
    assert 0 < sum(d.cancel for d in streams) < len(streams)
    never = [workload(stream_share=0.0, cancel_share=1.0).draw(rng) for _ in range(50)]
    assert not any(d.stream or d.cancel for d in never)
    always = [workload(stream_share=1.0, cancel_share=1.0).draw(rng) for _ in range(50)]
    assert all(d.stream and d.cancel for d in always)


# --- prompts.py -----------------------------------------------------------------------------------------
def test_prompt_sources(tmp_path):
    assert prompt_source("builtin") == DEFAULT_PROMPTS and len(DEFAULT_PROMPTS) == 20
    every = prompt_source("stdlib")
    assert len(every) >= 300 and len(set(every)) == len(every)  # distinct, for fresh trainings
    assert every == stdlib_prompts()  # the same on every call
    assert prompt_source("stdlib:50") == every[:50]
    modules = {p.split("`")[1].split(".")[0] for p in every[:50]}
    assert len(modules) >= 40  # the first ones take one name per module in turn
    assert "What does `json.dumps` do?" in every
    path = tmp_path / "prompts.txt"
    path.write_text('plain prompt\n\n"with\\na newline"\n')
    assert prompt_source(str(path)) == ["plain prompt", "with\na newline"]
    for bad in ("stdlib:0", "stdlib:x", str(tmp_path / "missing.txt")):
        with pytest.raises((ValueError, OSError)):
            prompt_source(bad)


# --- monitor.py -----------------------------------------------------------------------------------------
def test_slopes_are_per_minute_and_leave_the_warm_up_out():
    assert slope_per_min([(0.0, 10.0), (30.0, 11.0), (60.0, 12.0)]) == pytest.approx(2.0)
    assert slope_per_min([(5.0, 1.0)]) is None and slope_per_min([(5.0, 1.0), (5.0, 2.0)]) is None
    # memory jumps while warming up, then stays flat
    samples = [Sample(t_s=t, unix_s=t, rss_mb=100.0 if t < 20 else 500.0, threads=10) for t in range(100)]
    samples[-1].threads = 12
    for s in samples:  # one process grows by 1 MB a minute, another stays flat
        s.rss_mb_by_process = {"ray::Generator": 300.0 + s.t_s / 60, "raylet": 50.0}
    summary = summarise(samples, warmup_fraction=0.25)
    assert summary["rss_slope_per_min_by_process"] == {"ray::Generator": pytest.approx(1.0), "raylet": 0.0}
    rss, threads = summary["series"]["rss_mb"], summary["series"]["threads"]
    assert rss["slope_per_min"] == pytest.approx(0.0) and rss["warmup_max"] == 500.0 and rss["max"] == 500.0
    assert threads["last"] == 12 and threads["warmup_max"] == 10
    assert "fds" not in summary["series"]  # never measured
    assert summarise([]) == {"samples": 0, "series": {}}


METRICS_TEXT = """\
# HELP ttserve_requests_in_flight requests being answered
# TYPE ttserve_requests_in_flight gauge
ttserve_requests_in_flight 3.0
# HELP ttserve_generator_adapters_cached adapters in the cache
# TYPE ttserve_generator_adapters_cached gauge
ttserve_generator_adapters_cached 4.0
# HELP ttserve_generator_adapter_evictions_total adapters evicted
# TYPE ttserve_generator_adapter_evictions_total counter
ttserve_generator_adapter_evictions_total 17.0
# HELP ttserve_requests_total HTTP requests
# TYPE ttserve_requests_total counter
ttserve_requests_total{endpoint="chat",status="200"} 12.0
"""


def test_metrics_gauges_are_read_when_present():
    gauges = read_gauges(METRICS_TEXT)
    assert gauges == {"requests_in_flight": 3.0, "adapters_cached": 4.0, "adapter_evictions": 17.0}
    assert read_gauges("") == {}
    # Under Ray, one series per Generator replica: the server's figure is their sum.
    per_replica = METRICS_TEXT.replace(
        "ttserve_generator_adapters_cached 4.0",
        'ttserve_generator_adapters_cached{replica="a"} 4.0\nttserve_generator_adapters_cached{replica="b"} 2.0',
    )
    assert read_gauges(per_replica)["adapters_cached"] == 6.0


def test_adapters_on_disk_counts_finished_adapter_directories(tmp_path):
    replica = tmp_path / "ttserve-adapters-123-abc"
    for name in ("adapter-1", "adapter-2", ".adapter-3.building-xyz"):  # the last one is still being written
        (replica / name).mkdir(parents=True)
    (tmp_path / "ttserve-adapters-456-def" / "adapter-9").mkdir(parents=True)
    (tmp_path / "unrelated" / "adapter-1").mkdir(parents=True)
    assert adapters_on_disk(tmp_path) == 3
    assert adapters_on_disk(tmp_path / "missing") == 0


def test_the_monitor_samples_a_process_tree(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monitor = Monitor(pid=os.getpid(), metrics_url="http://127.0.0.1:9/metrics", scratch_dir=tmp_path)
        sample = monitor.sample()
    finally:
        child.kill()
        child.wait()
    assert sample.processes >= 2 and sample.threads >= 2 and sample.fds > 0 and sample.rss_mb > 0
    assert sum(sample.rss_mb_by_process.values()) == pytest.approx(sample.rss_mb, abs=1.0)
    assert sample.adapters_on_disk == 0 and sample.gauges == {}
    assert monitor.errors and "URLError" in monitor.errors[0]  # nothing listens there: noted, not raised
    started = Monitor(scratch_dir=tmp_path, interval_s=0.01).start()
    assert len(started.stop()) >= 2  # the thread's first sample, and a last one on stop
    assert all(s.rss_mb is None for s in started.samples)


# --- checks.py and plots.py -----------------------------------------------------------------------------
def series(**values) -> dict:
    return {
        "series": {
            name: {"max": m, "last": last, "warmup_max": w, "slope_per_min": 0.0}
            for name, (m, last, w) in values.items()
        }
    }


def adapters(cached: int, loaded: int | None, on_disk: int, in_flight: int = 2) -> Sample:
    gauges = {"adapters_cached": cached, "requests_in_flight": in_flight}
    if loaded is not None:
        gauges["adapters_loaded"] = loaded
    return Sample(t_s=0.0, unix_s=0.0, adapters_on_disk=on_disk, gauges=gauges)


def test_adapter_bounds_hold_while_loaded_and_exactly_at_rest():
    # while loaded: trained adapters wait on disk, one is being added to the engine; at rest all agree
    good = [adapters(4, 5, 7), adapters(6, 6, 7), adapters(4, 4, 4, in_flight=0)]
    results = checks.adapter_bounds(good, max_adapters=4, users=2)
    assert [c.passed for c in results] == [True, True, True], results
    assert "at rest" in results[0].detail and "4 at rest, the cache 4" in results[2].detail

    over = [adapters(7, 9, 11), adapters(4, 4, 4, in_flight=0)]  # 7 > 4 + 2 cached, +2 engine, +4 disk
    assert [c.passed for c in checks.adapter_bounds(over, 4, users=2)] == [False, False, False]

    leaked = [adapters(4, 4, 5), adapters(4, 4, 5, in_flight=0)]  # a directory the cache no longer lists
    assert [c.passed for c in checks.adapter_bounds(leaked, 4, users=2)] == [True, True, False]
    kept = [adapters(4, 4, 4), adapters(5, 5, 5, in_flight=0)]  # over max_adapters with nothing in flight
    assert checks.adapter_bounds(kept, 4, users=2)[0].passed is False

    busy = [adapters(4, None, 4), adapters(4, None, 4)]  # never at rest; no adapters_loaded exported
    results = checks.adapter_bounds(busy, 4, users=2)
    assert [c.passed for c in results] == [True, None, True] and "not at rest" in results[0].detail
    assert checks.adapter_bounds([Sample(t_s=0.0, unix_s=0.0)], 4, 2)[0].passed is None


def test_growth_and_server_failure_checks():
    summary = series(fds=(120, 110, 100), threads=(40, 60, 40))
    assert checks.no_growth(summary, "fds", "fds", slack=16).passed
    assert not checks.no_growth(summary, "threads", "threads", slack=16).passed
    assert checks.no_growth(summary, "rss_mb", "memory", slack=0).passed is None
    load = build_report([ok("0", 0.1, "skipped"), failed("0", "503", "busy")], CONFIG, ["0"], 1.0, 1.0)
    assert checks.no_server_failures(load).passed and checks.only_refusals(load).passed
    load = build_report([ok("0", 0.1, "skipped"), failed("0", "500", "boom")], CONFIG, ["0"], 1.0, 1.0)
    assert not checks.no_server_failures(load).passed and not checks.only_refusals(load).passed
    assert "**FAIL**" in checks.markdown([checks.no_server_failures(load)])


def test_plots_are_written_as_png_files(tmp_path):
    records = [
        ok("0", 0.2, "skipped", output_tokens=8, ttft_s=0.1),
        ok("4", 1.5, "trained", output_tokens=8, ttft_s=1.2, adapter_id="a"),
        Record("4", 0, 3.0, stream=True, status=CLIENT_CANCELLED, latency_s=0.4, ttft_s=0.3),
        failed("4", "503", "busy"),
    ]
    records[1].start_s = 40.0
    report = build_report(records, CONFIG, ["0", "4"], elapsed_s=45.0, issuing_s=44.0, started_unix=1000.0)
    samples = [
        Sample(t_s=t, unix_s=1000.0 + t, rss_mb=500.0 + t, fds=100, threads=30, adapters_on_disk=1,
               gauges={"adapters_cached": 1.0})
        for t in range(0, 45, 5)
    ]  # fmt: skip
    paths = write_plots(json.loads(json.dumps(report)), [vars(s) for s in samples], tmp_path)
    assert [p.name for p in paths] == ["latency.png", "throughput.png", "outcomes.png", "resources.png"]
    for path in paths:
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
    assert len(write_plots(report, None, tmp_path / ".")) == 3  # no monitor: no resources plot
    assert window_width(45.0) == 2 and window_width(10.0) == 1 and window_width(1800.0) == 100


# --- one run against the server -------------------------------------------------------------------------
@pytest.mark.slow
def test_a_short_locust_run_tallies_decisions_per_budget_and_stops_after_its_requests(running, tmp_path):
    report_json = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", "2", "-r", "2", "-t", "120s", "--stop-timeout", "30", "--max-requests", "24",
        "--host", running.url, "--model", running.model, "--max-tokens", "8",
        "--budget-mix", "0:0.5,2:0.5", "--ttt-mode", "always", "--report-json", str(report_json),
        "--stream-share", "0.5", "--cancel-share", "0.5", "--prompts", "stdlib:10",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    rows = table(done.stdout[done.stdout.index("## ttserve load test") :])
    assert set(rows) == {"all", "0", "2"}
    assert rows["all"]["requests"] == "24"  # --max-requests ended the run long before -t
    assert rows["all"]["errors"] == "0" and int(rows["all"]["ok"]) > 0
    zero, two = rows["0"], rows["2"]
    assert int(zero["ok"]) > 0 and zero["skipped"] == zero["ok"]
    assert int(two["ok"]) > 0 and int(two["trained"]) + int(two["reused"]) == int(two["ok"])
    # locust's own table (on stderr) has a row per budget and one per budget and decision
    assert "chat budget=2" in done.stderr and "budget=0 skipped" in done.stderr

    saved = json.loads(report_json.read_text())
    records = saved["records"]
    assert len(records) == 24 and saved["config"]["max_requests"] == 24
    assert set(Counter(r["status"] for r in records)) <= {"ok", CLIENT_CANCELLED}
    assert all(r["stream"] for r in records if r["status"] == CLIENT_CANCELLED)
    assert all(r["answer_hash"] for r in records if r["status"] == "ok")
    assert all(r["max_tokens"] == 8 and r["temperature"] == 0 for r in records)
    assert saved["answer_check"]["mismatches"] == []
