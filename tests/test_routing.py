"""Routing and autoscaling decisions for several Generator replicas, without Ray: the adapter-affinity
ranking (ttserve/serving/routing.py) and the Generator's load policy (ttserve/serving/autoscaling.py)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from ttserve.serving.autoscaling import GENERATIONS, TRAINING_BACKLOG_S, GeneratorLoad
from ttserve.serving.routing import rank_for_adapter


@dataclass(frozen=True)
class Replica:
    name: str
    adapters: frozenset[str] = field(default_factory=frozenset)


def ranks(adapter_id: str, replicas: list[Replica]) -> list[list[str]]:
    ranked = rank_for_adapter(adapter_id, replicas, lambda r: r.name, lambda r: r.adapters)
    return [[r.name for r in rank] for rank in ranked]


def owner(adapter_id: str, replicas: list[Replica]) -> str:
    return ranks(adapter_id, replicas)[0][0]


REPLICAS = [Replica(f"replica-{i}") for i in range(3)]
KEYS = [f"{random.Random(i).getrandbits(64):016x}" for i in range(3000)]


def test_every_router_sends_a_key_to_the_same_owner_whatever_order_it_sees_the_replicas_in():
    for key in KEYS[:200]:
        shuffled = random.Random(key).sample(REPLICAS, len(REPLICAS))
        assert ranks(key, shuffled) == ranks(key, REPLICAS)
        assert sorted(name for rank in ranks(key, REPLICAS) for name in rank) == [r.name for r in REPLICAS]


def test_keys_spread_evenly_over_the_replicas():
    shares = Counter(owner(key, REPLICAS) for key in KEYS)
    assert set(shares) == {r.name for r in REPLICAS}
    assert all(abs(n / len(KEYS) - 1 / 3) < 0.04 for n in shares.values()), shares


def test_a_replica_joining_or_leaving_moves_only_the_keys_it_wins_or_owned():
    before = {key: owner(key, REPLICAS) for key in KEYS}
    grown = [*REPLICAS, Replica("replica-3")]
    after = {key: owner(key, grown) for key in KEYS}
    moved = [key for key in KEYS if after[key] != before[key]]
    assert all(after[key] == "replica-3" for key in moved)
    assert abs(len(moved) / len(KEYS) - 1 / 4) < 0.04
    shrunk = [r for r in REPLICAS if r.name != "replica-1"]
    for key in KEYS:
        if before[key] != "replica-1":
            assert owner(key, shrunk) == before[key]


def test_a_replica_holding_the_adapter_comes_first_even_when_it_does_not_own_it():
    key = KEYS[0]
    not_owner = next(r for r in REPLICAS if r.name != owner(key, REPLICAS))
    holding = [Replica(r.name, frozenset({key}) if r == not_owner else frozenset()) for r in REPLICAS]
    assert ranks(key, holding)[0] == [not_owner.name]
    assert ranks(key, holding)[1:] == [[name] for [name] in ranks(key, REPLICAS) if name != not_owner.name]
    both = [Replica(r.name, frozenset({key})) for r in REPLICAS[:2]] + REPLICAS[2:]
    assert sorted(ranks(key, both)[0]) == ["replica-0", "replica-1"]  # the shorter queue of the two wins


def test_the_generator_policy_scales_on_training_backlog_and_generations():
    policy = GeneratorLoad(training_backlog_s=30, generations=16)
    assert policy.replicas_for({}, 0) == 0  # idle: Serve's min_replicas decides
    busy_training = {TRAINING_BACKLOG_S: {"a": 50.0, "b": 40.0}, GENERATIONS: {"a": 2.0, "b": 1.0}}
    assert policy.replicas_for(busy_training, 0) == pytest.approx(3.0)
    busy_generating = {TRAINING_BACKLOG_S: {"a": 0.0}, GENERATIONS: {"a": 30.0}}
    assert policy.replicas_for(busy_generating, 2) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive"):
        GeneratorLoad(training_backlog_s=0)


# --- the ingress's side: plan, then choose the handle (HandleBackend, with stand-in handles) -----------------
class FakeHandle:
    """Enough of a DeploymentHandle: `handle.options(...).method.remote(...)` calls `method` on `target`,
    and every call is recorded with the adapter id it was routed by."""

    def __init__(self, target, calls: list, options: dict | None = None):
        self.target, self.calls, self.options_ = target, calls, options or {}

    def options(self, **options):
        return FakeHandle(self.target, self.calls, {**self.options_, **options})

    def __getattr__(self, method: str):
        handle = self

        class Method:
            def remote(self, *args):
                handle.calls.append((method, handle.options_.get("multiplexed_model_id"), args))
                return getattr(handle.target, method)(*args)

        return Method()


def backend_with(planner_target, generator_target):
    from ttserve.config import PolicyConfig, ServerConfig, TrainingConfig
    from ttserve.planning import RequestPlanner
    from ttserve.policy import Policy
    from ttserve.serving.app import HandleBackend

    calls: list = []

    here = RequestPlanner(
        retrieve=None,  # as the ingress builds it
        policy=Policy(PolicyConfig()),
        training=TrainingConfig(),
        model="m",
        limits=ServerConfig(default_compute_budget=0, max_compute_budget=8),
    )
    backend = HandleBackend(FakeHandle(generator_target, calls), FakeHandle(planner_target, calls), here, "m")
    return backend, calls


def test_the_ingress_plans_base_requests_itself_and_routes_trained_ones_by_adapter_id():
    import asyncio

    from ttserve.contract import GenerateRequest, InvalidRequest, TrainingPlan, TTTOutcome

    planned = TrainingPlan(TTTOutcome(budget=4, strategy="sift", planned_steps=4, adapter_id="abc"))

    class Planner:
        fail: Exception | None = None

        async def plan(self, request, query):
            if self.fail is not None:
                raise self.fail
            return planned

    class Generator:
        async def complete(self, request, plan):
            return plan

    planner = Planner()
    backend, calls = backend_with(planner, Generator())
    run = asyncio.new_event_loop().run_until_complete

    base = run(backend.complete(GenerateRequest(prompt="def f():", compute_budget=0)))
    assert base.steps == 0 and base.outcome.reason == "compute budget is 0"
    assert [c[:2] for c in calls] == [("complete", None)]  # no hop to the Planner
    calls.clear()
    trained = run(backend.complete(GenerateRequest(prompt="def f():", compute_budget=4)))
    assert trained is planned and [c[:2] for c in calls] == [("plan", None), ("complete", "abc")]
    calls.clear()
    planner.fail = RuntimeError("the Planner replica is gone")
    assert run(backend.complete(GenerateRequest(prompt="def f():", compute_budget=4))) is None
    assert [c[:2] for c in calls] == [("plan", None), ("complete", None)]  # the Generator plans it
    with pytest.raises(InvalidRequest, match="above this server's maximum"):
        run(backend.complete(GenerateRequest(prompt="def f():", compute_budget=9)))
