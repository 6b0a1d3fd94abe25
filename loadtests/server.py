"""`ttserve serve` as a subprocess of a load test: on a free loopback port, ready once it logs that it is
serving, stopped with SIGTERM (which it handles as Ctrl-C) or SIGINT. If it does not stop in time, its whole
process tree (Ray's processes included) is killed, so a scenario never leaves a server behind.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

READY = re.compile(r"ttserve is serving (\S+) at (http://\S+)/v1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_model(url: str) -> str:
    """The model id a running server lists first (GET /v1/models)."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        return json.load(response)["data"][0]["id"]


class ServeProcess:
    """One `ttserve serve` run; its output goes to `log_path`."""

    def __init__(self, serve_args: list[str], env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.command = [sys.executable, "-m", "ttserve", "serve", "--host", "127.0.0.1"]
        self.command += ["--port", str(self.port), *serve_args]
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.model = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float) -> ServeProcess:
        """Start it and wait until it serves; raises RuntimeError (with the log's tail) if it exits or takes
        longer than `timeout_s`, after stopping it."""
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # SIGINT as a terminal delivers it, even when this runs in the background of a
                # non-interactive shell: that leaves SIGINT ignored, and a child inherits the ignore.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        deadline = time.monotonic() + timeout_s
        while (ready := READY.search(self.log_path.read_text(errors="replace"))) is None:
            failed = "exited" if self.process.poll() is not None else None
            if failed is None and time.monotonic() > deadline:
                failed = f"was not serving after {timeout_s:g} s"
            if failed:
                self.stop(timeout_s=30)
                raise RuntimeError(f"ttserve serve {failed}; the end of its log:\n{self.log_tail()}")
            time.sleep(0.5)
        self.model, self.url = ready.groups()
        return self

    def stop(self, timeout_s: float, signal_number: int = signal.SIGTERM) -> int | None:
        """`signal_number` (SIGINT: Ctrl-C), then wait; past `timeout_s`, kill it and every process under it.
        Returns its exit code (None if it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        tree = _descendants(self.process.pid)
        self.process.send_signal(signal_number)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            for process in [*tree, *_descendants(self.process.pid)]:
                _kill(process)
            self.process.kill()
            self.process.wait(30)
            return None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(process: psutil.Process) -> None:
    try:
        process.kill()
    except psutil.NoSuchProcess:
        pass
