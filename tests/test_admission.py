"""Admission for generations (ttserve/admission.py): bounded slots, a bounded first-come queue, a bounded wait,
and a refusal that says when to retry. On one event loop, with no model."""

from __future__ import annotations

import asyncio

import pytest

from ttserve.admission import MAX_RETRY_AFTER_S, GenerationSlots
from ttserve.contract import Overloaded
from ttserve.serving.protocol import APIError


async def hold_until(slots: GenerationSlots, release: asyncio.Event, log: list, name: str) -> None:
    async with slots.hold():
        log.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):  # let every task run until it blocks
        await asyncio.sleep(0)


def test_slots_run_at_once_and_the_queue_is_served_first_come_first_served():
    async def scenario():
        slots = GenerationSlots(slots=2, max_waiting=3, max_wait_s=60)
        releases = {name: asyncio.Event() for name in "abcde"}
        log: list[str] = []
        tasks = {}
        for name in "abcde":
            tasks[name] = asyncio.create_task(hold_until(slots, releases[name], log, name))
            await settle()
        assert log == ["a", "b"] and (slots.running, slots.waiting) == (2, 3)
        releases["b"].set()
        await settle()
        assert log == ["a", "b", "c"] and (slots.running, slots.waiting) == (2, 2)
        for name in "acde":
            releases[name].set()
        await asyncio.gather(*tasks.values())
        assert log == list("abcde") and (slots.running, slots.waiting, slots.refused) == (0, 0, 0)

    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once_with_a_time_to_retry():
    async def scenario():
        slots = GenerationSlots(slots=1, max_waiting=1, max_wait_s=60)
        release = asyncio.Event()
        log: list[str] = []
        holder = asyncio.create_task(hold_until(slots, release, log, "holder"))
        waiter = asyncio.create_task(hold_until(slots, release, log, "waiter"))
        await settle()
        with pytest.raises(Overloaded) as refused:
            async with slots.hold():
                pytest.fail("a third request must not get a slot")
        assert "at capacity (1 generations running, 1 waiting)" in refused.value.message
        assert refused.value.retry_after >= 1 and slots.refused == 1
        release.set()
        await asyncio.gather(holder, waiter)
        assert log == ["holder", "waiter"]
        async with slots.hold():  # and the refusal took nothing
            assert slots.running == 1

    asyncio.run(scenario())


def test_a_wait_past_the_limit_is_refused_and_leaves_no_one_behind():
    async def scenario():
        slots = GenerationSlots(slots=1, max_waiting=4, max_wait_s=0.05)
        release = asyncio.Event()
        holder = asyncio.create_task(hold_until(slots, release, [], "holder"))
        await settle()
        with pytest.raises(Overloaded, match=r"no generation slot came free within 0.05 s"):
            async with slots.hold():
                pytest.fail("the slot never came free")
        assert (slots.running, slots.waiting, slots.refused) == (1, 0, 1)
        release.set()
        await holder
        async with slots.hold():
            pass

    asyncio.run(scenario())


def test_a_waiter_that_is_cancelled_gives_up_its_place_and_no_slot_leaks():
    async def scenario():
        slots = GenerationSlots(slots=1, max_waiting=2, max_wait_s=60)
        release = asyncio.Event()
        log: list[str] = []
        holder = asyncio.create_task(hold_until(slots, release, log, "holder"))
        gone = asyncio.create_task(hold_until(slots, release, log, "gone"))  # its client disconnects
        last = asyncio.create_task(hold_until(slots, release, log, "last"))
        await settle()
        gone.cancel()
        await settle()
        assert slots.waiting == 1
        release.set()
        await asyncio.gather(holder, last)
        assert log == ["holder", "last"] and (slots.running, slots.waiting) == (0, 0)
        assert not slots._free.locked()

    asyncio.run(scenario())


def test_retry_after_follows_the_queue_and_how_long_generations_hold_a_slot():
    now = [0.0]
    slots = GenerationSlots(slots=2, max_waiting=100, max_wait_s=60, clock=lambda: now[0])
    assert slots.retry_after() == 1  # nothing measured yet: one second

    async def generation(seconds: float) -> None:
        async with slots.hold():
            now[0] += seconds

    asyncio.run(generation(10.0))
    assert slots.mean_hold_s == 10.0
    assert slots.retry_after() == 5  # one place ahead, two slots, 10 s each
    slots.waiting = 7
    assert slots.retry_after() == 40
    slots.waiting = 1000
    assert slots.retry_after() == MAX_RETRY_AFTER_S


def test_a_newcomer_that_would_wait_past_the_limit_is_refused_at_once():
    """Measured pace: generations hold a slot 10 s each, so with one slot busy a newcomer would wait about
    10 s; with a 5 s limit it is refused now rather than after waiting 5 s for nothing."""
    now = [0.0]

    async def scenario():
        slots = GenerationSlots(slots=1, max_waiting=8, max_wait_s=5, clock=lambda: now[0])
        async with slots.hold():
            now[0] += 10.0
        release = asyncio.Event()
        holder = asyncio.create_task(hold_until(slots, release, [], "holder"))
        await settle()
        with pytest.raises(
            Overloaded, match=r"a slot is 10 s away \(0 waiting, 1 slots\), over the 5 s limit"
        ):
            async with slots.hold():
                pytest.fail("refused before waiting")
        assert (slots.waiting, slots.refused) == (0, 1)
        release.set()
        await holder

    asyncio.run(scenario())


def test_the_refusal_is_a_503_with_retry_after_and_survives_pickling():
    import pickle

    refusal = pickle.loads(
        pickle.dumps(Overloaded("the replica is at capacity; retry in 7 s", retry_after=7))
    )
    error = APIError.of_request_error(refusal)
    assert (error.status_code, error.type, error.retry_after) == (503, "service_unavailable", 7)
    assert error.message == "the replica is at capacity; retry in 7 s"


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="bad admission limits"):
        GenerationSlots(slots=0, max_waiting=1, max_wait_s=1)
