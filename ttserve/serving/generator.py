"""One request, start to finish, on one generator replica: tokenize, retrieve, plan, train, answer.

Plain Python: the Ray Serve deployment (app.py) and the in-process server (local.py) both wrap a
`Generator`. Retrieval is a callable so that it can be a Ray handle to the retriever deployment or a local
`Retriever` alike.

Test-time training runs in one worker thread per replica (the trainer owns one adapter slot), behind an
admission check: a request whose training cannot start and finish before its deadline, or that finds the
queue full, is answered by the base model right away, and `ttt.reason` says why. So does a request whose
training fails: a fault in training never fails the request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ttserve.adapter_cache import AdapterCache, AdapterKey, AdapterLease
from ttserve.config import Settings
from ttserve.engines import (
    ContextLengthError,
    Engine,
    GenerationChunk,
    PromptScores,
    SamplingParams,
    collect,
)
from ttserve.engines import start_engine as start_configured_engine
from ttserve.lm import load_model
from ttserve.policy import load_gain_model, plan
from ttserve.retrieval import Retrieval
from ttserve.serving.protocol import APIError, TTTInfo
from ttserve.training import TestTimeTrainer

log = logging.getLogger(__name__)

RetrieveFn = Callable[..., Awaitable[Retrieval]]  # (text, n=, strategy=, lam=) -> Retrieval


@dataclass
class GenerateRequest:
    """What the API layer hands the generator: already validated against the wire protocol."""

    prompt: str | list[int] | None = None  # /v1/completions
    messages: list[dict[str, str]] | None = None  # /v1/chat/completions
    max_tokens: int | None = None  # None: up to the end of the context
    sampling: SamplingParams = field(default_factory=SamplingParams)  # its max_tokens is replaced
    compute_budget: int | None = None  # None: the server default
    strategy: Literal["sift", "knn"] | None = None
    lam: float | None = None
    mode: Literal["auto", "always", "off"] | None = None
    deadline_s: float | None = None
    n: int | None = None
    prompt_logprobs: int | None = None  # echo + logprobs: score the prompt with this many top logprobs
    request_id: str | None = None


@dataclass
class Started:
    """The first event of every answer: test-time training is settled and generation begins."""

    prompt_ids: list[int]
    ttt: TTTInfo
    prompt_scores: PromptScores | None = None


class TrainingSkipped(Exception):
    """Training was admitted but could not finish in time; the reason goes into ttt.reason."""


def served_model_name(settings: Settings) -> str:
    if settings.server.served_model_name:
        return settings.server.served_model_name
    return settings.model.name_or_path or "ttserve-tiny"


class Generator:
    def __init__(self, settings: Settings, retrieve: RetrieveFn | None):
        self.settings = settings
        self.model_id = served_model_name(settings)
        self.retrieve = retrieve
        self.trainer = TestTimeTrainer(load_model(settings.model), settings.training)
        self.gain_model = load_gain_model(settings.policy, settings.model.name_or_path)
        self.engine: Engine | None = None
        self.cache: AdapterCache | None = None
        self._training = ThreadPoolExecutor(1, thread_name_prefix="ttserve-train")
        self._queued_trainings = 0  # admitted, not finished (waiting or running)
        self._queued_steps = 0
        self._seconds_per_step: float | None = None  # running estimate, for admission

    async def start(self) -> Generator:
        """Start the engine; call once from the event loop that will serve requests."""
        self.engine = await start_configured_engine(self.settings, self.trainer)
        adapters = self.settings.adapters
        self.cache = AdapterCache(
            self.engine, adapters.max_adapters, adapters.max_bytes, adapters.scratch_dir
        )
        return self

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        if self.engine is not None:
            await self.engine.close()
        self._training.shutdown(wait=False, cancel_futures=True)

    # --- the request ----------------------------------------------------------------------------------
    async def stream(self, request: GenerateRequest) -> AsyncIterator[Started | GenerationChunk]:
        """`Started`, then the engine's chunks. Bad input raises APIError before anything is yielded."""
        arrived = time.monotonic()
        engine = self.engine
        if engine is None:
            raise APIError.unavailable("the model is still loading")
        prompt_ids, query = self._tokenize(request)
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = engine.max_model_len - len(prompt_ids)
        try:
            engine.check_context(prompt_ids, max_tokens)
        except ContextLengthError as error:
            raise APIError.bad_request(
                str(error), param="messages" if request.messages else "prompt"
            ) from None
        budget = self._budget(request.compute_budget)

        ttt, lease = await self._test_time_train(request, query, budget, arrived)
        adapter = lease.adapter if lease else None
        try:
            scores = None
            if request.prompt_logprobs is not None:
                scores = await engine.score(prompt_ids, adapter, top_logprobs=request.prompt_logprobs)
            yield Started(prompt_ids, ttt, scores)
            sampling = replace(request.sampling, max_tokens=max_tokens)
            async for chunk in engine.generate(prompt_ids, sampling, adapter, request.request_id):
                yield chunk
        finally:
            if lease is not None:
                await lease.release()

    async def complete(self, request: GenerateRequest) -> tuple[Started, GenerationChunk]:
        """The whole answer at once: for non-streamed responses, one round trip through a Ray handle
        instead of one per token."""
        events = self.stream(request)
        started = await anext(events)
        return started, await collect(events)

    def _tokenize(self, request: GenerateRequest) -> tuple[list[int], str]:
        """The prompt's token ids and the text retrieval searches with."""
        engine = self.engine
        if request.messages is not None:
            try:
                ids = engine.encode_chat(request.messages)
            except ValueError as error:
                raise APIError.unprocessable(str(error), param="messages") from None
            return ids, "\n".join(m["content"] for m in request.messages if m["content"].strip())
        if isinstance(request.prompt, str):
            return engine.encode(request.prompt), request.prompt
        ids = list(request.prompt or [])
        vocabulary = len(engine.tokenizer)
        if any(not 0 <= token < vocabulary for token in ids):
            raise APIError.bad_request(f"token ids must be in [0, {vocabulary})", param="prompt")
        return ids, engine.decode(ids)

    def _budget(self, requested: int | None) -> int:
        server = self.settings.server
        if requested is None:
            return min(server.default_compute_budget, server.max_compute_budget)
        if requested > server.max_compute_budget:
            raise APIError.bad_request(
                f"compute_budget {requested} is above this server's maximum of {server.max_compute_budget}",
                param="compute_budget",
            )
        return requested

    async def _test_time_train(
        self, request: GenerateRequest, query: str, budget: int, arrived: float
    ) -> tuple[TTTInfo, AdapterLease | None]:
        settings = self.settings
        mode = request.mode or settings.policy.mode
        strategy = request.strategy or settings.retrieval.strategy
        info = TTTInfo(budget=budget, strategy=strategy, reason="")
        if mode == "off":
            info.reason = "test-time training is off"
            return info, None
        if budget == 0:
            info.reason = "compute budget is 0"
            return info, None
        if self.retrieve is None:
            info.reason = "no datastore is configured"
            return info, None
        if not query.strip():
            info.reason = "the prompt has no text to retrieve for"
            return info, None
        try:
            retrieval = await asyncio.wait_for(
                self.retrieve(query, n=request.n, strategy=strategy, lam=request.lam),
                settings.server.retrieval_timeout_s,
            )
        except Exception as error:  # noqa: BLE001 - any retrieval fault degrades to the base model
            log.exception("retrieval failed")
            info.decision = "fallback"
            info.reason = f"retrieval failed ({type(error).__name__}: {error}); answered with the base model"
            return info, None
        info.retrieval_ms = round(sum(retrieval.timings_ms.values()), 3)
        info.selected_ids = [int(i) for i in retrieval.ids]
        info.uncertainty_before = retrieval.uncertainty_before
        planned = plan(retrieval.selection, budget, settings.policy, self.gain_model, mode)
        info.predicted_gain_bpb = planned.predicted_gain if self.gain_model else None
        info.uncertainty_after = float(retrieval.variances[planned.steps])
        info.reason = planned.reason
        if planned.steps == 0:
            return info, None

        steps = planned.steps
        key = AdapterKey.of(self.trainer.base_name, retrieval.ids[:steps], settings.training, steps)
        info.adapter_id = key.digest
        lease = self.cache.acquire(key)
        if lease is None:
            deadline = arrived + min(request.deadline_s or float("inf"), settings.server.training_deadline_s)
            refusal = self._admission(steps, deadline)
            if refusal:
                info.adapter_id, info.decision = None, "fallback"
                info.reason = f"{planned.reason}; {refusal}; answered with the base model"
                return info, None
            texts = retrieval.texts[:steps]
            try:
                lease = await self.cache.get_or_train(key, lambda d: self._train(texts, steps, d, deadline))
            except TrainingSkipped as skipped:
                info.adapter_id, info.decision = None, "fallback"
                info.reason = f"{planned.reason}; {skipped}; answered with the base model"
                return info, None
            except Exception as error:  # noqa: BLE001 - a training fault falls back to the base model
                log.exception("test-time training failed")
                info.adapter_id, info.decision = None, "fallback"
                info.reason = f"test-time training failed ({type(error).__name__}: {error}); answered with the base model"
                return info, None
        run = lease.info
        info.decision = "reused" if lease.cached else "trained"
        info.trained = True
        info.cached = lease.cached
        info.steps = run["steps"]
        info.training_tokens = run["tokens"]
        info.training_seconds = 0.0 if lease.cached else run["seconds"]
        if lease.cached:
            info.reason = f"{planned.reason}; reused the adapter trained for an identical earlier request"
        return info, lease

    def _admission(self, steps: int, deadline: float) -> str | None:
        """Why a new training must not start (None: admit it)."""
        server = self.settings.server
        if self._queued_trainings >= server.max_queued_trainings:
            return f"the training queue is full ({self._queued_trainings} requests)"
        if self._seconds_per_step is not None:
            needed = (self._queued_steps + steps) * self._seconds_per_step
            left = deadline - time.monotonic()
            if needed > left:
                return f"training could not finish within the deadline (about {needed:.1f}s needed, {left:.1f}s left)"
        return None

    async def _train(self, texts: list[str], steps: int, directory: Path, deadline: float) -> dict[str, Any]:
        self._queued_trainings += 1
        self._queued_steps += steps
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(
            self._training, self._train_blocking, texts, steps, directory, deadline, cancel
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # The client went away. Stop the trainer at its next step and let it finish writing before the
            # caller deletes the directory; the training thread is then free for the next request.
            cancel.set()
            await asyncio.wait([work])
            raise
        finally:
            self._queued_trainings -= 1
            self._queued_steps -= steps

    def _train_blocking(
        self, texts: list[str], steps: int, directory: Path, deadline: float, cancel: threading.Event
    ) -> dict[str, Any]:
        if cancel.is_set():
            raise TrainingSkipped("the request was cancelled before training started")
        if time.monotonic() >= deadline:
            raise TrainingSkipped("the deadline passed while the request waited for the trainer")
        run = self.trainer.train(texts, steps, output_dir=directory, deadline=deadline, cancel=cancel)
        if run.steps:
            per_step = run.seconds / run.steps
            previous = self._seconds_per_step
            self._seconds_per_step = per_step if previous is None else 0.8 * previous + 0.2 * per_step
        if run.stopped in ("deadline", "cancelled"):
            raise TrainingSkipped(f"training stopped ({run.stopped}) after {run.steps} of {steps} steps")
        return {
            "steps": run.steps,
            "tokens": run.tokens,
            "seconds": round(run.seconds, 4),
            "stopped": run.stopped,
        }
