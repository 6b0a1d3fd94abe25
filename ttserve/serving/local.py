"""The whole server in one process, without Ray: the same API and generator, retrieval called directly.

For tests, benchmarks and embedding ttserve in another program; `ttserve serve` runs the Ray Serve app.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from ttserve.config import Settings
from ttserve.retrieval import Retrieval, Retriever
from ttserve.serving.api import build_api
from ttserve.serving.generator import Generator


class LocalRetrieval:
    """A Retriever behind the async call the generator makes (the Ray app makes it through a handle)."""

    def __init__(self, settings: Settings):
        self.retriever = Retriever.from_settings(settings)

    async def __call__(self, text: str, n=None, strategy=None, lam=None) -> Retrieval:
        return await asyncio.to_thread(self.retriever.retrieve, text, n=n, strategy=strategy, lam=lam)


async def start_local(
    settings: Settings, retrieval: LocalRetrieval | None = None
) -> tuple[FastAPI, Generator]:
    """The API app over a started in-process generator; close the generator when done."""
    generator = await Generator(settings, retrieval or LocalRetrieval(settings)).start()
    return build_api(generator, settings), generator
