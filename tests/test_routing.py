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
