"""The `ttserve` command line: index build / add / info, retrieve, run, and its errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.conftest import write_jsonl
from ttserve.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_datastore(tmp_path_factory, small_corpus):
    out = tmp_path_factory.mktemp("cli") / "ds"
    extra = write_jsonl(
        out.parent / "extra.jsonl", [{"text": "Kubernetes restarts pods whose liveness probe fails."}]
    )
    # --corpus takes several paths, as in `--corpus a.jsonl b.jsonl`.
    result = invoke("index", "build", "--corpus", small_corpus, extra, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "25 documents, 25 sequences (flat index" in result.output
    return out


def test_info_prints_the_manifest(cli_datastore):
    result = invoke("index", "info", cli_datastore)
    assert result.exit_code == 0
    manifest = json.loads(result.output)
    assert manifest["counts"]["sequences"] == 25 and manifest["embedder"]["dimension"] == 384


def test_retrieve_json_and_text(cli_datastore):
    result = invoke(
        "retrieve",
        cli_datastore,
        "what does a LoRA adapter change?",
        "--n",
        "3",
        "--strategy",
        "knn",
        "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["strategy"] == "knn" and len(payload["picks"]) == 3 and len(payload["variances"]) == 4
    assert payload["picks"][0]["doc_id"].startswith("lora-")
    text = invoke("retrieve", cli_datastore, "bake bread", "--n", "2", "--alpha", "1000")
    assert text.exit_code == 0 and "adaptive stop kept 0 of 2" in text.output


def test_add_then_run_against_it(cli_datastore, tmp_path):
    more = write_jsonl(
        tmp_path / "more.jsonl",
        [{"id": "tt", "text": "ttserve trains a LoRA adapter per prompt at test time."}],
    )
    added = invoke("index", "add", cli_datastore, "--corpus", more, "--quiet")
    assert added.exit_code == 0 and "26 documents, 26 sequences" in added.output
    config = tmp_path / "c.yaml"
    config.write_text(f"datastore:\n  path: {cli_datastore}\nretrieval:\n  strategy: knn\n")
    result = invoke("run", "--config", config, "-p", "test-time training of adapters", "--n", "1")
    assert result.exit_code == 0, result.output
    assert "26 documents" in result.output and "] tt#0" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("index", "build", "--out", "{tmp}/ds"), "at least one corpus path"),
        (
            ("index", "build", "--corpus", "{tmp}/bad.jsonl", "--out", "{tmp}/ds"),
            "bad.jsonl:2: malformed JSON",
        ),
        (("index", "info", "{tmp}"), "not a ttserve datastore"),
        (("retrieve", "{tmp}", "hello"), "not a ttserve datastore"),
        (("retrieve", "{ds}", "hello", "--strategy", "random"), "unknown strategy"),
        (
            ("index", "build", "--corpus", "{tmp}/bad.jsonl", "--out", "{tmp}/ds", "--index-type", "lsh"),
            "index_type",
        ),
    ],
)
def test_errors_exit_2_with_a_message(tmp_path, cli_datastore, args, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": nope}\n')
    result = invoke(*(a.format(tmp=tmp_path, ds=cli_datastore) for a in args))
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "ds").exists()


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "ttserve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "index" in result.stdout and "retrieve" in result.stdout


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_waits_for_ctrl_c_and_sigterm_stops_it_as_cleanly(signal_number):
    """`ttserve serve`'s wait once it is ready (test_soak stops a whole server with Ctrl-C): a signal sent as
    soon as it says it is ready, as a load test or a service manager sends it, ends the wait the same way."""
    waiting = (
        "from ttserve.serving.app import wait_for_interrupt\n"
        "try:\n"
        "    wait_for_interrupt(lambda: print('ready', flush=True))\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped')\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", waiting],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even under a background shell
    )
    try:
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal_number)
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert (out, child.returncode) == ("stopped\n", 0)
