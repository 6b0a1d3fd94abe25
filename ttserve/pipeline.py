"""One request, start to finish, on one generator replica: tokenize, plan, train, answer.

    request ─► tokenize + check ─► plan (planning.py: budget, ─► adapter cache ─► engine
                 (engine)            skip?, retrieve, steps)      hit, or train on
                                     or the plan it was given     the training thread

`RequestPipeline` is plain Python with its parts passed in, so tests drive it with stand-ins and the Ray
app and the in-process server wrap the same object (ttserve/serving/replica.py builds the real parts).
It speaks only the contract's types: a `GenerateRequest` (and, under Ray, the `TrainingPlan` the Planner
made for it) in; `Started` (with a `TTTOutcome`), then the engine's `GenerationChunk`s out;
`RequestError`s for requests it refuses, raised before anything is yielded so a refused request never
starts a stream and changes nothing.

What it promises: a request trains at most its budget; an adapter is reused only for an identical key
(so one request never sees another's adapter unless both would have trained the same weights); and
whatever goes wrong in retrieval or training, the base model answers and `reason` says why; except that
training cut short by its deadline after k > 0 steps answers with the adapter of those k steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import replace

from ttserve.adapter_cache import AdapterCache, AdapterKey, AdapterLease
from ttserve.admission import GenerationSlots
from ttserve.config import ServerConfig, TrainingConfig
from ttserve.contract import (
    Adapter,
    ContextLengthError,
    GenerateRequest,
    GenerationChunk,
    InvalidRequest,
    ReplicaStats,
    Started,
    Strategy,
    TrainingPlan,
    TrainingRun,
    TTTOutcome,
    collect,
)
from ttserve.engines.base import Engine
from ttserve.planning import RequestPlanner, Retrieve
from ttserve.policy import Policy
from ttserve.threads import Trainer, TrainingStopped, TrainingThread

log = logging.getLogger(__name__)

__all__ = ["RequestPipeline", "Retrieve"]


class RequestPipeline:
    """The request orchestrator of one replica. `clock` is time.monotonic (deadlines given to the trainer
    are on it) and `wall_clock` time.time (requests' `received_at`); tests may pass others. `model` names
    the base model in adapter keys (default: the trainer's); replicas that share adapter ids across
    processes must agree on it."""

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
        wall_clock: Callable[[], float] = time.time,
        model: str | None = None,
        slots: GenerationSlots | None = None,
    ):
        self.engine = engine
        self.trainer = trainer
        self.adapters = adapters
        self.limits = limits
        self.clock = clock
        self.wall_clock = wall_clock  # what requests' received_at is on (shared across machines)
        self.planner = RequestPlanner(
            retrieve=retrieve,
            policy=policy,
            training=training,
            model=model or trainer.base_name,
            limits=limits,
            default_strategy=default_strategy,
            clock=clock,
        )
        self.training = TrainingThread(trainer, clock)
        # Admission for generations (admission.py); the engine's own concurrency unless the server sets one.
        self.slots = slots or GenerationSlots.of(limits, engine.default_concurrency)
        self.generating = 0  # requests holding a generation slot, not yet answered (autoscaling)

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
            adapters_loaded=len(self.engine.loaded_adapters()),
            trainings_queued=self.training.queued,
            training_steps_queued=self.training.queued_steps,
            generations_running=self.slots.running,
            generations_waiting=self.slots.waiting,
            generations_refused=self.slots.refused,
            gate_plain=gate.plain if gate else None,
            gate_zero_adapter=gate.zero_adapter if gate else None,
            gate_adapted=gate.adapted if gate else None,
            gate_waited=gate.waited if gate else None,
        )

    # --- the request ----------------------------------------------------------------------------------
    async def stream(
        self, request: GenerateRequest, plan: TrainingPlan | None = None
    ) -> AsyncIterator[Started | GenerationChunk]:
        """`Started`, then the engine's chunks. A refused request raises before anything is yielded.
        `plan`: what the Planner decided for this request elsewhere (None: plan here)."""
        arrived = self.clock()
        prompt_ids, query = self._tokenize(request)
        max_tokens = request.max_tokens
        if max_tokens is None:  # up to the end of the context (none left: the check below refuses it)
            max_tokens = max(0, self.engine.max_model_len - len(prompt_ids))
        try:
            self.engine.check_context(prompt_ids, max_tokens)
        except ContextLengthError as error:
            raise ContextLengthError(error.message, "messages" if request.messages else "prompt") from None
        if request.received_at is not None:  # queued and planned before this replica took it: counts too
            arrived -= max(0.0, self.wall_clock() - request.received_at)
        if plan is None:
            plan = await self.planner.plan(request, query)
        else:  # planned elsewhere: the cap still holds here
            self.planner.budget(request.compute_budget)

        outcome, lease = await self._adapter_for(request, plan, arrived)
        try:
            # A full replica refuses here (Overloaded), before anything is yielded. An adapter trained for
            # the refused request stays cached, so its retry reuses it.
            adapter = lease.adapter if lease else None
            async with (
                self.slots.hold(),
                aclosing(self._answer(request, prompt_ids, max_tokens, outcome, adapter)) as events,
            ):
                async for event in events:  # closed with this stream, so the slot is freed only after it
                    yield event
        finally:
            if lease is not None:
                await lease.release()

    async def _answer(
        self,
        request: GenerateRequest,
        prompt_ids: list[int],
        max_tokens: int,
        outcome: TTTOutcome,
        adapter: Adapter | None,
    ) -> AsyncIterator[Started | GenerationChunk]:
        self.generating += 1
        try:
            scores = None
            if request.prompt_logprobs is not None:
                scores = await self.engine.score(prompt_ids, adapter, top_logprobs=request.prompt_logprobs)
            yield Started(prompt_ids, outcome, scores)
            sampling = replace(request.sampling, max_tokens=max_tokens)
            async with aclosing(
                self.engine.generate(prompt_ids, sampling, adapter, request.request_id)
            ) as chunks:
                async for chunk in chunks:  # closed at once when the client goes: the engine stops decoding
                    yield chunk
        finally:
            self.generating -= 1

    async def complete(
        self, request: GenerateRequest, plan: TrainingPlan | None = None
    ) -> tuple[Started, GenerationChunk]:
        """The whole answer at once: for non-streamed responses, one round trip through a Ray handle
        instead of one per token."""
        events = self.stream(request, plan)
        started = await anext(events)
        return started, await collect(events)

    def query(self, request: GenerateRequest) -> str:
        """The text retrieval searches with (a prompt of token ids decoded by the model's tokenizer)."""
        return self._tokenize(request)[1]

    def _tokenize(self, request: GenerateRequest) -> tuple[list[int], str]:
        """The prompt's token ids and the text retrieval searches with."""
        text = request.retrieval_text()
        if request.messages is not None:
            return self.engine.encode_chat(request.messages), text or ""
        if isinstance(request.prompt, str):
            return self.engine.encode(request.prompt), request.prompt
        ids = list(request.prompt or [])
        vocabulary = len(self.engine.tokenizer)
        if any(not 0 <= token < vocabulary for token in ids):
            raise InvalidRequest(f"token ids must be in [0, {vocabulary})", param="prompt")
        return ids, self.engine.decode(ids)

    # --- test-time training ---------------------------------------------------------------------------
    async def _adapter_for(
        self, request: GenerateRequest, plan: TrainingPlan, arrived: float
    ) -> tuple[TTTOutcome, AdapterLease | None]:
        """The plan carried out: the planned adapter from the cache, or trained now; else the base model."""
        outcome = replace(plan.outcome, selected_ids=list(plan.outcome.selected_ids))
        steps = plan.steps
        if steps == 0:
            return outcome, None
        picks = outcome.selected_ids
        salt = request.cache_salt
        key = self.planner.adapter_key(picks[:steps], steps, salt)
        outcome.adapter_id = key.digest
        lease = self.adapters.acquire(key)
        if lease is None:
            deadline = arrived + min(request.deadline_s or float("inf"), self.limits.training_deadline_s)
            refusal = self.training.refusal(steps, deadline, self.limits.max_queued_trainings)
            if refusal is not None:
                return _fallback(outcome, f"{outcome.reason}; {refusal}"), None
            texts = plan.texts[:steps]

            def trained_key(run: TrainingRun) -> AdapterKey:
                # Cut short after k steps, the adapter is exactly the first k steps of the texts it drew from
                # at the rate of the plan it was started for.
                return (
                    self.planner.adapter_key(picks[: run.sequences], run.steps, salt, planned=steps)
                    if run.cut_short
                    else key
                )

            try:
                lease = await self.adapters.get_or_train(
                    key, lambda directory: self.training.train(texts, steps, directory, deadline), trained_key
                )
            except TrainingStopped as stopped:
                return _fallback(outcome, f"{outcome.reason}; {stopped}"), None
            except Exception as error:  # noqa: BLE001 - a training fault falls back to the base model
                log.exception("test-time training failed")
                return _fallback(
                    outcome, f"test-time training failed ({type(error).__name__}: {error})"
                ), None
        run = lease.info
        planned_reason = outcome.reason
        outcome.decision = "reused" if lease.cached else "trained"
        outcome.cached = lease.cached
        outcome.adapter_id = lease.key.digest
        outcome.steps = run.steps
        outcome.training_tokens = run.tokens
        outcome.training_seconds = 0.0 if lease.cached else round(run.seconds, 4)
        if run.cut_short and run.steps < steps:  # (a reused k-step adapter answers a k-step plan in full)
            outcome.stopped = run.stopped
            outcome.uncertainty_after = plan.variances[run.sequences]
            outcome.reason = (
                f"{planned_reason}; training stopped ({run.stopped}) after {run.steps} of {steps} steps: "
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
