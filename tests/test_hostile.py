"""Hostile input: the HTTP API under fuzzed and malicious requests, against the in-process server
(`running`: the tiny model, compute budget 0 unless a request asks).

1. Schema-driven fuzzing: schemathesis generates requests from the server's own OpenAPI document
   (/openapi.json), valid ones and ones that break it, a fixed number per operation, derandomized. Every
   answer: no 5xx (a 503 only with its documented meaning), a status the document lists, a body that
   conforms to the documented schema, every error an OpenAI error body, invalid data refused.
2. Hand-written hostile kinds (HOSTILE, RAW_HTTP, the API-key, method and slow-body tests): each states
   the status it expects, and every answer the app writes is `{"error": {"message", "type", "param",
   "code"}}`. The exceptions are requests that are not HTTP at all (two Content-Lengths, a control
   character in a header, a 100 KB request line, TLS bytes): uvicorn refuses those itself, before any app
   code runs, with a plain-text "400 Invalid HTTP request received." and a closed connection.
3. Afterwards the server answers identically: the same greedy text and `ttt` decision as before, the
   adapter trained before reused, nothing left in flight.

Names that reach the filesystem: none is request-controlled. Adapter directories are named by the
adapter's content key (adapter_cache.py), the model, datastore and cache paths come from settings, and the
request's `model` (or the /v1/models/{id} path) is only compared with the served name, so path traversal
and null bytes there are plain 404s (checked below).
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
from pydantic import SecretStr

from tests.serving import ServerThread

pytestmark = pytest.mark.slow

MODEL = "tiny-test"
GREEDY_PROMPT = "A request no other test sends: the hostile-input baseline."
TRAINED_PROMPT = "def hostile_input_baseline(request):\n    return"


def post(running, path: str, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{running.url}{path}", content=content, headers=headers, timeout=timeout)


def assert_openai_error(response: httpx.Response, param: str | None = None) -> dict:
    """The body is OpenAI's error object, exactly its four keys, with a message and a type."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    if response.status_code == 503:
        assert error["type"] == "service_unavailable", error
    else:
        assert response.status_code < 500, f"a {response.status_code}: {error}"
    if param is not None:
        assert error["param"] == param, error
    return error


def greedy(running) -> tuple[str, dict]:
    response = post(
        running,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": GREEDY_PROMPT}], "temperature": 0,
         "max_tokens": 12, "compute_budget": 0},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"], response.json()["ttt"]


def trained(running) -> tuple[str, dict]:
    response = post(
        running,
        "/v1/completions",
        {"model": MODEL, "prompt": TRAINED_PROMPT, "temperature": 0, "max_tokens": 8, "compute_budget": 2,
         "ttt": {"mode": "always"}},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"], response.json()["ttt"]


@pytest.fixture(scope="module", autouse=True)
def before(running):
    """What the server answers before the onslaught (every test here runs after this)."""
    return {"greedy": greedy(running), "trained": trained(running), "errors": server_errors(running)}


def server_errors(running) -> list[str]:
    """The server's count of 5xx answers, by endpoint and status."""
    metrics = httpx.get(f"{running.url}/metrics").text
    return [
        line
        for line in metrics.splitlines()
        if line.startswith("ttserve_requests_total") and 'status="5' in line
    ]


@pytest.fixture(scope="module")
def vocabulary(running) -> int:
    return len(running.replica.pipeline.engine.tokenizer)


# --- 1. schema-driven fuzzing ---------------------------------------------------------------------------------
FUZZ_EXAMPLES = {"POST": 50, "GET": 10}  # per operation and generation mode
FUZZ_DEADLINE_MS = 20_000  # one example: a hang, not a slow CPU
NEGATIVE = ("POST /v1/chat/completions", "POST /v1/completions")  # the operations with data to break
OPERATIONS = [
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "GET /health",
    "GET /metrics",
]


@pytest.fixture(scope="module")
def fuzz_schema(running, vocabulary):
    """The server's OpenAPI document, narrowed to what it serves so that valid requests reach the model:
    `model` is the served one, token ids are in the vocabulary, and the parameters refused by design are
    left out. Negative generation breaks the narrowed fields too (n = 2, empty stops): those are refused."""
    import schemathesis

    document = copy.deepcopy(httpx.get(f"{running.url}/openapi.json").json())
    schemas = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        fields = schemas[name]["properties"]
        fields["model"] = {"type": "string", "enum": [MODEL]}
        # What the server refuses by design, each with a 400 naming it (test_protocol.py holds those):
        # n > 1, empty stop strings. Valid requests here are ones it serves.
        fields["n"] = {"anyOf": [{"type": "integer", "enum": [1]}, {"type": "null"}]}  # null: the default
        fields["stop"]["anyOf"][:2] = [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        ]
    fields = schemas["CompletionRequest"]["properties"]
    fields["prompt"]["anyOf"] = [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": 64,
         "items": {"type": "integer", "minimum": 0, "maximum": vocabulary - 1}},
    ]  # fmt: skip
    fields["best_of"] = {"anyOf": [{"type": "integer", "enum": [1]}, {"type": "null"}]}
    fields["suffix"] = {"type": "null"}
    return schemathesis.openapi.from_dict(document)


def test_the_openapi_document_says_what_the_server_does(running):
    """Errors are OpenAI error bodies under the statuses the server answers (no FastAPI 422 body), and
    every bound is a JSON Schema keyword (pydantic writes `ge` on optional fields, which validators skip)."""
    document = httpx.get(f"{running.url}/openapi.json").json()
    text = json.dumps(document)
    assert "HTTPValidationError" not in text and '"ge"' not in text and '"le"' not in text
    budget = document["components"]["schemas"]["CompletionRequest"]["properties"]["compute_budget"]
    assert budget["anyOf"][0] == {"type": "integer", "minimum": 0}
    chat = document["paths"][CC]["post"]["responses"]
    assert set(chat) == {"200", "400", "401", "404", "408", "413", "422", "429", "500", "503"}
    assert chat["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def bounded(body: dict, max_budget: int, context: int) -> dict:
    """A valid request's cost, bounded: a budget the server would train with becomes 0, and a max_tokens
    it would decode becomes 4. Values it refuses are left as generated: they are what is being tested."""
    if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4  # chat's default is the rest of the context
    limits = {
        "compute_budget": (0, max_budget),
        "max_tokens": (4, context),
        "max_completion_tokens": (4, context),
    }
    for key, (cap, most) in limits.items():
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and cap < value <= most:
            if float(value).is_integer():
                body[key] = cap
    return body


def check_stream(response) -> None:
    """A streamed answer: server-sent events, each JSON, no server error among them, ending with [DONE]."""
    events = [line for line in response.text.split("\n\n") if line.strip()]
    assert events and events[-1] == "data: [DONE]", response.text[-500:]
    for event in events[:-1]:
        assert event.startswith("data: "), event
        data = json.loads(event.removeprefix("data: "))
        assert "error" not in data or data["error"]["type"] != "server_error", data


@pytest.mark.parametrize(
    ("operation", "mode"),
    [(op, "positive") for op in OPERATIONS] + [(op, "negative") for op in NEGATIVE],
)
def test_fuzzed_requests_get_documented_answers_and_no_server_error(running, fuzz_schema, operation, mode):
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    method, path = operation.split(" ")
    strategy = fuzz_schema[path][method].as_strategy(generation_mode=GenerationMode(mode))
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode == "negative":
        checks.append(negative_data_rejection)
    session = requests.Session()
    statuses: dict[int, int] = {}
    max_budget = running.settings.server.max_compute_budget
    context = running.replica.pipeline.engine.max_model_len

    @settings(
        max_examples=FUZZ_EXAMPLES[method],
        derandomize=True,  # the same examples on every run: CI is reproducible
        database=None,
        deadline=FUZZ_DEADLINE_MS,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case):
        if isinstance(case.body, dict):
            case.body = bounded(case.body, max_budget, context)
        response = case.call(base_url=running.url, session=session, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        headers = [(name, value) for name, values in response.headers.items() for value in values]
        answer = httpx.Response(response.status_code, headers=headers, content=response.content)
        if answer.status_code >= 400:
            assert_openai_error(answer)
        elif answer.headers.get("content-type", "").startswith("text/event-stream"):
            check_stream(answer)
        case.validate_response(response, checks=checks)

    try:
        run()
    finally:
        session.close()
    assert not any(status >= 500 for status in statuses), statuses
    if mode == "positive" and "{" not in path:  # (a generated model id is rarely the served one)
        assert statuses.get(200), f"no valid request was answered: {statuses}"


# --- 2. hand-written hostile kinds ----------------------------------------------------------------------------
COMPLETION = {"model": MODEL, "prompt": "x", "max_tokens": 2, "compute_budget": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "compute_budget": 0}
C, CC = "/v1/completions", "/v1/chat/completions"


def completion(**fields):
    return {**COMPLETION, **fields}


def chat(**fields):
    return {**CHAT, **fields}


def raw_json(text: str) -> bytes:
    return text.encode()


# (kind, path, body: a JSON value or raw bytes, status, param the error names or None). The context is 1024.
HOSTILE = [
    # bodies that are not what they claim
    ("nested arrays 100k deep", C, b"[" * 100_000, 400, None),
    ("nested objects 100k deep", C, b'{"a":' * 100_000, 400, None),
    ("content parts nested 500 deep", CC, raw_json('{"model":"tiny-test","messages":[{"role":"user","content":' + "[" * 500 + "]" * 500 + "}]}"), 400, "messages.0.content"),
    ("invalid UTF-8", C, b'{"model":"tiny-test","prompt":"\xff\xfe\xc3"}', 400, None),
    ("UTF-16 JSON", C, json.dumps(completion()).encode("utf-16"), 200, None),
    ("unpaired surrogate in prompt", C, raw_json('{"model":"tiny-test","prompt":"a\\ud800b","max_tokens":2}'), 400, "prompt"),
    ("unpaired surrogate in content", CC, raw_json('{"model":"tiny-test","messages":[{"role":"user","content":"\\udc00"}]}'), 400, "messages.0.content"),
    ("unpaired surrogate in a content part", CC, raw_json('{"model":"tiny-test","messages":[{"role":"user","content":[{"type":"text","text":"\\ud800"}]}]}'), 400, "messages.0.content"),
    ("unpaired surrogate in model", C, raw_json('{"model":"\\ud800","prompt":"x"}'), 400, "model"),
    ("unpaired surrogate in stop", C, raw_json('{"model":"tiny-test","prompt":"x","stop":["\\udfff"]}'), 400, "stop"),
    ("unpaired surrogate in cache_salt", C, raw_json('{"model":"tiny-test","prompt":"x","cache_salt":"\\ud800"}'), 400, "cache_salt"),
    ("unpaired surrogate as a field name", C, raw_json('{"model":"tiny-test","prompt":"x","\\ud800":1}'), 400, None),
    ("duplicate keys: the last wins", C, raw_json('{"model":"tiny-test","prompt":"x","max_tokens":99999,"max_tokens":1}'), 200, None),
    ("JSON null", C, b"null", 400, None),
    ("JSON list", C, b"[1, 2]", 400, None),
    ("JSON string", C, b'"prompt"', 400, None),
    ("JSON number", C, b"1e999", 400, None),
    ("empty body", C, b"", 400, None),
    ("a number of 5000 digits", C, raw_json('{"model":"tiny-test","prompt":"x","max_tokens":' + "9" * 5000 + "}"), 400, None),
    ("100k unknown fields", C, json.dumps({**COMPLETION, **{f"f{i}": i for i in range(100_000)}}).encode(), 400, None),
    ("an unknown field", C, completion(compute_bugdet=1), 400, "compute_bugdet"),
    # NaN and infinities: Starlette's parser accepts the literals
    ("NaN temperature", C, raw_json('{"model":"tiny-test","prompt":"x","temperature":NaN}'), 400, "temperature"),
    ("Infinity max_tokens", C, raw_json('{"model":"tiny-test","prompt":"x","max_tokens":Infinity}'), 400, "max_tokens"),
    ("-Infinity seed", C, raw_json('{"model":"tiny-test","prompt":"x","seed":-Infinity}'), 400, "seed"),
    ("NaN top_p", CC, raw_json('{"model":"tiny-test","messages":[{"role":"user","content":"x"}],"top_p":NaN}'), 400, "top_p"),
    ("NaN compute_budget", C, raw_json('{"model":"tiny-test","prompt":"x","compute_budget":NaN}'), 400, "compute_budget"),
    ("Infinity ttt.lambda", C, raw_json('{"model":"tiny-test","prompt":"x","ttt":{"lambda":Infinity}}'), 400, "ttt.lambda"),
    ("NaN ttt.deadline_s", C, raw_json('{"model":"tiny-test","prompt":"x","ttt":{"deadline_s":NaN}}'), 400, "ttt.deadline_s"),
    # token ids
    ("negative token id", C, completion(prompt=[1, -1]), 400, "prompt"),
    ("token id = vocabulary", C, completion(prompt=[1, 1024]), 400, "prompt"),
    ("token id 2**70", C, completion(prompt=[2**70]), 400, "prompt"),
    ("float token ids", C, completion(prompt=[1.5, 2.0]), 400, "prompt"),
    ("integral float token ids, as JSON Schema's integers", C, completion(prompt=[10.0, 11.0]), 200, None),
    ("boolean token ids", C, completion(prompt=[True]), 400, "prompt"),
    ("empty prompt list", C, completion(prompt=[]), 400, "prompt"),
    ("empty prompt string", C, completion(prompt=""), 400, "prompt"),
    ("batch of two prompts", C, completion(prompt=["a", "b"]), 400, "prompt"),
    ("a prompt of 200k token ids", C, completion(prompt=[1] * 200_000), 400, "prompt"),
    # stop lists
    ("5000 stop strings", C, completion(stop=["s"] * 5000), 400, "stop"),
    ("an empty stop string", C, completion(stop=[""]), 400, "stop"),
    ("non-string stop", C, completion(stop=[1]), 400, "stop"),
    ("four 1 MB stop strings", C, completion(stop=[c * 2**20 for c in "abcd"]), 200, None),
    # max_tokens at and past the limits
    ("max_tokens 0 (completions: allowed)", C, completion(max_tokens=0), 200, None),
    ("max_tokens 0 (chat: at least 1)", CC, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", C, completion(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens filling the context exactly", C, completion(prompt=[1] * 1020, max_tokens=4), 200, None),
    ("max_tokens one past the context", C, completion(prompt=[1] * 1021, max_tokens=4), 400, "prompt"),
    ("max_tokens 2**63", C, completion(max_tokens=2**63), 400, "prompt"),
    ("max_tokens 1e308", C, completion(max_tokens=1e308), 400, "prompt"),
    ("max_completion_tokens 2**63", CC, chat(max_completion_tokens=2**63), 400, "messages"),
    ("max_tokens a string", C, completion(max_tokens="4"), 400, "max_tokens"),
    # compute_budget at and past the limits (the fixture's cap is 64)
    ("compute_budget negative", C, completion(compute_budget=-1), 400, "compute_budget"),
    ("compute_budget at the cap, training off", C, completion(compute_budget=64, ttt={"mode": "off"}), 200, None),
    ("compute_budget one above the cap", C, completion(compute_budget=65), 400, "compute_budget"),
    ("compute_budget 2**70", C, completion(compute_budget=2**70), 400, "compute_budget"),
    ("compute_budget fractional", C, completion(compute_budget=2.5), 400, "compute_budget"),
    ("compute_budget a string", C, completion(compute_budget="8"), 400, "compute_budget"),
    ("compute_budget a boolean", C, completion(compute_budget=True), 400, "compute_budget"),
    # sampling at and past the limits
    ("temperature 1e-300 (greedy)", C, completion(temperature=1e-300), 200, None),
    ("temperature 5e-324 (greedy)", C, completion(temperature=5e-324), 200, None),
    ("temperature above 2", C, completion(temperature=2.5), 400, "temperature"),
    ("top_p 0", C, completion(top_p=0), 400, "top_p"),
    ("top_p 1.5", C, completion(top_p=1.5), 400, "top_p"),
    ("top_p 5e-324 (the top token)", C, completion(top_p=5e-324), 200, None),
    ("seed 2**64", C, completion(seed=2**64), 400, "seed"),
    ("seed 1e308", C, completion(seed=1e308), 400, "seed"),
    ("seed -2**63", C, completion(seed=-(2**63)), 200, None),
    ("n = 2", CC, chat(n=2), 400, "n"),
    ("best_of = 3", C, completion(best_of=3), 400, "best_of"),
    ("logprobs 6 (completions: at most 5)", C, completion(logprobs=6), 400, "logprobs"),
    ("logprobs -1", C, completion(logprobs=-1), 400, "logprobs"),
    ("top_logprobs 21", CC, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs without logprobs", CC, chat(top_logprobs=2), 400, "top_logprobs"),
    ("stream_options without stream", C, completion(stream_options={"include_usage": True}), 400, "stream_options"),
    ("ttt.n 2**62 while training", C, completion(prompt="hostile ttt.n", compute_budget=1, ttt={"n": 2**62, "mode": "always"}), 200, None),
    ("ttt.lambda 1e308 while training", C, completion(prompt="hostile lambda", compute_budget=1, ttt={"lambda": 1e308, "mode": "always"}), 200, None),
    ("ttt.deadline_s 5e-324", C, completion(prompt="hostile deadline", compute_budget=1, ttt={"deadline_s": 5e-324, "mode": "always"}), 200, None),
    ("ttt.strategy unknown", C, completion(ttt={"strategy": "../../etc/passwd"}), 400, "ttt.strategy"),
    # messages
    ("role tool", CC, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0.role"),
    ("role missing", CC, chat(messages=[{"content": "x"}]), 400, "messages.0.role"),
    ("content a number", CC, chat(messages=[{"role": "user", "content": 7}]), 400, "messages.0.content"),
    ("content an object", CC, chat(messages=[{"role": "user", "content": {"text": "x"}}]), 400, "messages.0.content"),
    ("content an image part", CC, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]), 400, "messages.0.content"),
    ("messages empty", CC, chat(messages=[]), 400, "messages"),
    ("messages not a list", CC, chat(messages={"role": "user", "content": "x"}), 400, "messages"),
    ("10k messages", CC, chat(messages=[{"role": "user", "content": "x"}] * 10_000), 400, "messages"),
    ("assistant and system only", CC, chat(messages=[{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]), 200, None),
    # model names: compared, never opened
    ("model ../../etc/passwd", C, completion(model="../../etc/passwd"), 404, "model"),
    ("model with a null byte", C, completion(model="tiny-test\u0000/../../x"), 404, "model"),
    ("model of 1 MB", C, completion(model="m" * 2**20), 404, "model"),
    ("model a number", C, completion(model=1), 400, "model"),
    ("model missing", C, {"prompt": "x"}, 400, "model"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "path", "body", "status", "param"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_json(running, kind, path, body, status, param):
    response = post(running, path, body)
    assert response.status_code == status, (kind, response.text[:500])
    if status >= 400:
        assert_openai_error(response, param)
    else:
        assert response.json()["choices"] and response.json()["ttt"]["decision"], response.text[:500]


def test_hostile_content_types(running):
    """The body must be JSON: other content types, and none, are 400s that say so."""
    body = json.dumps(COMPLETION).encode()
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ):
        response = post(running, C, body, {"content-type": content_type})
        assert response.status_code == 400, (content_type, response.text)
        assert "JSON object" in assert_openai_error(response)["message"]
    response = httpx.post(f"{running.url}{C}")  # no body, no content type
    assert response.status_code == 400 and "no body" in assert_openai_error(response)["message"]


def test_query_strings_on_post_routes_change_nothing(running):
    response = post(running, f"{C}?model=evil&max_tokens=99999&compute_budget=99&stream=true", COMPLETION)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2


# --- raw HTTP: what clients like httpx refuse to send -----------------------------------------------------------
def exchange(url: str, data: bytes, timeout: float = 10.0) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes on a fresh connection; the answer's status, headers and body (None: no answer)."""
    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before reading it all: read what it said
        received = b""
        try:
            while chunk := sock.recv(1 << 16):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    if not received.startswith(b"HTTP/1."):
        return None, {}, received
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def request(method: str, target: str, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close", *headers]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def chunked(total: int, piece: int = 1 << 16) -> bytes:
    data = b"".join(b"%x\r\n" % piece + b"a" * piece + b"\r\n" for _ in range(total // piece + 1))
    return data + b"0\r\n\r\n"


JSON_BODY = json.dumps(COMPLETION).encode()
LENGTH = f"Content-Length: {len(JSON_BODY)}"
TYPE = "Content-Type: application/json"

# (kind, raw request, status, who answers: "app" (an OpenAI error body) or "http" (uvicorn, plain text))
RAW_HTTP = [
    ("body over the limit, announced", request("POST", C, b"{", TYPE, "Content-Length: 8388609"), 413, "app"),
    ("chunked body over the limit", request("POST", C, chunked(8 * 2**20 + 1), TYPE, "Transfer-Encoding: chunked"), 413, "app"),
    ("two Content-Lengths", request("POST", C, JSON_BODY, TYPE, LENGTH, LENGTH), 400, "http"),
    ("two different Content-Lengths", request("POST", C, JSON_BODY, TYPE, LENGTH, "Content-Length: 3"), 400, "http"),
    ("Content-Length and chunked", request("POST", C, b"5\r\nabcde\r\n0\r\n\r\n", TYPE, LENGTH, "Transfer-Encoding: chunked"), 400, "http"),
    ("negative Content-Length", request("POST", C, JSON_BODY, TYPE, "Content-Length: -1"), 400, "http"),
    ("Content-Length a superscript digit", request("POST", C, JSON_BODY, TYPE, "Content-Length: \xb2"), 400, "http"),
    ("Content-Length of 23 digits", request("POST", C, JSON_BODY, TYPE, "Content-Length: " + "9" * 23), 400, "http"),
    ("a 1 MB header value", request("GET", "/health", b"", "X-Big: " + "a" * 2**20), 200, "app"),
    ("10k headers", request("GET", "/health", b"", *(f"X-H{i}: v" for i in range(10_000))), 200, "app"),
    ("a control character in a header", request("GET", "/health", b"", "X-A: a\x01b"), 400, "http"),
    ("a 100 KB request line", request("GET", "/v1/models/" + "a" * 100_000), 400, "http"),
    ("an 8 KB path", request("GET", "/nothing/" + "a" * 8000), 404, "app"),
    ("path traversal in a route", request("GET", "/v1/../health"), 404, "app"),
    ("path traversal in a model id", request("GET", "/v1/models/../../etc/passwd"), 404, "app"),
    ("encoded path traversal in a model id", request("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd"), 404, "app"),
    ("null byte in a model id", request("GET", "/v1/models/tiny-test%00"), 404, "app"),
    ("invalid percent-encoding", request("GET", "/v1/models/%FF%FE%ED%A0%80"), 404, "app"),
    ("an absolute URI as the target", request("GET", "http://evil.example/health"), 200, "app"),
    ("HTTP/9.9", request("GET", "/health").replace(b"HTTP/1.1", b"HTTP/9.9"), 400, "http"),
    ("an unknown method", request("BREW", "/health"), 400, "http"),
    ("TLS bytes on the plain port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100), 400, "http"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "data", "status", "source"), RAW_HTTP, ids=[r[0] for r in RAW_HTTP])
def test_hostile_http(running, kind, data, status, source):
    answer, headers, body = exchange(running.url, data)
    assert answer == status, (kind, answer, body[:300])
    if source == "app" and status >= 400:
        assert_openai_error(httpx.Response(answer, headers=headers, content=body))
    assert httpx.get(f"{running.url}/health").status_code == 200


def test_a_real_body_over_the_limit_is_refused_whole(running):
    response = post(running, C, completion(prompt="x" * (8 * 2**20)))
    assert response.status_code == 413
    assert assert_openai_error(response)["code"] == "request_too_large"


METHODS = [
    ("PUT", C), ("DELETE", C), ("PATCH", CC), ("GET", CC), ("OPTIONS", CC), ("POST", "/v1/models"),
    ("DELETE", "/v1/models/tiny-test"), ("POST", "/health"), ("PUT", "/metrics"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path"), METHODS, ids=[f"{m} {p}" for m, p in METHODS])
def test_the_wrong_method_is_405_with_allow(running, method, path):
    response = httpx.request(method, f"{running.url}{path}", content=b"{}")
    assert response.status_code == 405
    assert_openai_error(response)
    assert set(response.headers["allow"].split(", ")) & {"POST", "GET"}, response.headers


def test_head_is_a_405_without_a_body(running):
    """FastAPI routes GET only; HEAD gets 405 and the methods allowed (an answer to HEAD has no body)."""
    response = httpx.head(f"{running.url}/health")
    assert response.status_code == 405 and response.headers["allow"] == "GET" and not response.content


@pytest.fixture(scope="module")
def keyed(running):
    """A second API over the same generator, with an API key."""
    from ttserve.serving.api import build_api

    config = running.settings.server.model_copy(update={"api_key": SecretStr("s3cret")})
    server = ServerThread(build_api(running.replica, running.settings.model_copy(update={"server": config})))
    yield server.url
    server.stop()


AUTHORIZATION = [
    ("none", None, 401),
    ("empty", "", 401),
    ("the scheme alone", "Bearer", 401),
    ("the key alone", "s3cret", 401),
    ("a wrong key", "Bearer s3cre", 401),
    ("the key and more", "Bearer s3cret s3cret", 401),
    ("Basic", "Basic czNjcmV0Og==", 401),
    ("a 1 MB key", "Bearer " + "k" * 2**20, 401),
    ("latin-1 bytes", "Bearer s3cr\xe9t\xff", 401),
    ("the right key", "Bearer s3cret", 200),
    ("the scheme in lower case", "bearer s3cret", 200),
    ("extra spaces", "  Bearer   s3cret  ", 200),
]


@pytest.mark.parametrize(("kind", "value", "status"), AUTHORIZATION, ids=[a[0] for a in AUTHORIZATION])
def test_authorization_forms(keyed, kind, value, status):
    headers = [] if value is None else [f"Authorization: {value}"]
    answer, response_headers, body = exchange(keyed, request("GET", "/v1/models", b"", *headers))
    assert answer == status, (kind, body[:300])
    if status == 401:
        error = assert_openai_error(httpx.Response(answer, headers=response_headers, content=body))
        assert error["code"] == "invalid_api_key" and "s3cret" not in error["message"]


def test_the_key_in_the_query_string_is_no_key_and_health_needs_none(keyed):
    assert httpx.get(f"{keyed}/v1/models?api_key=s3cret").status_code == 401
    assert httpx.get(f"{keyed}/v1/models/tiny-test?authorization=Bearer%20s3cret").status_code == 401
    assert httpx.get(f"{keyed}/health").status_code == 200


def test_a_generating_request_with_a_bad_key_never_reaches_the_model(keyed):
    response = httpx.post(f"{keyed}{C}", json=COMPLETION, headers={"authorization": "Bearer nope"})
    assert response.status_code == 401 and assert_openai_error(response)["type"] == "authentication_error"


def test_a_slow_loris_body_times_out_while_others_are_served(running):
    """A client that sends headers and a few bytes, then stalls: the server answers everyone else
    meanwhile, and the stalled request gets a 408 once its body is overdue (server.body_timeout_s; a second
    API over the same replica, with a short one)."""
    from tests.serving import Running, ServerThread
    from ttserve.serving.api import build_api

    server = running.settings.server.model_copy(update={"body_timeout_s": 3.0})
    short = ServerThread(build_api(running.replica, running.settings.model_copy(update={"server": server})))
    try:
        where = urlparse(short.url)
        started = time.monotonic()
        with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
            sock.sendall(request("POST", C, b'{"model": "tiny', TYPE, "Content-Length: 1000"))
            same_server = Running(short.url, running.replica, running.settings, running.model)
            text, ttt = greedy(same_server)  # served, by the same server, while the other body trickles
            assert text and ttt["decision"] == "skipped"
            assert time.monotonic() - started < 3.0, "the slow body held the server up"
            received = b""
            while chunk := sock.recv(1 << 16):
                received += chunk
    finally:
        short.stop()
    assert received.startswith(b"HTTP/1.1 408"), received[:300]
    head, _, body = received.partition(b"\r\n\r\n")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 2.9 < time.monotonic() - started < 15


def test_slow_headers_do_not_hold_up_other_requests(running):
    """Headers that never finish: uvicorn has no header timeout, but the stalled connection holds no
    one else up, and goes away when the client does."""
    where = urlparse(running.url)
    stalled = []
    for _ in range(20):
        sock = socket.create_connection((where.hostname, where.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        stalled.append(sock)
    try:
        started = time.monotonic()
        assert greedy(running)[0] and httpx.get(f"{running.url}/health").status_code == 200
        assert time.monotonic() - started < 5
    finally:
        for sock in stalled:
            sock.close()


def test_many_hostile_requests_at_once(running):
    """Hostile requests from several clients at once: each still gets its own answer."""
    bodies = [(h[1], h[2], h[3]) for h in HOSTILE if not isinstance(h[2], bytes) or len(h[2]) < 2**16][:40]
    results: list[tuple[int, int]] = []

    def send(path, body, status):
        results.append((post(running, path, body).status_code, status))

    threads = [threading.Thread(target=send, args=case) for case in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == len(bodies) and all(got == want for got, want in results), results


# --- 3. afterwards the server answers identically ----------------------------------------------------------------
def test_zz_the_server_answers_identically_afterwards(running, before):
    """Runs last in this file (pytest keeps the file's order): everything above has happened."""
    (text, ttt), (text_before, ttt_before) = greedy(running), before["greedy"]
    assert text == text_before and ttt["decision"] == ttt_before["decision"] == "skipped"
    text, ttt = trained(running)
    first_text, first = before["trained"]
    assert first["decision"] in ("trained", "reused") and ttt["decision"] == "reused"
    assert (text, ttt["adapter_id"], ttt["selected_ids"]) == (
        first_text,
        first["adapter_id"],
        first["selected_ids"],
    )
    metrics = httpx.get(f"{running.url}/metrics").text
    assert "ttserve_requests_in_flight 0.0" in metrics
    assert running.replica.pipeline.training.queued == 0
    assert server_errors(running) == before["errors"]
