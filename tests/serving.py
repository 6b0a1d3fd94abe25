"""Helpers for tests that talk to a running server: uvicorn in a thread, the official `openai` client."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import openai

from ttserve.config import Settings

CODE_PROMPT = "def parse_config(path):\n    with open(path) as handle:\n        return"


def metric_values(text: str, sample: str, by: str, **labels: str) -> dict[str, float]:
    """{value of label `by`: sample value} for the samples named `sample` (with these labels too) in a
    Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.labels[by]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and by in s.labels and labels.items() <= s.labels.items()
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_app_on_serve(args: dict, **start_options) -> str:
    """Start Serve on a free local port and run ttserve's app built from `args` (`build_app`'s: overrides,
    deployments) on it, without waiting for its replicas; the base URL. Ray must be initialised."""
    from ray import serve

    from ttserve.serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, **start_options)
    serve.run(build_app(args), name="ttserve", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}"


class ServerThread:
    """uvicorn serving an app on a free local port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Running:
    url: str
    replica: object  # the in-process GeneratorReplica (None when the server runs elsewhere)
    settings: Settings
    model: str

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)


def chat(running: Running, content: str = CODE_PROMPT, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 12, **kwargs}
    return running.client().chat.completions.create(
        model=running.model, messages=[{"role": "user", "content": content}], **kwargs
    )


def ttt_of(response) -> dict:
    return response.model_extra["ttt"] if "ttt" in (response.model_extra or {}) else response.ttt
