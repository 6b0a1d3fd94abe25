"""The wire protocol: what OpenAI clients send parses, what we refuse names the parameter, what we send
parses in the official `openai` client (including the `ttt` extension)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import ValidationError

from ttserve.serving.protocol import (
    APIError,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionTokenLogprob,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    TopLogprob,
    TTTInfo,
    UsageInfo,
    validation_error_to_api_error,
)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "What is LoRA?"}]}
COMPLETION = {"model": "tiny", "prompt": "Faiss builds"}

TTT = TTTInfo(
    trained=True,
    steps=3,
    budget=8,
    training_tokens=3072,
    training_seconds=0.42,
    selected_ids=[17, 4, 99],
    uncertainty_before=0.9,
    uncertainty_after=0.31,
    predicted_gain_bpb=0.05,
    reason="predicted gain 0.05 bpb above threshold",
    adapter_id="a1b2",
    cached=False,
    strategy="sift",
    retrieval_ms=12.5,
)


def refusal(model, body: dict) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error_to_api_error(info.value)


def mock_client(handler) -> openai.OpenAI:
    transport = httpx.MockTransport(handler)
    return openai.OpenAI(
        api_key="test",
        base_url="http://ttserve.test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=transport),
    )


# ------------------------------------------------------------------------------------------ requests


def test_openai_client_chat_body_with_extra_body_parses():
    # What `client.chat.completions.create(model=..., messages=[...], extra_body={...})` puts on the wire.
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is LoRA?"},
        ],
        "model": "tiny",
        "compute_budget": 8,
        "ttt": {"lambda": 0.5, "strategy": "knn"},
    }
    req = ChatCompletionRequest.model_validate(body)
    assert req.compute_budget == 8
    assert req.ttt is not None and req.ttt.lam == 0.5 and req.ttt.strategy == "knn"
    assert req.ttt.mode is None and req.ttt.deadline_s is None and req.ttt.n is None
    assert (req.n, req.temperature, req.top_p, req.stream, req.logprobs) == (1, 1.0, 1.0, False, False)
    assert req.max_new_tokens is None and req.normalized_stop() == [] and not req.include_usage
    assert req.chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is LoRA?"},
    ]


def test_real_openai_client_request_parses_and_response_round_trips():
    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        req = ChatCompletionRequest.model_validate(sent[-1])
        resp = ChatCompletionResponse(
            model=req.model,
            choices=[
                ChatCompletionChoice(message=ChatResponseMessage(content="An adapter."), finish_reason="stop")
            ],
            usage=UsageInfo(prompt_tokens=5, completion_tokens=3, total_tokens=8),
            ttt=TTT,
        )
        return httpx.Response(
            200, content=resp.model_dump_json(), headers={"content-type": "application/json"}
        )

    client = mock_client(handler)
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is LoRA?"}],
        max_completion_tokens=32,
        temperature=0.0,
        seed=1,
        stop=["\n\n"],
        extra_body={"compute_budget": 8, "ttt": {"lambda": 0.5, "strategy": "knn", "mode": "always"}},
    )
    assert sent[0]["compute_budget"] == 8 and sent[0]["ttt"]["lambda"] == 0.5
    assert out.choices[0].message.content == "An adapter."
    assert out.ttt["selected_ids"] == [17, 4, 99]  # the extension survives as an extra attribute
    assert out.model_extra["ttt"]["budget"] == 8

    # A response message appended to the history, as clients do for multi-turn chats, parses back.
    client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": "Hi"},
            out.choices[0].message,
            {"role": "user", "content": "More"},
        ],
    )
    assert [m["role"] for m in ChatCompletionRequest.model_validate(sent[1]).chat_messages()] == [
        "user",
        "assistant",
        "user",
    ]


def test_chat_request_normalisation():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "tiny",
            "messages": [
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "user", "content": "q", "name": "alice"},
            ],
            "compute_budget": 8.0,  # integral floats are integers
            "stop": "END",
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "temperature": None,  # null means the default
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logprobs": True,
            "top_logprobs": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u-1",
        }
    )
    assert req.compute_budget == 8 and type(req.compute_budget) is int
    assert req.normalized_stop() == ["END"]
    assert req.max_new_tokens == 20  # max_completion_tokens wins over the deprecated max_tokens
    assert req.temperature == 1.0
    assert req.include_usage
    assert req.chat_messages()[0] == {"role": "system", "content": "a\nb"}


def test_sampling_below_float_precision_is_what_it_means():
    """temperature 1e-300 overflowed logits / temperature and top_p 5e-324 is 0 in float32 (both were 500s):
    under 1e-5 the temperature is greedy (vLLM's rule); under 1e-9 top_p keeps the top token, as 1e-9 does."""
    tiny = CompletionRequest.model_validate(COMPLETION | {"temperature": 1e-300, "top_p": 5e-324})
    sampling = tiny.to_generate_request().sampling
    assert (sampling.temperature, sampling.top_p) == (0.0, 1e-9)
    exact = CompletionRequest.model_validate(COMPLETION | {"temperature": 1e-5, "top_p": 0.5, "seed": -1})
    sampling = exact.to_generate_request().sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (1e-5, 0.5, -1)


def test_penalties_reach_the_engine_parameters():
    for model, body in ((CompletionRequest, COMPLETION), (ChatCompletionRequest, CHAT)):
        request = model.model_validate(body | {"presence_penalty": 0.5, "frequency_penalty": -2})
        sampling = request.to_generate_request().sampling
        assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -2.0)
        assert model.model_validate(body).to_generate_request().sampling.frequency_penalty == 0.0


def test_completion_request_prompt_shapes():
    assert CompletionRequest.model_validate(COMPLETION).prompt == "Faiss builds"
    assert (
        CompletionRequest.model_validate(COMPLETION | {"prompt": ["Faiss builds"]}).prompt == "Faiss builds"
    )
    tokens = CompletionRequest.model_validate(COMPLETION | {"prompt": [[5, 6, 7]]})
    assert tokens.prompt == [5, 6, 7] and tokens.prompt_is_tokens
    # 6.0 is an integer to JSON Schema (and to every other integer field here); 6.5 is no token id.
    assert CompletionRequest.model_validate(COMPLETION | {"prompt": [5, 6.0]}).prompt == [5, 6]
    assert refusal(CompletionRequest, COMPLETION | {"prompt": [5, 6.5]}).param == "prompt"
    req = CompletionRequest.model_validate(
        COMPLETION | {"prompt": [5, 6], "max_tokens": 0, "echo": True, "logprobs": 2}
    )
    assert req.prompt_is_tokens and req.max_tokens == 0 and req.echo and req.logprobs == 2
    assert CompletionRequest.model_validate(COMPLETION).max_tokens == 16
    ok = CompletionRequest.model_validate(
        COMPLETION | {"best_of": 1, "suffix": None, "stop": ["a", "b", "c", "d"]}
    )
    assert ok.normalized_stop() == ["a", "b", "c", "d"]


CHAT_REFUSALS = [
    ({"compute_budget": -1}, "compute_budget"),
    ({"compute_budget": 8.5}, "compute_budget"),
    ({"compute_budget": "abc"}, "compute_budget"),
    ({"compute_budget": "8"}, "compute_budget"),
    ({"compute_budget": True}, "compute_budget"),
    ({"n": 2}, "n"),
    ({"compute_bugdet": 8}, "compute_bugdet"),
    ({"tools": []}, "tools"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"),  # OpenAI's range is [-2, 2]
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
    ({"stream": "yes"}, "stream"),
    ({"ttt": {"lamda": 0.5}}, "ttt.lamda"),
    ({"compute_bugdet": None}, "compute_bugdet"),  # null means the default only for the request's own fields
    ({"ttt": {"lamda": None}}, "ttt.lamda"),
    ({"ttt": {"lambda": 0}}, "ttt.lambda"),
    ({"ttt": {"strategy": "random"}}, "ttt.strategy"),
    ({"ttt": {"mode": "sometimes"}}, "ttt.mode"),
    ({"ttt": {"deadline_s": -2}}, "ttt.deadline_s"),
    ({"ttt": {"n": 0}}, "ttt.n"),
    ({"seed": 2**64}, "seed"),  # torch's generators take 64 bits: a larger seed was a 500
    ({"seed": -(2**63) - 1}, "seed"),
    ({"model": "tiny\ud800"}, "model"),  # unpaired surrogates: no tokenizer, hash or UTF-8 takes them
    ({"messages": [{"role": "user", "content": "\udc00"}]}, "messages.0.content"),
    ({"stop": ["\ud800"]}, "stop"),
    ({"cache_salt": "\ud800"}, "cache_salt"),
]


@pytest.mark.parametrize(("change", "param"), CHAT_REFUSALS)
def test_invalid_chat_requests_are_400s_naming_the_param(change, param):
    err = refusal(ChatCompletionRequest, CHAT | change)
    assert (err.status_code, err.type, err.param) == (400, "invalid_request_error", param)
    assert param in err.message


def test_refusal_messages_are_readable():
    assert "only n=1 is supported" in refusal(ChatCompletionRequest, CHAT | {"n": 2}).message
    assert refusal(ChatCompletionRequest, CHAT | {"compute_bugdet": 8}).message == (
        "Unrecognized request argument supplied: compute_bugdet"
    )
    assert "(got 8.5)" in refusal(ChatCompletionRequest, CHAT | {"compute_budget": 8.5}).message
    assert "at most 4" in refusal(ChatCompletionRequest, CHAT | {"stop": list("abcde")}).message
    assert refusal(CompletionRequest, {"model": "tiny"}).message == "Missing required parameter: 'prompt'."
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    err = refusal(ChatCompletionRequest, CHAT | {"messages": [{"role": "user", "content": [image]}]})
    assert (
        err.param == "messages.0.content"
        and "only text content parts" in err.message
        and "image_url" in err.message
    )
    err = refusal(CompletionRequest, COMPLETION | {"prompt": ["one", "two"]})
    assert "batched prompts are not supported" in err.message


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [[1, 2], [3]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "tail"}, "suffix"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"n": 3}, "n"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"echo": 1}, "echo"),
        ({"compute_budget": 8.5}, "compute_budget"),
        ({"messages": []}, "messages"),  # a chat field on the completions endpoint
    ],
)
def test_invalid_completion_requests_are_400s_naming_the_param(change, param):
    err = refusal(CompletionRequest, COMPLETION | change)
    assert (err.status_code, err.param) == (400, param)


def test_fastapi_validation_errors_drop_the_body_prefix():
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        err = validation_error_to_api_error(exc)
        return JSONResponse(err.response().model_dump(), status_code=err.status_code)

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest):
        return {"ok": True}

    client = TestClient(app)
    r = client.post("/v1/chat/completions", json=CHAT | {"ttt": {"lambda": -1}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "ttt.lambda" and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert client.post("/v1/chat/completions", json=CHAT).json() == {"ok": True}


# ----------------------------------------------------------------------------------------- responses


def test_chat_completion_parses_in_openai_client_with_logprobs():
    top = [
        TopLogprob(token="An", logprob=-0.1, bytes=[65, 110]),
        TopLogprob(token="A", logprob=-2.4, bytes=[65]),
    ]
    resp = ChatCompletionResponse(
        model="tiny",
        choices=[
            ChatCompletionChoice(
                message=ChatResponseMessage(content="An"),
                logprobs=ChatLogprobs(
                    content=[
                        ChatCompletionTokenLogprob(
                            token="An", logprob=-0.1, bytes=[65, 110], top_logprobs=top
                        )
                    ]
                ),
                finish_reason="length",
            )
        ],
        usage=UsageInfo(prompt_tokens=5, completion_tokens=1, total_tokens=6),
        ttt=TTT,
    )
    data = json.loads(resp.model_dump_json())
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    parsed = openai.types.chat.ChatCompletion.model_validate(data)
    assert parsed.choices[0].logprobs.content[0].top_logprobs[1].token == "A"
    assert parsed.choices[0].finish_reason == "length" and parsed.usage.total_tokens == 6
    assert parsed.ttt == TTT.model_dump()
    assert TTTInfo.model_validate(parsed.ttt) == TTT


def test_untrained_ttt_info_keeps_explicit_nulls():
    info = TTTInfo(budget=0, reason="compute budget is 0", strategy="sift")
    data = json.loads(info.model_dump_json())
    assert data["trained"] is False and data["selected_ids"] == []
    for key in ("uncertainty_before", "uncertainty_after", "predicted_gain_bpb", "adapter_id"):
        assert key in data and data[key] is None


def test_chat_chunks_serialize_like_openai():
    first = ChatCompletionChunk(
        id="chatcmpl-1",
        model="tiny",
        choices=[ChatCompletionChunkChoice(delta=DeltaMessage(role="assistant", content=""))],
    )
    data = json.loads(first.model_dump_json())
    assert data["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    assert "usage" not in data and "ttt" not in data
    assert openai.types.chat.ChatCompletionChunk.model_validate(data).choices[0].delta.role == "assistant"

    last = ChatCompletionChunk(
        id="chatcmpl-1",
        model="tiny",
        choices=[ChatCompletionChunkChoice(delta=DeltaMessage(), finish_reason="stop")],
    )
    assert json.loads(last.model_dump_json())["choices"][0]["delta"] == {}
    usage = ChatCompletionChunk(
        id="chatcmpl-1", model="tiny", choices=[], usage=UsageInfo(total_tokens=3), ttt=TTT
    )
    parsed = openai.types.chat.ChatCompletionChunk.model_validate(json.loads(usage.model_dump_json()))
    assert parsed.usage.total_tokens == 3 and parsed.ttt["strategy"] == "sift"


def test_openai_client_reads_our_stream():
    chunks = [
        ChatCompletionChunk(
            id="c",
            model="tiny",
            choices=[ChatCompletionChunkChoice(delta=DeltaMessage(role="assistant", content=""))],
        ),
        ChatCompletionChunk(
            id="c", model="tiny", choices=[ChatCompletionChunkChoice(delta=DeltaMessage(content="Hi"))]
        ),
        ChatCompletionChunk(
            id="c",
            model="tiny",
            choices=[ChatCompletionChunkChoice(delta=DeltaMessage(), finish_reason="stop")],
        ),
        ChatCompletionChunk(id="c", model="tiny", choices=[], usage=UsageInfo(total_tokens=7), ttt=TTT),
    ]
    sse = "".join(f"data: {c.model_dump_json()}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        ChatCompletionRequest.model_validate(json.loads(request.content))
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    stream = mock_client(handler).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    got = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hi"
    assert got[2].choices[0].finish_reason == "stop"
    assert got[-1].usage.total_tokens == 7 and got[-1].ttt["selected_ids"] == [17, 4, 99]


def test_completion_parses_in_openai_client():
    resp = CompletionResponse(
        model="tiny",
        choices=[
            CompletionChoice(
                text=" an index",
                logprobs=CompletionLogprobs(
                    tokens=[" an", " index"],
                    token_logprobs=[-0.5, -1.25],
                    top_logprobs=[{" an": -0.5}, {" index": -1.25, " a": -2.0}],
                    text_offset=[12, 15],
                ),
                finish_reason="length",
            )
        ],
        usage=UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        ttt=TTT,
    )
    data = json.loads(resp.model_dump_json())
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    parsed = openai.types.Completion.model_validate(data)
    assert parsed.choices[0].logprobs.text_offset == [12, 15] and parsed.ttt["adapter_id"] == "a1b2"


def test_completion_echo_null_first_logprob_reaches_the_client():
    # The first echoed token has no logprob; OpenAI sends null there and its client passes it through.
    resp = CompletionResponse(
        model="tiny",
        choices=[
            CompletionChoice(
                text="Faiss builds",
                logprobs=CompletionLogprobs(
                    tokens=["Fa", "iss", " builds"],
                    token_logprobs=[None, -3.0, -1.0],
                    top_logprobs=[None, {"iss": -3.0}, {" builds": -1.0}],
                    text_offset=[0, 2, 5],
                ),
                finish_reason="length",
            )
        ],
        usage=UsageInfo(prompt_tokens=3, completion_tokens=0, total_tokens=3),
        ttt=TTTInfo(budget=0, reason="compute budget is 0", strategy="sift"),
    )

    def handler(request: httpx.Request) -> httpx.Response:
        req = CompletionRequest.model_validate(json.loads(request.content))
        assert req.echo and req.max_tokens == 0 and req.logprobs == 1
        return httpx.Response(
            200, content=resp.model_dump_json(), headers={"content-type": "application/json"}
        )

    out = mock_client(handler).completions.create(
        model="tiny", prompt="Faiss builds", max_tokens=0, echo=True, logprobs=1
    )
    assert out.choices[0].logprobs.token_logprobs == [None, -3.0, -1.0]
    assert out.choices[0].logprobs.top_logprobs[0] is None
    assert out.ttt["trained"] is False


def test_completion_chunks_parse():
    mid = CompletionChunk(id="cmpl-1", model="tiny", choices=[CompletionChoice(text=" an")])
    data = json.loads(mid.model_dump_json())
    assert data["object"] == "text_completion" and data["choices"][0]["finish_reason"] is None
    assert "usage" not in data and "ttt" not in data
    last = CompletionChunk(
        id="cmpl-1",
        model="tiny",
        choices=[CompletionChoice(text="", finish_reason="stop")],
        usage=UsageInfo(),
        ttt=TTT,
    )
    parsed = openai.types.Completion.model_validate(json.loads(last.model_dump_json()))
    assert parsed.choices[0].finish_reason == "stop" and parsed.ttt["steps"] == 3


def test_model_list_parses():
    models = ModelList(data=[ModelCard(id="tiny", created=1700000000)])
    data = json.loads(models.model_dump_json())
    assert data == {
        "object": "list",
        "data": [{"id": "tiny", "object": "model", "created": 1700000000, "owned_by": "ttserve"}],
    }
    assert openai.types.Model.model_validate(data["data"][0]).owned_by == "ttserve"


# -------------------------------------------------------------------------------------------- errors


def test_error_response_shape_and_helpers():
    err = APIError.bad_request("compute_budget 64 exceeds the server maximum of 32", param="compute_budget")
    assert err.response().model_dump() == {
        "error": {
            "message": "compute_budget 64 exceeds the server maximum of 32",
            "type": "invalid_request_error",
            "param": "compute_budget",
            "code": None,
        }
    }
    assert json.loads(APIError.unavailable().response().model_dump_json())["error"]["param"] is None
    expected = {
        APIError.unauthorized(): (401, "authentication_error"),
        APIError.not_found("model 'x' does not exist", param="model", code="model_not_found"): (
            404,
            "not_found_error",
        ),
        APIError.too_large("prompt too long"): (413, "invalid_request_error"),
        APIError.unprocessable("cannot serve this"): (422, "invalid_request_error"),
        APIError.rate_limited(): (429, "rate_limit_error"),
        APIError.internal(): (500, "server_error"),
        APIError.unavailable(): (503, "service_unavailable"),
    }
    for error, (status, kind) in expected.items():
        assert (error.status_code, error.type) == (status, kind)
        assert isinstance(error, Exception) and str(error) == error.message


def test_openai_client_raises_bad_request_with_our_error():
    def handler(request: httpx.Request) -> httpx.Response:
        try:
            ChatCompletionRequest.model_validate(json.loads(request.content))
        except ValidationError as exc:
            err = validation_error_to_api_error(exc)
            return httpx.Response(err.status_code, content=err.response().model_dump_json())
        raise AssertionError("the request should have been refused")

    with pytest.raises(openai.BadRequestError) as info:
        mock_client(handler).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], extra_body={"compute_budget": 8.5}
        )
    assert info.value.status_code == 400
    assert info.value.param == "compute_budget" and info.value.type == "invalid_request_error"
    assert "must be an integer" in info.value.message


def test_a_vanishing_temperature_or_top_p_means_greedy_for_every_caller():
    """The rule lives in SamplingParams, so engines are safe from callers other than the HTTP layer too."""
    from ttserve.contract import SamplingParams

    assert SamplingParams(temperature=1e-300).temperature == 0.0
    assert SamplingParams(temperature=1e-5).temperature == 1e-5
    assert SamplingParams(top_p=5e-324).top_p == 1e-9 and SamplingParams(top_p=0.5).top_p == 0.5


def test_sampling_params_refuse_penalties_outside_openai_s_range():
    from ttserve.contract import SamplingParams

    assert SamplingParams(presence_penalty=-2, frequency_penalty=2).frequency_penalty == 2
    for field in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: 2.5})


def test_the_schema_lets_every_optional_field_be_null_as_the_server_does():
    for model in (ChatCompletionRequest, CompletionRequest):
        schema = model.model_json_schema()
        for name, field in schema["properties"].items():
            nullable = any(v.get("type") == "null" for v in field.get("anyOf", [field]))
            assert nullable == (name not in schema["required"]), (model.__name__, name)
    assert ChatCompletionRequest.model_validate(CHAT | {"logprobs": None, "n": None}).n == 1
