"""The request pipeline through its seams: stand-ins for the engine, trainer and retrieval, the real policy,
adapter cache and training thread. Every decision the pipeline makes, without loading a model.

The stand-ins are deliberately simple and observable: the engine answers with the name of the adapter it
was asked to use, the trainer writes a one-file adapter directory and reports the run it was told to
report, and retrieval is real SIFT over embeddings derived from the prompt's text.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from ttserve.adapter_cache import AdapterCache
from ttserve.config import PolicyConfig, ServerConfig, Settings, TrainingConfig
from ttserve.contract import (
    Adapter,
    ContextLengthError,
    GenerateRequest,
    GenerationChunk,
    InvalidRequest,
    NoChatTemplateError,
    Overloaded,
    PromptScores,
    SamplingParams,
    TrainingRun,
    Usage,
    collect,
)
from ttserve.datastore import StoredSequence
from ttserve.engines.base import Engine
from ttserve.pipeline import RequestPipeline
from ttserve.policy import Policy
from ttserve.retrieval import Retrieval
from ttserve.selection import sift
from ttserve.serving.autoscaling import GENERATIONS
from ttserve.serving.replica import GeneratorReplica


class ByteTokenizer:
    """Token i is byte i: enough of a Hugging Face tokenizer for the pipeline and the engine base class."""

    chat_template = "role: content"

    def __len__(self) -> int:
        return 256

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


class NamingEngine(Engine):
    """Answers with the name of the adapter it ran with ("base" for none), one character per chunk."""

    def __init__(self, max_model_len: int = 512):
        super().__init__()
        self.tokenizer = ByteTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.loads: list[str] = []

    async def _generate(self, prompt_ids, params, adapter, request_id):
        text = adapter.name if adapter else "base"
        for character in text[: params.max_tokens]:
            yield GenerationChunk(text=character, token_ids=[ord(character)])
        yield GenerationChunk(finish_reason="stop", usage=Usage(len(prompt_ids), len(text)))

    async def _score(self, prompt_ids, adapter, top_logprobs) -> PromptScores:
        n = len(prompt_ids)
        return PromptScores(prompt_ids, [chr(t) for t in prompt_ids], [None] + [-1.0] * (n - 1), [None] * n)

    async def _load_adapter(self, adapter: Adapter) -> None:
        assert (adapter.path / "adapter_config.json").is_file(), "the cache loaded a half-written adapter"
        self.loads.append(adapter.name)

    async def _unload_adapter(self, adapter: Adapter) -> None:
        pass


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedTrainer:
    """Writes an adapter directory and reports `seconds_per_step` per step; can fail, or hold until released.
    With a `clock`, each step advances it by one second and a deadline on it stops training, as the real
    trainer's does between steps."""

    base_name: str = "fake-model"
    seconds_per_step: float = 0.01
    fail: Exception | None = None
    hold: threading.Event | None = None
    clock: Clock | None = None
    setup_seconds: float = 0.0  # clock time that passes before the first step
    calls: list[list[str]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)

    def train(self, texts, max_steps, output_dir=None, deadline=None, cancel=None) -> TrainingRun:
        self.calls.append(list(texts))
        self.started.set()
        if self.clock is not None:
            self.clock.now += self.setup_seconds
        run = TrainingRun()
        for _ in range(max_steps):
            if self.hold is not None:
                while not self.hold.wait(0.01):
                    if cancel is not None and cancel.is_set():
                        break
            if cancel is not None and cancel.is_set():
                run.stopped = "cancelled"
                break
            if self.clock is not None and deadline is not None and self.clock() >= deadline:
                run.stopped = "deadline"
                break
            if self.fail is not None:
                raise self.fail
            if self.clock is not None:
                self.clock.now += 1.0
            run.steps += 1
            run.sequences = run.steps
            run.tokens += 10
            run.seconds += self.seconds_per_step
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "adapter_config.json").write_text("{}")
        return run


class FakeRetrieval:
    """Real SIFT over 64 candidates whose embeddings depend on the prompt's text, so different prompts pick
    different sequences and the same prompt picks the same ones. Counts its calls; can fail or hang."""

    def __init__(self):
        self.calls = 0
        self.fail: Exception | None = None
        self.hang = False

    async def __call__(self, text: str, *, n=None, strategy=None, lam=None) -> Retrieval:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.sleep(3600)
        rng = np.random.default_rng(sum(text.encode()))
        candidates = rng.standard_normal((64, 16)).astype(np.float32)
        candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
        query = candidates[:4].mean(0)
        picked = sift(candidates, query / np.linalg.norm(query), n or 8, lam=lam or 1.0)
        ids = [int(i) for i in picked.indices]
        sequences = [StoredSequence(i, f"doc-{i}", 0, f"text {i}", "fake", {}) for i in ids]
        return Retrieval(
            ids,
            sequences,
            picked.variances,
            strategy or "sift",
            lam or 1.0,
            1,
            64,
            {"index_ms": 0.25, "selection_ms": 0.75, "total_ms": 1.0},
        )


@dataclass
class Rig:
    pipeline: RequestPipeline
    engine: NamingEngine
    trainer: ScriptedTrainer
    retrieval: FakeRetrieval
    clock: Clock
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def run(self, coroutine):
        """On the rig's one event loop, as a replica runs every request on its own."""
        return self.loop.run_until_complete(coroutine)


@pytest.fixture
def rig(tmp_path):
    def build(training: TrainingConfig | None = None, **limits) -> Rig:
        engine, trainer, retrieval, clock = NamingEngine(), ScriptedTrainer(), FakeRetrieval(), Clock()
        pipeline = RequestPipeline(
            engine=engine,
            trainer=trainer,
            training=training or TrainingConfig(),
            adapters=AdapterCache(engine, max_adapters=2, scratch_dir=tmp_path),
            policy=Policy(PolicyConfig(), gain_model=None),
            retrieve=retrieval,
            limits=ServerConfig(**{"default_compute_budget": 0, "max_compute_budget": 64, **limits}),
            clock=clock,
            wall_clock=clock,
        )
        return Rig(pipeline, engine, trainer, retrieval, clock)

    rigs: list[Rig] = []

    def make(training: TrainingConfig | None = None, **limits) -> Rig:
        rigs.append(build(training, **limits))
        return rigs[-1]

    yield make
    for made in rigs:
        made.pipeline.close()
        made.run(made.pipeline.adapters.close())
        made.loop.close()


def ask(rig: Rig, prompt: str = "def parse(path):", **options) -> tuple:
    request = GenerateRequest(prompt=prompt, max_tokens=32, sampling=SamplingParams(temperature=0), **options)
    started, whole = rig.run(rig.pipeline.complete(request))
    return started.ttt, whole.text


# --- decisions ----------------------------------------------------------------------------------------------
def test_the_policy_skips_before_retrieval(rig):
    r = rig()
    for options, reason in [
        ({}, "compute budget is 0"),  # the server default here
        ({"compute_budget": 8, "mode": "off"}, "test-time training is off"),
        ({"compute_budget": 8, "prompt": "   "}, "the prompt has no text to retrieve for"),
    ]:
        ttt, text = ask(r, **options)
        assert (ttt.decision, ttt.reason, text) == ("skipped", reason, "base"), options
    assert r.retrieval.calls == 0 and r.trainer.calls == []
    r.pipeline.planner.retrieve = None
    assert ask(r, compute_budget=8)[0].reason == "no datastore is configured"


def test_a_trained_adapter_answers_and_an_identical_request_reuses_it(rig):
    r = rig()
    first, text = ask(r, compute_budget=4, mode="always")
    assert first.decision == "trained" and first.trained and not first.cached
    assert first.steps == 4 and first.training_tokens == 40 and first.training_seconds == pytest.approx(0.04)
    assert text == r.engine.loads[0] and first.adapter_id and len(first.selected_ids) == 8
    assert first.uncertainty_after < first.uncertainty_before
    assert first.retrieval_ms == 1.0  # the total, not the total plus its parts
    again, text_again = ask(r, compute_budget=4, mode="always")
    assert again.decision == "reused" and again.cached and again.training_seconds == 0.0
    assert again.adapter_id == first.adapter_id and text_again == text and len(r.trainer.calls) == 1
    other, other_text = ask(r, prompt="class Cache:", compute_budget=4, mode="always")
    assert other.adapter_id != first.adapter_id and other_text != text  # never another request's adapter
    assert r.pipeline.stats().cache_hits == 1 and r.pipeline.stats().cache_misses == 2


def test_concurrent_identical_requests_train_once(rig):
    r = rig()
    request = GenerateRequest(prompt="import json", max_tokens=32, compute_budget=3, mode="always")

    async def both():
        return await asyncio.gather(r.pipeline.complete(request), r.pipeline.complete(request))

    (a, text_a), (b, text_b) = r.run(both())
    assert sorted([a.ttt.decision, b.ttt.decision]) == ["reused", "trained"]
    assert text_a == text_b and len(r.trainer.calls) == 1


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("retrieval", "retrieval failed (ConnectionError: shard down)"),
        ("training", "test-time training failed"),
    ],
)
def test_a_fault_falls_back_to_the_base_model(rig, fault, expected):
    r = rig()
    if fault == "retrieval":
        r.retrieval.fail = ConnectionError("shard down")
    else:
        r.trainer.fail = MemoryError("out of memory (injected)")
    ttt, text = ask(r, compute_budget=4, mode="always")
    assert ttt.decision == "fallback" and not ttt.trained and ttt.adapter_id is None
    assert expected in ttt.reason and ttt.reason.endswith("answered with the base model")
    assert text == "base"
    assert list(r.pipeline.adapters.directory.iterdir()) == []  # nothing half-written left behind


def test_retrieval_that_hangs_times_out_into_a_fallback(rig):
    r = rig(retrieval_timeout_s=0.05)
    r.retrieval.hang = True
    ttt, text = ask(r, compute_budget=4, mode="always")
    assert ttt.decision == "fallback" and "retrieval failed (TimeoutError" in ttt.reason and text == "base"


def test_a_full_training_queue_falls_back_at_once(rig):
    r = rig(max_queued_trainings=1)
    r.trainer.hold = threading.Event()
    held = GenerateRequest(prompt="import os", max_tokens=32, compute_budget=2, mode="always")

    async def scenario():
        first = asyncio.ensure_future(r.pipeline.complete(held))
        assert await asyncio.to_thread(r.trainer.started.wait, 10)
        queued = r.pipeline.stats()
        refused = await r.pipeline.complete(
            GenerateRequest(prompt="import sys", compute_budget=2, mode="always")
        )
        r.trainer.hold.set()
        return queued, refused, await first

    queued, (refused, answer), (first, _) = r.run(scenario())
    assert queued.trainings_queued == 1 and queued.training_steps_queued == 2
    assert (
        refused.ttt.decision == "fallback" and "the training queue is full (1 requests)" in refused.ttt.reason
    )
    assert answer.text == "base" and first.ttt.decision == "trained"


def test_a_deadline_the_trainer_cannot_meet_is_refused_before_training(rig):
    r = rig()
    r.trainer.seconds_per_step = 1.0  # what the training thread learns from the first run
    ask(r, compute_budget=2, mode="always")
    ttt, text = ask(r, prompt="another prompt", compute_budget=4, mode="always", deadline_s=3.0)
    assert ttt.decision == "fallback" and "about 4.0s needed, 3.0s left" in ttt.reason and text == "base"
    assert len(r.trainer.calls) == 1
    r.clock.now += 100  # the pipeline's clock, not the wall clock, measures the deadline
    assert (
        ask(r, prompt="another prompt", compute_budget=2, mode="always", deadline_s=3.0)[0].decision
        == "trained"
    )


def test_a_cancelled_request_stops_its_training_and_frees_the_queue(rig):
    r = rig()
    r.trainer.hold = threading.Event()

    async def scenario():
        task = asyncio.ensure_future(
            r.pipeline.complete(GenerateRequest(prompt="import re", compute_budget=5, mode="always"))
        )
        assert await asyncio.to_thread(r.trainer.started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    r.run(scenario())
    stats = r.pipeline.stats()
    assert stats.trainings_queued == 0 and stats.training_steps_queued == 0 and stats.adapters_cached == 0
    assert list(r.pipeline.adapters.directory.iterdir()) == []
    r.trainer.hold = None
    assert ask(r, prompt="import re", compute_budget=5, mode="always")[0].decision == "trained"


# --- refusals: raised before anything is yielded, with the request field they concern ------------------------
def test_bad_requests_are_refused_with_their_field(rig):
    r = rig()
    refusals = [
        (GenerateRequest(prompt="x", compute_budget=65), InvalidRequest, "compute_budget"),
        (GenerateRequest(prompt=[1, 2, 999]), InvalidRequest, "prompt"),
        (GenerateRequest(prompt="x" * 600), ContextLengthError, "prompt"),
        (GenerateRequest(messages=[{"role": "user", "content": "x" * 600}]), ContextLengthError, "messages"),
    ]
    for request, kind, param in refusals:
        with pytest.raises(kind) as refused:
            r.run(anext(r.pipeline.stream(request)))
        assert refused.value.param == param
    r.engine.tokenizer.chat_template = None
    with pytest.raises(NoChatTemplateError):
        r.run(anext(r.pipeline.stream(GenerateRequest(messages=[{"role": "user", "content": "hi"}]))))
    assert r.retrieval.calls == 0 and r.trainer.calls == []


def test_echo_scores_the_prompt_with_the_adapter_that_answers(rig):
    r = rig()
    request = GenerateRequest(prompt="abc", max_tokens=4, compute_budget=2, mode="always", prompt_logprobs=1)
    started, _ = r.run(r.pipeline.complete(request))
    assert started.prompt_ids == [97, 98, 99] and started.prompt_scores.logprobs == [None, -1.0, -1.0]


# --- anytime adapters --------------------------------------------------------------------------------------------
def test_a_deadline_mid_training_serves_the_adapter_of_the_steps_taken(rig):
    from ttserve.adapter_cache import AdapterKey

    r = rig()
    r.trainer.clock = r.clock  # a training step takes one second of the pipeline's clock
    cut, text = ask(r, compute_budget=6, mode="always", deadline_s=2.5)
    assert (
        cut.decision == "trained" and cut.steps == 3 and cut.planned_steps == 6 and cut.stopped == "deadline"
    )
    assert "training stopped (deadline) after 3 of 6 steps" in cut.reason and text == r.engine.loads[0]
    # Keyed as what it is: the first 3 steps, at the rate of the 6-step plan it was started for.
    six_step_rate = TrainingConfig().for_plan(6)
    assert cut.adapter_id == AdapterKey.of("fake-model", cut.selected_ids[:3], six_step_rate, 3).digest
    assert cut.uncertainty_after == pytest.approx(r.run(r.retrieval("def parse(path):")).variances[3])
    # A 3-step plan trains at a larger rate than a 6-step one, so that adapter is not the one it asks for.
    assert TrainingConfig().learning_rate_for(3) > TrainingConfig().learning_rate_for(6)
    three, _ = ask(r, compute_budget=3, mode="always")
    assert three.decision == "trained" and three.adapter_id != cut.adapter_id and three.steps == 3
    # The full plan is still trained (and cached) under its own key.
    full, _ = ask(r, compute_budget=6, mode="always")
    assert full.decision == "trained" and full.steps == 6 and full.adapter_id != cut.adapter_id


def test_a_cut_short_adapter_answers_a_shorter_plan_that_trains_at_the_same_rate(rig):
    r = rig(TrainingConfig(learning_rate_steps=None))  # one rate for every plan length
    r.trainer.clock = r.clock
    cut, text = ask(r, compute_budget=6, mode="always", deadline_s=2.5)
    assert (cut.steps, cut.planned_steps, cut.stopped) == (3, 6, "deadline")
    # A request whose plan is those 3 steps gets that adapter: it is cached as what it is.
    three, text_three = ask(r, compute_budget=3, mode="always")
    assert three.decision == "reused" and three.adapter_id == cut.adapter_id and text_three == text
    assert three.stopped is None and three.steps == three.planned_steps == 3


def test_a_deadline_before_the_first_step_falls_back(rig):
    r = rig()
    r.trainer.clock, r.trainer.setup_seconds = r.clock, 2.0
    ttt, text = ask(r, compute_budget=6, mode="always", deadline_s=1.5)
    assert ttt.decision == "fallback" and "stopped (deadline) before its first step" in ttt.reason
    assert text == "base" and ttt.steps == 0 and ttt.planned_steps == 6
    assert r.pipeline.stats().adapters_cached == 0 and list(r.pipeline.adapters.directory.iterdir()) == []


# --- plans made before a replica is chosen (the Planner deployment under Ray) -----------------------------------
def test_a_plan_made_elsewhere_is_carried_out_without_retrieving_again(rig):
    from ttserve.planning import RequestPlanner

    r = rig()
    request = GenerateRequest(prompt="import json", max_tokens=32, compute_budget=3, mode="always")
    plan = r.run(r.pipeline.planner.plan(request, "import json"))
    assert plan.steps == 3 and len(plan.texts) == 3 and plan.adapter_id and r.retrieval.calls == 1
    started, whole = r.run(r.pipeline.complete(request, plan))
    assert r.retrieval.calls == 1 and started.ttt.decision == "trained" and whole.text == r.engine.loads[0]
    assert started.ttt.adapter_id == plan.adapter_id and plan.outcome.decision == "skipped"  # plan untouched
    # Another process's planner with the same settings names the same adapter: what requests route by.
    elsewhere = RequestPlanner(
        retrieve=FakeRetrieval(),
        policy=Policy(PolicyConfig(), gain_model=None),
        training=TrainingConfig(),
        model="fake-model",
        limits=ServerConfig(max_compute_budget=64),
    )
    assert r.run(elsewhere.plan(request, "import json")).adapter_id == plan.adapter_id
    skipped = r.run(elsewhere.plan(GenerateRequest(prompt="x", compute_budget=0), "x"))
    assert (
        skipped.steps == 0 and skipped.adapter_id is None and skipped.outcome.reason == "compute budget is 0"
    )


def test_time_spent_queued_and_planned_elsewhere_counts_against_the_deadline(rig):
    r = rig()
    r.trainer.clock = r.clock  # a training step takes one second of the pipeline's clock
    request = GenerateRequest(
        prompt="import json", max_tokens=8, compute_budget=3, mode="always", deadline_s=2.5
    )
    plan = r.run(r.pipeline.planner.plan(request, "import json"))
    # Received 2 s ago (planned by a Planner replica, queued at the ingress): half a second is left.
    received = replace(request, received_at=r.clock.now - 2.0)
    started, _ = r.run(r.pipeline.complete(received, plan))
    assert (started.ttt.steps, started.ttt.planned_steps, started.ttt.stopped) == (1, 3, "deadline")
    fresh, _ = r.run(r.pipeline.complete(replace(request, received_at=r.clock.now), plan))
    assert fresh.ttt.steps == 3 and fresh.ttt.stopped is None


def test_a_plan_does_not_bypass_the_budget_cap(rig):
    r = rig(max_compute_budget=4)
    request = GenerateRequest(prompt="import json", max_tokens=8, compute_budget=3, mode="always")
    plan = r.run(r.pipeline.planner.plan(request, "import json"))
    with pytest.raises(InvalidRequest, match="above this server's maximum"):
        r.run(r.pipeline.complete(replace(request, compute_budget=5), plan))


def test_a_degraded_retrieval_still_plans_and_says_what_was_missing(rig):
    r = rig()
    retrieve = r.retrieval

    async def missing_a_shard(text, **options):
        return replace(await retrieve(text, **options), degraded="shard-001 failed (TimeoutError: late)")

    r.pipeline.planner.retrieve = missing_a_shard
    ttt, _ = ask(r, compute_budget=2, mode="always")
    assert ttt.decision == "trained" and ttt.reason.endswith(
        "retrieval degraded: shard-001 failed (TimeoutError: late)"
    )


def test_adapters_are_reused_only_between_requests_with_the_same_salt(rig):
    r = rig()

    def ask_salted(salt):
        request = GenerateRequest(
            prompt="import json", max_tokens=8, compute_budget=2, mode="always", cache_salt=salt
        )
        return r.run(r.pipeline.complete(request))[0].ttt

    first, again = ask_salted("tenant-a"), ask_salted("tenant-a")
    other, unsalted = ask_salted("tenant-b"), ask_salted(None)
    assert (first.decision, again.decision) == ("trained", "reused") and again.adapter_id == first.adapter_id
    assert other.decision == unsalted.decision == "trained"  # same picks, same steps: another tenant's key
    assert len({first.adapter_id, other.adapter_id, unsalted.adapter_id}) == 3 and len(r.trainer.calls) == 3
    assert first.selected_ids == other.selected_ids == unsalted.selected_ids


def test_a_full_replica_refuses_before_answering_and_keeps_the_adapter_it_trained(rig):
    """Admission (admission.py): one generation at a time and nobody waiting. A second request is refused
    with Overloaded before anything is yielded; the adapter it trained stays cached for its retry."""
    r = rig(max_running_generations=1, max_waiting_generations=0)
    busy = GenerateRequest(prompt="import os", max_tokens=32)
    second = GenerateRequest(prompt="import json", max_tokens=32, compute_budget=2, mode="always")

    async def scenario():
        events = r.pipeline.stream(busy)
        await anext(events)  # Started: the first request holds the only slot while it answers
        with pytest.raises(Overloaded) as refused:
            await anext(r.pipeline.stream(second))
        stats = r.pipeline.stats()
        assert (stats.generations_running, stats.generations_refused) == (1, 1)
        await events.aclose()
        return refused.value

    refusal = r.run(scenario())
    assert "at capacity" in refusal.message and refusal.retry_after >= 1
    assert len(r.trainer.calls) == 1 and len(r.pipeline.adapters) == 1  # trained, cached, lease released
    retry, _ = ask(r, prompt="import json", compute_budget=2, mode="always")
    assert retry.decision == "reused" and r.pipeline.stats().generations_running == 0


def test_a_request_waits_for_a_slot_and_is_then_answered(rig):
    r = rig(max_running_generations=1, max_waiting_generations=1)

    async def scenario():
        first = r.pipeline.stream(GenerateRequest(prompt="import os", max_tokens=32))
        await anext(first)
        waiting = asyncio.ensure_future(
            r.pipeline.complete(GenerateRequest(prompt="import re", max_tokens=32))
        )
        await asyncio.sleep(0.01)
        assert not waiting.done() and r.pipeline.stats().generations_waiting == 1
        replica = GeneratorReplica(Settings(), retrieve=None)
        replica.pipeline = r.pipeline
        assert replica.load()[GENERATIONS] == 2  # autoscaling counts the waiting one as wanting the engine
        await collect(first)
        return await waiting

    started, whole = r.run(scenario())
    assert started.ttt.decision == "skipped" and whole.text == "base"


def test_the_scratch_directory_is_made_at_the_first_training_and_removed_at_close(rig, tmp_path):
    """A replica killed before it trains (Serve force-kills replicas that are still starting, and a kill runs
    no cleanup) must leave nothing in /dev/shm: the directory only exists once there is an adapter to hold."""
    r = rig()
    ask(r)  # the base model: nothing to write
    assert list(tmp_path.glob("ttserve-adapters-*")) == []
    ask(r, compute_budget=2, mode="always")
    assert len(list(tmp_path.glob("ttserve-adapters-*"))) == 1
    r.run(r.pipeline.adapters.close())
    assert list(tmp_path.glob("ttserve-adapters-*")) == []


def test_the_cache_makes_room_before_it_loads_a_new_adapter(rig):
    """A cache of 2 (the rig's): the engine never holds a third adapter while an unused one could have made
    way, so the engine and the disk stay within the cache's bounds, not one over them."""
    r = rig()
    loaded_before_each_load = []
    load = r.engine._load_adapter

    async def counting_load(adapter):
        loaded_before_each_load.append(len(r.engine.loaded_adapters()))
        await load(adapter)

    r.engine._load_adapter = counting_load
    for tenant in range(5):  # five different adapters (salted apart), one after the other
        ask(r, compute_budget=2, mode="always", cache_salt=f"tenant-{tenant}")
    assert loaded_before_each_load == [0, 1, 1, 1, 1]
    assert len(r.pipeline.adapters) == 2 and r.pipeline.stats().cache_evictions == 3
    assert len(list(r.pipeline.adapters.directory.iterdir())) == 2


def test_the_training_thread_runs_below_the_other_threads():
    """Linux schedules threads by their own nice value: lowering the training thread's leaves the rest of
    the process (the event loop, inference) where it was."""
    import os
    import time

    from ttserve.threads import TrainingThread

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    training = TrainingThread(ScriptedTrainer(), time.monotonic)
    loop = asyncio.new_event_loop()
    try:
        before = nice()
        loop.run_until_complete(training.lower_priority(7))
        assert training._executor.submit(nice).result() == min(19, before + 7)
        assert nice() == before
    finally:
        training.close()
        loop.close()
