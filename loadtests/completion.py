"""Reading one completion response, whole or streamed, into what the report needs.

No locust and no HTTP client here: the locustfile hands over the body's bytes or its lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass
class Reading:
    ttft_s: float | None = None  # streaming only: time to the first non-empty piece of content
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    ttt: dict[str, Any] | None = None  # the response's `ttt` object
    stream_error: str | None = None  # the message of an error event in the middle of a stream
    text: str = ""  # the answer (the first choice's), as far as it was read
    abandoned: bool = False  # the reader stopped after the first piece of content, on purpose

    def take(self, obj: dict[str, Any]) -> None:
        """Keep the usage and the ttt object of a response or of a chunk, whichever carries them."""
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens")
            self.output_tokens = usage.get("completion_tokens")
        if isinstance(obj.get("ttt"), dict):
            self.ttt = obj["ttt"]


def read_whole(body: bytes) -> Reading:
    reading = Reading()
    response = json.loads(body)
    reading.take(response)
    first = (response.get("choices") or [{}])[0]
    if isinstance(first, dict):  # a chat answer carries a message, a text completion carries text
        reading.text = (first.get("message") or {}).get("content") or first.get("text") or ""
    return reading


def read_stream(
    lines: Iterable[bytes],
    started: float,
    clock: Callable[[], float] = time.perf_counter,
    stop_at_first_content: bool = False,
) -> Reading:
    """Server-sent events: `data: {chunk}` lines, up to `data: [DONE]`; with `stop_at_first_content`, only
    up to the first non-empty piece of content (the caller then closes the connection: a client gone)."""
    reading, pieces = Reading(), 0
    for line in lines:
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, keep-alives
        data = line[len(b"data:") :].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            reading.stream_error = error_message(chunk)
            continue
        for choice in chunk.get("choices") or ():
            # chat chunks carry a delta, text-completion chunks carry text
            text = (choice.get("delta") or {}).get("content") or choice.get("text")
            if text:
                pieces += 1
                if choice.get("index", 0) == 0:
                    reading.text += text
                if reading.ttft_s is None:
                    reading.ttft_s = clock() - started
        reading.take(chunk)
        if stop_at_first_content and pieces:
            reading.abandoned = True
            return reading
    if reading.output_tokens is None:  # a server that ignores include_usage: count the pieces of text
        reading.output_tokens = pieces
    return reading


def error_message(body: bytes | dict[str, Any]) -> str:
    """The message of an OpenAI-style error body, else the body itself."""
    try:
        parsed = json.loads(body) if isinstance(body, bytes) else body
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error", parsed)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return body.decode("utf-8", "replace").strip() if isinstance(body, bytes) else json.dumps(body)
