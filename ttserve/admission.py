"""Admission for generations: how many requests a replica answers at once, and how many may wait.

A replica runs at most `slots` generations at once. More requests wait in a first-come queue of at most
`max_waiting`, each for at most `max_wait_s`. A request beyond either bound, or one that would
wait longer than `max_wait_s` by the measured pace of the queue, is refused at once with `Overloaded`,
which says when to retry (HTTP 503 with Retry-After).

Why bound it: the engine shares one device among the requests it runs, so each extra request slows every
other one down, and an unbounded queue turns overload into timeouts for everyone (the client gives up while
the server still works on its request). A refusal comes before the response's headers and has started
nothing, so the client may retry it later or elsewhere. Training has its own admission: the training queue
and the deadline (threads.TrainingThread.refusal), which answer with the base model instead.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from ttserve.config import ServerConfig
from ttserve.contract import Overloaded

MAX_RETRY_AFTER_S = 60
HOLD_SMOOTHING = 0.2  # weight of the newest generation in the running mean of how long one holds its slot


class GenerationSlots:
    """The slots of one replica; `hold()` takes one for the length of a generation."""

    def __init__(
        self, slots: int, max_waiting: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic
    ):
        if slots < 1 or max_waiting < 0 or max_wait_s <= 0:
            raise ValueError(f"bad admission limits: {slots=}, {max_waiting=}, {max_wait_s=}")
        self.slots = slots
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._free = asyncio.Semaphore(slots)  # first come, first served (asyncio's semaphore is fair)
        self.running = 0
        self.waiting = 0
        self.refused = 0
        self.mean_hold_s: float | None = None  # how long a generation holds its slot, smoothed

    @classmethod
    def of(cls, limits: ServerConfig, engine_concurrency: int) -> GenerationSlots:
        """The server's limits; `engine_concurrency` (the engine's own default) when it sets no running limit."""
        return cls(
            limits.max_running_generations or engine_concurrency,
            limits.max_waiting_generations,
            limits.max_generation_wait_s,
        )

    def expected_wait_s(self) -> float | None:
        """Seconds a newcomer would wait for a slot: the queue ahead of it and itself, served `slots` at a
        time, each holding its slot for the mean time so far. None before any generation has finished."""
        if self.mean_hold_s is None:
            return None
        return self.mean_hold_s * (self.waiting + 1) / self.slots

    def retry_after(self) -> int:
        """Whole seconds until a slot is likely free for a newcomer (1 before anything is measured)."""
        expected = self.expected_wait_s() or 1.0
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(expected)))

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """A slot for the body of the `async with`; raises `Overloaded` when none comes in time."""
        if self._free.locked():  # every slot is taken, or others are already waiting for one
            if self.waiting >= self.max_waiting:
                self._refuse(
                    f"the replica is at capacity ({self.running} generations running, {self.waiting} waiting)"
                )
            expected = self.expected_wait_s()
            if expected is not None and expected > self.max_wait_s:  # refuse now, not after the wait
                self._refuse(
                    f"the replica is at capacity: a slot is {expected:.0f} s away ({self.waiting} waiting, "
                    f"{self.slots} slots), over the {self.max_wait_s:g} s limit"
                )
            self.waiting += 1
            try:
                await asyncio.wait_for(self._free.acquire(), self.max_wait_s)
            except TimeoutError:
                self._refuse(f"no generation slot came free within {self.max_wait_s:g} s")
            finally:
                self.waiting -= 1
        else:
            await self._free.acquire()  # free: returns at once
        self.running += 1
        started = self.clock()
        try:
            yield
        finally:
            self.running -= 1
            self._free.release()
            held = self.clock() - started
            last = self.mean_hold_s
            self.mean_hold_s = held if last is None else last + HOLD_SMOOTHING * (held - last)

    def _refuse(self, why: str) -> None:
        self.refused += 1
        retry = self.retry_after()
        raise Overloaded(f"{why}; retry in {retry} s", retry_after=retry)
