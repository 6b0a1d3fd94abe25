"""Everything decided about a request before a generator replica is chosen: the budget, whether to retrieve,
the picks, how many steps to train, and so which adapter the request needs.

    request + its text ─► budget ─► policy: skip? ─► retrieve ─► policy: plan ─► TrainingPlan (adapter id)

Planning needs no model, only retrieval and the policy, so it can run before routing: under Ray the Planner
deployment runs it and the ingress sends the request to the generator replica that holds (or will train)
the planned adapter (docs/scaling.md). On one replica the pipeline calls it directly (ttserve/pipeline.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from ttserve.adapter_cache import AdapterKey
from ttserve.config import ServerConfig, TrainingConfig
from ttserve.contract import GenerateRequest, InvalidRequest, Strategy, TrainingPlan, TTTOutcome
from ttserve.policy import Policy

if TYPE_CHECKING:
    from ttserve.retrieval import Retrieval

log = logging.getLogger(__name__)


class Retrieve(Protocol):
    """Retrieval as the planner calls it: `Retriever.retrieve_async`, or a Ray handle to the Planner's."""

    def __call__(
        self, text: str, *, n: int | None, strategy: Strategy | None, lam: float | None
    ) -> Awaitable[Retrieval]: ...


class RequestPlanner:
    """`model` names the base model in adapter keys; every replica serving the same model must agree on it.
    `clock` times planning (a plan says how long it took, which counts against the request's deadline)."""

    def __init__(
        self,
        *,
        retrieve: Retrieve | None,
        policy: Policy,
        training: TrainingConfig,
        model: str,
        limits: ServerConfig,
        default_strategy: Strategy = "sift",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.retrieve = retrieve
        self.policy = policy
        self.training = training  # part of every adapter's key: it decides the weights
        self.model = model
        self.limits = limits
        self.default_strategy = default_strategy
        self.clock = clock

    def budget(self, requested: int | None) -> int:
        """The request's compute budget: the server default when it gives none; above the cap, refused."""
        limits = self.limits
        if requested is None:
            return min(limits.default_compute_budget, limits.max_compute_budget)
        if requested > limits.max_compute_budget:
            raise InvalidRequest(
                f"compute_budget {requested} is above this server's maximum of {limits.max_compute_budget}",
                param="compute_budget",
            )
        return requested

    def adapter_key(
        self, picks: list[int], steps: int, salt: str | None = None, planned: int | None = None
    ) -> AdapterKey:
        """What decides an adapter's weights (the model, the picks trained on, the settings with the rate of
        the plan it was trained for, the steps), and who may share it (`salt`). `planned`: the steps of the
        plan a run cut short was started for (None: `steps`)."""
        training = self.training.for_plan(steps if planned is None else planned)
        return AdapterKey.of(self.model, picks, training, steps, salt)

    def _outcome(self, request: GenerateRequest) -> TTTOutcome:
        return TTTOutcome(
            budget=self.budget(request.compute_budget), strategy=request.strategy or self.default_strategy
        )

    def plan_before_retrieval(
        self, request: GenerateRequest, query: str, can_retrieve: bool | None = None
    ) -> TrainingPlan | None:
        """The plan when it needs no retrieval (budget 0, mode off, no datastore, no text); None when it
        does. Raises `InvalidRequest` for a budget over the cap. Cheap: under Ray the ingress calls it, so
        that a base-model request never waits for the Planner. `can_retrieve`: whether there is a datastore
        (default: whether this planner retrieves; the ingress's does not, the Planner deployment does)."""
        outcome = self._outcome(request)
        if can_retrieve is None:
            can_retrieve = self.retrieve is not None
        skip = self.policy.skip_before_retrieval(request.mode, outcome.budget, query, can_retrieve)
        if skip is None:
            return None
        outcome.reason = skip
        return TrainingPlan(outcome)

    async def plan(self, request: GenerateRequest, query: str) -> TrainingPlan:
        """The plan for `request`, whose retrieval text is `query`. Raises `InvalidRequest` for a budget
        over the cap; a retrieval fault is not an error: the plan says `fallback` and why."""
        skipped = self.plan_before_retrieval(request, query)
        if skipped is not None:
            return skipped
        outcome = self._outcome(request)
        plan = TrainingPlan(outcome)
        assert self.retrieve is not None
        try:
            retrieval = await asyncio.wait_for(
                self.retrieve(query, n=request.n, strategy=request.strategy, lam=request.lam),
                self.limits.retrieval_timeout_s,
            )
        except Exception as error:  # noqa: BLE001 - any retrieval fault degrades to the base model
            log.exception("retrieval failed")
            outcome.decision = "fallback"
            outcome.reason = (
                f"retrieval failed ({type(error).__name__}: {error}); answered with the base model"
            )
            return plan
        planned = self.policy.plan(retrieval.selection, outcome.budget, request.mode)
        outcome.strategy = retrieval.strategy
        outcome.retrieval_ms = round(retrieval.timings_ms.get("total_ms", 0.0), 3)  # the rest are its parts
        outcome.selected_ids = [int(i) for i in retrieval.ids]
        outcome.uncertainty_before = retrieval.uncertainty_before
        outcome.uncertainty_after = float(retrieval.variances[planned.steps])
        outcome.predicted_gain_bpb = planned.predicted_gain if self.policy.gain_model else None
        outcome.reason = planned.reason
        if retrieval.degraded:  # shards that did not answer: picked from the others
            outcome.reason = f"{outcome.reason}; retrieval degraded: {retrieval.degraded}"
        outcome.planned_steps = planned.steps
        if planned.steps:
            picks = outcome.selected_ids[: planned.steps]
            outcome.adapter_id = self.adapter_key(picks, planned.steps, request.cache_salt).digest
        plan.texts = retrieval.texts[: planned.steps]
        plan.variances = [float(v) for v in retrieval.variances]
        return plan
