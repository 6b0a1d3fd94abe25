"""The OpenAI-compatible wire protocol as pydantic models, kept apart from serving logic.

Requests follow OpenAI's /v1/chat/completions and /v1/completions, plus two extensions that clients send
through `extra_body`: `compute_budget` (test-time training steps) and `ttt` (`TTTOptions`). Every response
carries a `ttt` object (`TTTInfo`) saying what test-time training did; OpenAI clients keep it as an extra
attribute (`completion.ttt` / `completion.model_extra["ttt"]`).

Requests are strict: unknown fields are errors (a misspelt `compute_bugdet` must not be silently ignored),
and so are parameters we cannot honour (n > 1, batched prompts) — a request is served as asked
or refused with a 400 that names the parameter, never served differently than asked.

Responses serialize with plain `model_dump()` / `model_dump_json()` to the JSON OpenAI sends: explicit
nulls where OpenAI has them (`finish_reason`, `logprobs` in choices, `param`/`code` in errors, the
optional numbers in `ttt`), and omitted keys where OpenAI omits them (unset `delta` fields, `usage` and
`ttt` on streamed chunks other than the last). Do not pass `exclude_none`.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from ttserve.contract import (
    Decision,
    GenerateRequest,
    Mode,
    NoChatTemplateError,
    NotReadyError,
    Overloaded,
    RequestError,
    SamplingParams,
    Strategy,
    TTTOutcome,
)

if TYPE_CHECKING:
    from fastapi.exceptions import RequestValidationError

# ---------------------------------------------------------------------------------------------- errors

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "not_found_error",
    "rate_limit_error",
    "server_error",
    "service_unavailable",
]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None  # serialized as an explicit null, as OpenAI does
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


class APIError(Exception):
    """An error the server answers with `status_code` and `response()` as the JSON body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: ErrorType = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds, sent as Retry-After: when trying again makes sense

    def response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def __reduce__(self):  # picklable with all its fields: it crosses Ray Serve's process boundaries
        return (
            type(self),
            (self.status_code, self.message, self.type, self.param, self.code, self.retry_after),
        )

    def __repr__(self) -> str:
        return f"APIError({self.status_code}, {self.message!r}, type={self.type!r}, param={self.param!r})"

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, "invalid_request_error", param, code)

    @classmethod
    def unauthorized(cls, message: str = "Invalid API key.") -> APIError:
        return cls(401, message, "authentication_error", code="invalid_api_key")

    @classmethod
    def not_found(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(404, message, "not_found_error", param, code)

    @classmethod
    def too_large(cls, message: str, param: str | None = None) -> APIError:
        return cls(413, message, "invalid_request_error", param, "request_too_large")

    @classmethod
    def unprocessable(cls, message: str, param: str | None = None) -> APIError:
        return cls(422, message, "invalid_request_error", param)

    @classmethod
    def rate_limited(cls, message: str = "Too many requests: retry later.", retry_after: int = 1) -> APIError:
        return cls(429, message, "rate_limit_error", code="rate_limit_exceeded", retry_after=retry_after)

    @classmethod
    def internal(cls, message: str = "The server had an error while processing your request.") -> APIError:
        return cls(500, message, "server_error")

    @classmethod
    def unavailable(
        cls, message: str = "The server is overloaded or not ready yet.", retry_after: int = 5
    ) -> APIError:
        return cls(503, message, "service_unavailable", retry_after=retry_after)

    @classmethod
    def of_request_error(cls, error: RequestError) -> APIError:
        """The status and body for a domain error (ttserve.contract): the one place that maps them."""
        if isinstance(error, NoChatTemplateError):
            return cls.unprocessable(error.message, error.param)
        if isinstance(error, NotReadyError):
            return cls.unavailable(error.message)
        if isinstance(error, Overloaded):
            return cls.unavailable(error.message, retry_after=error.retry_after)
        return cls.bad_request(error.message, error.param)  # InvalidRequest, ContextLengthError


def validation_error_to_api_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A 400 naming the first invalid parameter, worded like OpenAI's own errors.

    Always 400, never FastAPI's default 422: OpenAI answers every invalid or unknown parameter with 400
    `invalid_request_error`, and clients (the `openai` SDK's BadRequestError, retry logic) expect that.
    """
    errors = exc.errors()
    if not errors:
        return APIError.bad_request(str(exc))
    err = errors[0]
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid value"))
    if kind == "json_invalid":  # FastAPI: the body is not JSON; its loc is ("body", character offset)
        return APIError.bad_request(f"We could not parse the JSON body of your request: {msg}.")
    loc = list(err.get("loc", ()))
    if loc == ["body"]:  # FastAPI: the body is missing, or is JSON but not an object
        send = "send a JSON object (Content-Type: application/json)"
        if kind == "missing":
            return APIError.bad_request(f"The request has no body; {send}.")
        if kind in ("model_attributes_type", "model_type", "dict_type"):
            return APIError.bad_request(f"The request body is not a JSON object; {send}.")
        return APIError.bad_request(f"Invalid request body: {msg[:1].lower()}{msg[1:]}.")
    if loc[:1] == ["body"]:  # FastAPI prefixes the body's locations
        loc = loc[1:]
    param = ".".join(str(part) for part in loc) or None
    if param is None:
        return APIError.bad_request(msg.removeprefix("Value error, "))
    if kind == "missing":
        return APIError.bad_request(f"Missing required parameter: '{param}'.", param)
    if kind == "extra_forbidden":
        return APIError.bad_request(f"Unrecognized request argument supplied: {param}", param)
    msg = msg.removeprefix("Value error, ")
    text = f"Invalid value for '{param}': {msg[:1].lower()}{msg[1:]}"
    value = err.get("input")
    if value is None or isinstance(value, bool | int | float | str):
        shown = json.dumps(value)
        text += f" (got {shown[:60] + '…' if len(shown) > 60 else shown})"
    return APIError.bad_request(text + ".", param)


# ------------------------------------------------------------------------------- strict scalar types


def _integer(value: Any) -> Any:
    # Lax pydantic would take true as 1 and "8" as 8; OpenAI rejects both. 8.0 is fine, 8.5 is not.
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool | str):
        raise ValueError("must be a number")
    return value


def _unicode(value: Any) -> Any:
    # JSON's \ud800 escapes decode to unpaired surrogates, which no tokenizer, hash or UTF-8 answer takes.
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text: it has an unpaired surrogate") from None
    return value


Int = Annotated[int, BeforeValidator(_integer)]
Text = Annotated[str, AfterValidator(_unicode)]
# allow_inf_nan=False: Starlette's JSON parser accepts NaN and Infinity, which slip past range checks.
Float = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_number)]


# ------------------------------------------------------------------------------------------ requests


def _optional_fields_take_null(schema: dict[str, Any]) -> None:
    """The JSON schema says what `_null_means_default` accepts: null for every field that has a default."""
    required = set(schema.get("required", ()))
    for name, field in schema.get("properties", {}).items():
        variants = field.get("anyOf", [field])
        if name in required or any(v.get("type") == "null" for v in variants):
            continue
        annotations = {k: field.pop(k) for k in ("default", "title", "description") if k in field}
        schema["properties"][name] = {"anyOf": [field, {"type": "null"}], **annotations}


class _RequestModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, json_schema_extra=_optional_fields_take_null
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI treats an explicit null as "use the default", and some clients send `"stop": null`. Only
        # for the request's own fields: an unknown one is refused, null or not.
        if isinstance(data, dict):
            known = _field_names(cls)
            return {k: v for k, v in data.items() if v is not None or k not in known}
        return data


@functools.cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    """A request model's field names and aliases: what `_null_means_default` may drop a null for."""
    return frozenset(key for name, f in model.model_fields.items() for key in (name, f.alias) if key)


class TTTOptions(_RequestModel):
    """The request's optional `ttt` object: per-request overrides of the server's test-time training."""

    strategy: Strategy | None = None
    # JSON key "lambda" (a Python keyword): SIFT's regularization; larger values favour diversity.
    lam: Float | None = Field(None, alias="lambda", gt=0)
    mode: Mode | None = None  # see ttserve.policy
    deadline_s: Float | None = Field(None, gt=0)  # seconds for test-time training to start and finish
    n: Int | None = Field(None, ge=1)  # sequences to retrieve


class StreamOptions(_RequestModel):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # accepted and ignored: we never pad chunks


def _check_stop(value: Any) -> Any:
    # Checked whole, before the union, so that errors read "at most 4 ..." rather than a union dump.
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("must be a string or a list of strings")
    if len(stops) > 4:
        raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must not be empty")
    for stop in stops:
        _unicode(stop)
    return value


class _SamplingRequest(_RequestModel):
    """The fields chat and text completions share."""

    model: Text
    temperature: Float = Field(1.0, ge=0, le=2)
    top_p: Float = Field(1.0, gt=0, le=1)
    n: Int = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str | list[str] | None, BeforeValidator(_check_stop)] = None
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's: a 64-bit integer
    presence_penalty: Float = Field(0.0, ge=-2, le=2)
    frequency_penalty: Float = Field(0.0, ge=-2, le=2)
    user: str | None = None  # accepted for compatibility, ignored
    # Test-time training steps; None means the server default. The server enforces its own maximum.
    compute_budget: Int | None = Field(None, ge=0)
    ttt: TTTOptions | None = None
    # As vLLM's: requests reuse each other's adapters only when their salts are equal (and, with API keys,
    # only within a key: ServerConfig.salt_adapters_by_key).
    cache_salt: Text | None = Field(None, min_length=1, max_length=256)

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        # Each prompt trains its own adapter; n > 1 would be n samples from it, which we do not batch yet.
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream", False):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def normalized_stop(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (non-streamed responses always carry usage)."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _generate_request(
        self, *, max_tokens: int | None, logprobs: int | None, **prompt: Any
    ) -> GenerateRequest:
        """What both endpoints send the pipeline; `prompt` is `prompt=` or `messages=` (+ prompt_logprobs)."""
        ttt = self.ttt or TTTOptions()
        return GenerateRequest(
            max_tokens=max_tokens,
            sampling=SamplingParams(
                temperature=self.temperature,  # (SamplingParams makes a vanishing one greedy)
                top_p=self.top_p,
                stop=tuple(self.normalized_stop()),
                seed=self.seed,
                logprobs=logprobs,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
            ),
            compute_budget=self.compute_budget,
            request_id=uuid.uuid4().hex,
            cache_salt=self.cache_salt,
            received_at=time.time(),
            **ttt.model_dump(),  # strategy, lam, mode, deadline_s, n: the same names in GenerateRequest
            **prompt,
        )


def _text_content(value: Any) -> Any:
    # Content is a string or a list of text parts; parts are joined with "\n", as vLLM does, so the
    # server sees one string per message. Anything else (images, audio, files) is refused by name.
    if not isinstance(value, list):
        return value  # a string passes; anything else fails the str check
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(f"only text content parts are supported; part {i} has type {kind!r}")
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise ValueError(f'part {i} must be {{"type": "text", "text": <string>}}')
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(_RequestModel):
    # No "tool" role: the server runs no tools. "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Text, BeforeValidator(_text_content)]
    name: str | None = None  # accepted, ignored


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs", False):
            raise ValueError("logprobs must be true when top_logprobs is set")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        """max_completion_tokens, else max_tokens; None means the server's default/context limit."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages for `tokenizer.apply_chat_template`; chat templates know "system", not "developer"."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in self.messages
        ]

    def to_generate_request(self) -> GenerateRequest:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._generate_request(
            max_tokens=self.max_new_tokens, logprobs=logprobs, messages=self.chat_messages()
        )


def _single_prompt(value: Any) -> Any:
    # OpenAI accepts a batch of prompts; we serve one prompt (one adapter) per request, so a batch of one
    # is unwrapped and a larger batch refused.
    if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
        if len(value) > 1:
            raise ValueError(
                f"batched prompts are not supported; send one prompt per request (got {len(value)})"
            )
        value = value[0]
    if isinstance(value, str) and value:
        return _unicode(value)
    # An empty prompt leaves nothing to retrieve for or condition on (and no token to score with echo).
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty string or a non-empty list of token ids")
    # 8.0 is the id 8, as for every integer field (JSON Schema's integers include it); 8.5 is not an id.
    value = [int(t) if isinstance(t, float) and t.is_integer() else t for t in value]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise ValueError("token ids must be non-negative integers")
    return value


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[str | list[int], BeforeValidator(_single_prompt)]
    # 0 is allowed, as in vLLM: with echo the response is the prompt alone, without it an empty completion.
    max_tokens: Int = Field(16, ge=0)
    logprobs: Int | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    best_of: Int | None = None
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only best_of=1 is supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("suffix (insertion) is not supported")
        return value

    @property
    def prompt_is_tokens(self) -> bool:
        return isinstance(self.prompt, list)

    def to_generate_request(self) -> GenerateRequest:
        # echo + logprobs scores the prompt too (what lm-evaluation-harness's loglikelihood requests send).
        scored = self.logprobs if self.echo and self.logprobs is not None else None
        return self._generate_request(
            max_tokens=self.max_tokens, logprobs=self.logprobs, prompt=self.prompt, prompt_logprobs=scored
        )


# ----------------------------------------------------------------------------------------- responses


class _ResponseModel(BaseModel):
    # Keys dropped from the JSON when None; every other None is written as an explicit null.
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_if_none:
            if data.get(key, 0) is None:
                del data[key]
        return data


class TTTInfo(_ResponseModel):
    """What test-time training did for this request: on every response, on the last chunk when streaming."""

    # trained: a new adapter answered; reused: an adapter cached from an identical earlier request answered;
    # skipped: the policy chose the base model (budget 0, mode off, too little predicted gain);
    # fallback: training was wanted but could not happen (deadline, full queue, a fault), base model answered.
    decision: Decision = "skipped"
    trained: bool = False
    steps: int = 0  # gradient steps taken
    planned_steps: int = 0  # what the policy planned; more than `steps` when training was cut short
    stopped: str | None = None  # why training ended before its plan: "deadline" or "cancelled"; else null
    budget: int  # the compute budget the request got (after the server's default and cap)
    training_tokens: int = 0
    training_seconds: float = 0.0
    selected_ids: list[int] = Field(default_factory=list)  # datastore sequence ids, in selection order
    # SIFT's posterior variance σ² of the prompt before / after conditioning on the selected data.
    uncertainty_before: float | None = None
    uncertainty_after: float | None = None
    predicted_gain_bpb: float | None = None  # from the calibrated gain model, if any
    reason: str  # why the policy trained this much (ttserve.policy's plan reason)
    adapter_id: str | None = None
    cached: bool = False  # the adapter was reused from the cache rather than trained
    strategy: str
    retrieval_ms: float = 0.0

    @classmethod
    def of(cls, outcome: TTTOutcome) -> TTTInfo:
        return cls(**asdict(outcome), trained=outcome.trained)


class UsageInfo(_ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


FinishReason = Literal["stop", "length"]


def _now() -> int:
    return int(time.time())


class TopLogprob(_ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes


class ChatCompletionTokenLogprob(_ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_ResponseModel):
    content: list[ChatCompletionTokenLogprob] | None = None


class ChatResponseMessage(_ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(_ResponseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(_ResponseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    ttt: TTTInfo


class DeltaMessage(_ResponseModel):
    # OpenAI sends the role on the first chunk only and no content on the last; unset keys are omitted.
    _omit_if_none = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(_ResponseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None  # null until the choice's last chunk


class ChatCompletionChunk(_ResponseModel):
    # usage: only on a final chunk (choices == []) if stream_options.include_usage; ttt: on the last chunk.
    _omit_if_none = frozenset({"usage", "ttt"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    ttt: TTTInfo | None = None


class CompletionLogprobs(_ResponseModel):
    tokens: list[str] = Field(default_factory=list)
    # With echo the first prompt token has no logprob (nothing precedes it): null, as in OpenAI and vLLM.
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)  # character offset of each token in the text


class CompletionChoice(_ResponseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None  # null only on streamed chunks before the last


class CompletionResponse(_ResponseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    ttt: TTTInfo


class CompletionChunk(_ResponseModel):
    # OpenAI streams text completions as "text_completion" objects too, with usage/ttt as for chat chunks.
    _omit_if_none = frozenset({"usage", "ttt"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    ttt: TTTInfo | None = None


class ModelCard(_ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "ttserve"


class ModelList(_ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
