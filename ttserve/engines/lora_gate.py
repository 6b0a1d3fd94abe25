"""Keeps base requests that carry no LoRA out of vLLM while LoRA requests are in it (see vllm.py).

vLLM's CPU LoRA ops are only wrong for batches that MIX "no LoRA" (-1) with LoRA requests; a batch of
base requests alone skips the LoRA ops and is right, and is twice as fast as sending the same requests
through the all-zero adapter (BENCHMARKS.md). So:

- a base request runs plain while no LoRA request is in flight or waiting, else through the zero adapter;
- a LoRA request (the zero adapter's included) waits until the plain base requests in flight have
  finished. Base requests that arrive meanwhile take the zero adapter and wait with it, so a steady
  stream of base traffic cannot starve LoRA requests.

vLLM handles one engine's inputs in order, so a plain request that has finished (or been aborted) is
out of the scheduler before a LoRA request submitted afterwards is in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass
class GateStats:
    plain: int = 0  # base requests that ran without any LoRA
    zero_adapter: int = 0  # base requests routed through the zero adapter
    adapted: int = 0  # LoRA requests
    waited: int = 0  # LoRA or zero-adapter requests that waited for plain base requests to finish


class LoRAGate:
    def __init__(self) -> None:
        self.plain_in_flight = 0
        self.lora_in_flight = 0  # LoRA requests and zero-adapter base requests
        self.lora_waiting = 0
        self.stats = GateStats()
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def base(self) -> AsyncIterator[bool]:
        """Admit a base request; yields True when it must go through the zero adapter."""
        if self.lora_in_flight == 0 and self.lora_waiting == 0:
            self.plain_in_flight += 1
            self.stats.plain += 1
            try:
                yield False
            finally:
                self.plain_in_flight -= 1
                await self._notify()
        else:  # a LoRA request in all but name: it waits for plain requests like one
            async with self._lora(zero_adapter=True):
                yield True

    @asynccontextmanager
    async def adapted(self) -> AsyncIterator[None]:
        """Admit a LoRA request once no plain base request is in flight."""
        async with self._lora(zero_adapter=False):
            yield

    @asynccontextmanager
    async def _lora(self, zero_adapter: bool) -> AsyncIterator[None]:
        if self.plain_in_flight:
            self.lora_waiting += 1
            self.stats.waited += 1
            try:
                async with self._changed:
                    await self._changed.wait_for(lambda: self.plain_in_flight == 0)
            finally:
                self.lora_waiting -= 1
        self.lora_in_flight += 1
        if zero_adapter:
            self.stats.zero_adapter += 1
        else:
            self.stats.adapted += 1
        try:
            yield
        finally:
            self.lora_in_flight -= 1

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
