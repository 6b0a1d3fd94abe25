"""The locust load test: its report, its request and response handling, and one short run against the server.

The run is a subprocess: locust monkey-patches the standard library with gevent on import, which must not
happen inside pytest's process. The other modules import no locust and are tested here directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.completion import error_message, read_stream, read_whole
from loadtests.report import Record, build_report, fallback_kind, markdown, percentile, run_config, write_json
from loadtests.workload import DEFAULT_BUDGET, Workload, parse_budget_mix

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
    "stream": True,
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
    report = build_report(records, CONFIG | {"stream": False}, ["default", "16", "2"], 1.0, 1.0)
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


def test_request_bodies_carry_the_budget_and_the_ttt_object():
    workload = Workload(
        endpoint="chat",
        model="m",
        budget_mix={"8": 1.0, DEFAULT_BUDGET: 1.0},
        prompts=["hello"],
        max_tokens=4,
        temperature=0.0,
        stream=True,
        ttt={"mode": "always"},
    )
    body = workload.body("8", 0)
    assert body["compute_budget"] == 8 and body["ttt"] == {"mode": "always"}
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["stream_options"] == {"include_usage": True}
    assert "compute_budget" not in workload.body(DEFAULT_BUDGET, 0)  # the server's default applies


# --- one run against the server -------------------------------------------------------------------------
@pytest.mark.slow
def test_a_short_locust_run_tallies_decisions_per_budget(running, tmp_path):
    report_json = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", "2", "-r", "2", "-t", "4s", "--stop-timeout", "30",
        "--host", running.url, "--model", running.model, "--max-tokens", "8",
        "--budget-mix", "0:0.5,2:0.5", "--ttt-mode", "always", "--report-json", str(report_json),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    rows = table(done.stdout[done.stdout.index("## ttserve load test") :])
    assert set(rows) == {"all", "0", "2"}
    assert rows["all"]["errors"] == "0" and int(rows["all"]["ok"]) > 0
    zero, two = rows["0"], rows["2"]
    assert int(zero["ok"]) > 0 and zero["skipped"] == zero["ok"]
    assert int(two["ok"]) > 0 and int(two["trained"]) + int(two["reused"]) == int(two["ok"])
    # locust's own table (on stderr) has a row per budget and one per budget and decision
    assert "chat budget=2" in done.stderr and "budget=0 skipped" in done.stderr

    saved = json.loads(report_json.read_text())
    assert len(saved["records"]) == int(rows["all"]["requests"])
    assert all(r["status"] == "ok" for r in saved["records"])
