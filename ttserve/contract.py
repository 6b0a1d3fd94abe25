"""The vocabulary every layer shares: plain dataclasses and literals, no torch, peft, faiss or vllm.

The HTTP layer builds a `GenerateRequest` and reads `Started`/`GenerationChunk`/`TTTOutcome`; the request
pipeline (ttserve/pipeline.py) takes the request and produces them; engines take `SamplingParams` and an
`Adapter` and stream `GenerationChunk`s; the trainer reports a `TrainingRun`. Because this module imports
nothing heavy, the ingress (a fraction of a CPU, no model) can build requests and read answers without
loading the ML stack, and everything here pickles across Ray Serve's process boundaries.

Domain errors (`RequestError` and its subclasses) say what is wrong with a request in the core's words;
the HTTP layer alone decides which status code and OpenAI error body each one becomes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

# --- literals: each defined once -------------------------------------------------------------------------
Strategy = Literal["sift", "knn"]  # how training data is selected (spec §2)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
Mode = Literal["auto", "always", "off"]  # auto: the calibrated policy decides; always: spend the budget
# trained: a new adapter answered; reused: an adapter trained for an identical earlier request answered;
# skipped: the policy chose the base model; fallback: training was wanted but could not happen.
Decision = Literal["trained", "reused", "skipped", "fallback"]
StopReason = Literal["completed", "budget", "deadline", "cancelled"]  # why a training run ended


# --- domain errors -----------------------------------------------------------------------------------------
class RequestError(Exception):
    """Something about one request that the server refuses; `param` names the request field, if any."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # picklable with its fields: it crosses Ray Serve's process boundaries
        return (type(self), (self.message, self.param))


class InvalidRequest(RequestError):
    """The request cannot be served as asked (a budget over the cap, token ids out of range, ...)."""


class ContextLengthError(InvalidRequest, ValueError):
    """The prompt (plus what must be generated) does not fit the model's context."""


class NoChatTemplateError(RequestError):
    """A chat request to a model whose tokenizer has no chat template."""


class NotReadyError(RequestError):
    """The replica is still loading its model."""


class Overloaded(RequestError):
    """The replica has no generation slot free and its queue is full or too slow: retry after
    `retry_after` seconds (ttserve/admission.py)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):
        return (type(self), (self.message, self.retry_after))


# --- what an engine takes and gives --------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one and excludes it
    seed: int | None = None  # same seed, same request: same output
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    ignore_eos: bool = False
    # OpenAI's penalties, as vLLM applies them: before sampling (greedy too), a token's logit is lowered by
    # presence_penalty once it has been generated and by frequency_penalty for each time it has been;
    # the prompt's tokens do not count, and logprobs stay the model's own.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        # Below these, sampling is greedy in all but name, and an engine's arithmetic (logits / temperature,
        # top_p compared in float32) would turn 1e-300 into inf or 0: vLLM's rule, a temperature under 1e-5
        # is greedy; a top_p under 1e-9 keeps only the most likely token, as 1e-9 does for any vocabulary
        # under a billion tokens.
        if 0 < self.temperature < 1e-5:
            object.__setattr__(self, "temperature", 0.0)
        object.__setattr__(self, "top_p", max(self.top_p, 1e-9))


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter loaded into an engine. `name` and `id` are never reused for other weights."""

    name: str
    id: int
    path: Path
    bytes: int


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, token, logprob), most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationChunk:
    """One streamed step: new text, the new token ids, their logprobs if asked; the last one is `final`."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length (abort when cancelled), on the final chunk only
    usage: Usage | None = None  # on the final chunk only

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class PromptScores:
    """logprobs[i] = log p(token i | tokens < i); None for the first token, which has no context."""

    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float | None]
    top: list[tuple[tuple[int, str, float], ...] | None]


async def collect(chunks: AsyncIterator[GenerationChunk]) -> GenerationChunk:
    """A whole generation as one chunk: the concatenated text, ids and logprobs, with the final record."""
    whole = GenerationChunk()
    async for chunk in chunks:
        whole.text += chunk.text
        whole.token_ids += chunk.token_ids
        whole.logprobs += chunk.logprobs
        whole.finish_reason = chunk.finish_reason or whole.finish_reason
        whole.usage = chunk.usage or whole.usage
    return whole


# --- what the trainer reports ----------------------------------------------------------------------------------
@dataclass
class TrainingRun:
    """What one request's training did."""

    steps: int = 0
    sequences: int = 0  # how many of the given texts the steps drew from (a long text is several steps)
    tokens: int = 0
    seconds: float = 0.0
    setup_ms: float = 0.0
    losses: list[float] = field(default_factory=list)
    stopped: StopReason = "completed"
    learning_rate: float = 0.0  # the rate of the plan it was started for (TrainingConfig.learning_rate_for)

    @property
    def cut_short(self) -> bool:
        """Stopped by a deadline or a cancellation before the steps it was asked for."""
        return self.stopped in ("deadline", "cancelled")


# --- one request through the pipeline ------------------------------------------------------------------------
@dataclass
class GenerateRequest:
    """A request as the pipeline takes it: already validated against the wire protocol."""

    prompt: str | list[int] | None = None  # /v1/completions
    messages: list[dict[str, str]] | None = None  # /v1/chat/completions
    max_tokens: int | None = None  # None: up to the end of the context
    sampling: SamplingParams = field(default_factory=SamplingParams)  # its max_tokens is replaced
    compute_budget: int | None = None  # None: the server default
    strategy: Strategy | None = None
    lam: float | None = None
    mode: Mode | None = None
    deadline_s: float | None = None
    n: int | None = None
    prompt_logprobs: int | None = None  # echo + logprobs: score the prompt with this many top logprobs
    request_id: str | None = None
    # Adapters are reused only between requests with the same salt (the tenant's, and the request's own
    # `cache_salt`): see ServerConfig.salt_adapters_by_key.
    cache_salt: str | None = None
    # When the server received it (time.time(), stamped by the HTTP layer): the time it then spent queued
    # and planned before a replica took it counts against its training deadline.
    received_at: float | None = None

    def retrieval_text(self) -> str | None:
        """The text retrieval searches with: the messages' contents, or the prompt. None for a prompt of token
        ids, which only the model's tokenizer can turn into text."""
        if self.messages is not None:
            return "\n".join(m["content"] for m in self.messages if m["content"].strip())
        if isinstance(self.prompt, str):
            return self.prompt
        return None


@dataclass
class TTTOutcome:
    """What test-time training did for one request (the wire's `ttt` object is made from it)."""

    budget: int  # the compute budget the request got (after the server's default and cap)
    strategy: str
    decision: Decision = "skipped"
    reason: str = ""  # the policy's plan, and for a fallback what went wrong
    steps: int = 0  # gradient steps taken
    planned_steps: int = 0  # what the policy planned; more than `steps` when training was cut short
    stopped: StopReason | None = None  # why training ended before its plan (deadline, cancelled); else None
    training_tokens: int = 0
    training_seconds: float = 0.0  # 0 when an adapter was reused
    selected_ids: list[int] = field(default_factory=list)  # datastore sequence ids, in selection order
    uncertainty_before: float | None = None  # SIFT's posterior variance before any data ...
    uncertainty_after: float | None = None  # ... and after the data trained on
    predicted_gain_bpb: float | None = None  # from the calibrated gain model, if any
    adapter_id: str | None = None  # the adapter's content key: equal ids mean identical weights
    cached: bool = False  # the adapter was reused from the cache rather than trained
    retrieval_ms: float = 0.0

    @property
    def trained(self) -> bool:
        """Whether an adapter answered (trained now or reused)."""
        return self.decision in ("trained", "reused")


@dataclass
class TrainingPlan:
    """What was decided for a request before a generator replica is chosen (ttserve/planning.py): whether
    to train, on which picks, for how many steps, and so which adapter it needs. Under Ray the Planner
    deployment makes it and the ingress routes the request by `adapter_id` to the replica holding that
    adapter; on one replica the pipeline makes it itself."""

    outcome: TTTOutcome  # so far: the decision (skipped, or fallback when retrieval failed), reason, picks
    texts: list[str] = field(default_factory=list)  # the picks' texts, in training order
    variances: list[float] = field(default_factory=list)  # SIFT's uncertainty after 0, 1, ... picks

    @property
    def steps(self) -> int:
        """Training steps planned (0: the base model answers)."""
        return self.outcome.planned_steps if self.outcome.decision == "skipped" else 0

    @property
    def adapter_id(self) -> str | None:
        """The planned adapter's content key (what requests are routed by); None when none is planned."""
        return self.outcome.adapter_id if self.steps else None


@dataclass
class Started:
    """The first event of every answer: test-time training is settled and generation begins."""

    prompt_ids: list[int]
    ttt: TTTOutcome
    prompt_scores: PromptScores | None = None


@dataclass
class ReplicaStats:
    """Counters of one generator replica, for /metrics: the adapter cache, the training queue, the LoRA gate."""

    adapters_cached: int
    adapter_bytes: int
    cache_hits: int
    cache_misses: int
    cache_evictions: int
    trainings_queued: int  # admitted and not finished (waiting or running)
    training_steps_queued: int
    adapters_loaded: int = 0  # in the engine (the cache's, plus any being trained into it)
    generations_running: int = 0  # holding a generation slot (admission.py)
    generations_waiting: int = 0
    generations_refused: int = 0  # refused with Overloaded since the replica started
    # vLLM on CPU only (the LoRA gate, engines/lora_gate.py): requests by path, and waits for plain ones.
    gate_plain: int | None = None
    gate_zero_adapter: int | None = None
    gate_adapted: int | None = None
    gate_waited: int | None = None
    # Which replica these are: Ray Serve's replica tag under Ray (as on Ray's metrics port), "" in-process.
    replica: str = ""
