"""The whole server in one process, without Ray: the same API and generator replica, retrieval called directly.

For tests, benchmarks and embedding ttserve in another program; `ttserve serve` runs the Ray Serve app.
"""

from __future__ import annotations

from fastapi import FastAPI

from ttserve.config import Settings
from ttserve.retrieval import Retriever
from ttserve.serving.api import build_api
from ttserve.serving.replica import GeneratorReplica


async def start_local(
    settings: Settings, retriever: Retriever | None = None
) -> tuple[FastAPI, GeneratorReplica]:
    """The API app over a started in-process replica; close the replica when done."""
    retriever = retriever or Retriever.from_settings(settings)
    replica = await GeneratorReplica(settings, retriever.retrieve_async).start()
    return build_api(replica, settings), replica
