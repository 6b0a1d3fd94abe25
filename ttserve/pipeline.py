"""One request, start to finish, on one generator replica: tokenize, decide, retrieve, plan, train, answer.

    request ─► tokenize + check ─► policy: skip? ─► retrieve ─► policy: plan ─► adapter cache ─► engine
                 (engine)            (policy.py)    (a Retriever      (steps, reason)  hit, or train on
                                                     or a Ray handle)                   the training thread

`RequestPipeline` is plain Python with its parts passed in, so tests drive it with stand-ins and the Ray
app and the in-process server wrap the same object (ttserve/serving/replica.py builds the real parts).
It speaks only the contract's types: a `GenerateRequest` in; `Started` (with a `TTTOutcome`), then the
engine's `GenerationChunk`s out; `RequestError`s for requests it refuses, raised before anything is
yielded so a refused request never starts a stream and changes nothing.

What it promises: a request trains at most its budget; an adapter is reused only for an identical key
(so one request never sees another's adapter unless both would have trained the same weights); and
whatever goes wrong in retrieval or training, the base model answers and `reason` says why; except that
training cut short by its deadline after k > 0 steps answers with the adapter of those k steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from ttserve.adapter_cache import AdapterCache, AdapterKey, AdapterLease
from ttserve.config import ServerConfig, TrainingConfig
from ttserve.contract import (
    ContextLengthError,
    GenerateRequest,
    GenerationChunk,
    InvalidRequest,
    ReplicaStats,
    Started,
    Strategy,
    TrainingRun,
    TTTOutcome,
    collect,
)
from ttserve.engines.base import Engine
from ttserve.policy import Policy
from ttserve.threads import Trainer, TrainingStopped, TrainingThread

if TYPE_CHECKING:
    from ttserve.retrieval import Retrieval

log = logging.getLogger(__name__)


class Retrieve(Protocol):
    """Retrieval as the pipeline calls it: `Retriever.retrieve_async`, or a Ray handle to the Retriever."""

    def __call__(
        self, text: str, *, n: int | None, strategy: Strategy | None, lam: float | None
    ) -> Awaitable[Retrieval]: ...


class RequestPipeline:
    """The request orchestrator of one replica. `clock` is time.monotonic (deadlines given to the trainer
    are on it); tests may pass another."""

    def __init__(
        self,
        *,
        engine: Engine,
        trainer: Trainer,
        training: TrainingConfig,
        adapters: AdapterCache,
        policy: Policy,
        retrieve: Retrieve | None,
        limits: ServerConfig,
        default_strategy: Strategy = "sift",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.engine = engine
        self.trainer = trainer
        self.training_config = training  # part of every adapter's key: it decides the weights
        self.adapters = adapters
        self.policy = policy
        self.retrieve = retrieve
        self.limits = limits
        self.default_strategy = default_strategy
        self.clock = clock
        self.training = TrainingThread(trainer, clock)

    def close(self) -> None:
        """Stop the training thread. The parts (engine, cache) belong to whoever built them."""
        self.training.close()

    def stats(self) -> ReplicaStats:
        gate = self.engine.lora_gate_stats()
        return ReplicaStats(
            adapters_cached=len(self.adapters),
            adapter_bytes=self.adapters.bytes,
            cache_hits=self.adapters.stats.hits,
            cache_misses=self.adapters.stats.misses,
            cache_evictions=self.adapters.stats.evictions,
            trainings_queued=self.training.queued,
            training_steps_queued=self.training.queued_steps,
            gate_plain=gate.plain if gate else None,
            gate_zero_adapter=gate.zero_adapter if gate else None,
            gate_adapted=gate.adapted if gate else None,
            gate_waited=gate.waited if gate else None,
        )

    # --- the request ----------------------------------------------------------------------------------
    async def stream(self, request: GenerateRequest) -> AsyncIterator[Started | GenerationChunk]:
        """`Started`, then the engine's chunks. A refused request raises before anything is yielded."""
        arrived = self.clock()
        prompt_ids, query = self._tokenize(request)
        max_tokens = request.max_tokens
        if max_tokens is None:  # up to the end of the context (none left: the check below refuses it)
            max_tokens = max(0, self.engine.max_model_len - len(prompt_ids))
        try:
            self.engine.check_context(prompt_ids, max_tokens)
        except ContextLengthError as error:
            raise ContextLengthError(error.message, "messages" if request.messages else "prompt") from None
        budget = self._budget(request.compute_budget)

        outcome, lease = await self._test_time_train(request, query, budget, arrived)
        adapter = lease.adapter if lease else None
        try:
            scores = None
            if request.prompt_logprobs is not None:
                scores = await self.engine.score(prompt_ids, adapter, top_logprobs=request.prompt_logprobs)
            yield Started(prompt_ids, outcome, scores)
            sampling = replace(request.sampling, max_tokens=max_tokens)
            async for chunk in self.engine.generate(prompt_ids, sampling, adapter, request.request_id):
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
        if request.messages is not None:
            ids = self.engine.encode_chat(request.messages)
            return ids, "\n".join(m["content"] for m in request.messages if m["content"].strip())
        if isinstance(request.prompt, str):
            return self.engine.encode(request.prompt), request.prompt
        ids = list(request.prompt or [])
        vocabulary = len(self.engine.tokenizer)
        if any(not 0 <= token < vocabulary for token in ids):
            raise InvalidRequest(f"token ids must be in [0, {vocabulary})", param="prompt")
        return ids, self.engine.decode(ids)

    def _budget(self, requested: int | None) -> int:
        limits = self.limits
        if requested is None:
            return min(limits.default_compute_budget, limits.max_compute_budget)
        if requested > limits.max_compute_budget:
            raise InvalidRequest(
                f"compute_budget {requested} is above this server's maximum of {limits.max_compute_budget}",
                param="compute_budget",
            )
        return requested

    # --- test-time training ---------------------------------------------------------------------------
    async def _test_time_train(
        self, request: GenerateRequest, query: str, budget: int, arrived: float
    ) -> tuple[TTTOutcome, AdapterLease | None]:
        outcome = TTTOutcome(budget=budget, strategy=request.strategy or self.default_strategy)
        skip = self.policy.skip_before_retrieval(request.mode, budget, query, self.retrieve is not None)
        if skip is not None:
            outcome.reason = skip
            return outcome, None
        try:
            retrieval = await asyncio.wait_for(
                self.retrieve(query, n=request.n, strategy=request.strategy, lam=request.lam),
                self.limits.retrieval_timeout_s,
            )
        except Exception as error:  # noqa: BLE001 - any retrieval fault degrades to the base model
            log.exception("retrieval failed")
            return _fallback(outcome, f"retrieval failed ({type(error).__name__}: {error})"), None
        outcome.strategy = retrieval.strategy
        outcome.retrieval_ms = round(sum(retrieval.timings_ms.values()), 3)
        outcome.selected_ids = [int(i) for i in retrieval.ids]
        outcome.uncertainty_before = retrieval.uncertainty_before
        planned = self.policy.plan(retrieval.selection, budget, request.mode)
        outcome.predicted_gain_bpb = planned.predicted_gain if self.policy.gain_model else None
        outcome.uncertainty_after = float(retrieval.variances[planned.steps])
        outcome.reason = planned.reason
        outcome.planned_steps = planned.steps
        if planned.steps == 0:
            return outcome, None

        def adapter_key(picks: int, steps: int) -> AdapterKey:
            """What decides an adapter's weights: the model, the picks trained on, the settings, the steps."""
            return AdapterKey.of(self.trainer.base_name, retrieval.ids[:picks], self.training_config, steps)

        steps = planned.steps
        key = adapter_key(steps, steps)
        outcome.adapter_id = key.digest
        lease = self.adapters.acquire(key)
        if lease is None:
            deadline = arrived + min(request.deadline_s or float("inf"), self.limits.training_deadline_s)
            refusal = self.training.refusal(steps, deadline, self.limits.max_queued_trainings)
            if refusal is not None:
                return _fallback(outcome, f"{planned.reason}; {refusal}"), None
            texts = retrieval.texts[:steps]

            def trained_key(run: TrainingRun) -> AdapterKey:
                # Cut short after k steps, the adapter is exactly the k-step adapter of the texts it drew from.
                return adapter_key(run.sequences, run.steps) if run.cut_short else key

            try:
                lease = await self.adapters.get_or_train(
                    key, lambda directory: self.training.train(texts, steps, directory, deadline), trained_key
                )
            except TrainingStopped as stopped:
                return _fallback(outcome, f"{planned.reason}; {stopped}"), None
            except Exception as error:  # noqa: BLE001 - a training fault falls back to the base model
                log.exception("test-time training failed")
                return _fallback(
                    outcome, f"test-time training failed ({type(error).__name__}: {error})"
                ), None
        run = lease.info
        outcome.decision = "reused" if lease.cached else "trained"
        outcome.cached = lease.cached
        outcome.adapter_id = lease.key.digest
        outcome.steps = run.steps
        outcome.training_tokens = run.tokens
        outcome.training_seconds = 0.0 if lease.cached else round(run.seconds, 4)
        if run.cut_short and run.steps < steps:  # (a reused k-step adapter answers a k-step plan in full)
            outcome.stopped = run.stopped
            outcome.uncertainty_after = float(retrieval.variances[run.sequences])
            outcome.reason = (
                f"{planned.reason}; training stopped ({run.stopped}) after {run.steps} of {steps} steps: "
                f"answered with the adapter of those {run.steps} steps"
            )
        if lease.cached:
            outcome.reason = f"{outcome.reason}; reused the adapter trained for an identical earlier request"
        return outcome, lease


def _fallback(outcome: TTTOutcome, why: str) -> TTTOutcome:
    """Training was wanted but could not happen: the base model answers, and the reason says why."""
    outcome.decision = "fallback"
    outcome.adapter_id = None
    outcome.reason = f"{why}; answered with the base model"
    return outcome
