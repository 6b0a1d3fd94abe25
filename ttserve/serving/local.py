"""The whole server in one process, without Ray: the same API and generator replica, retrieval called directly.

For tests, benchmarks and embedding ttserve in another program; `ttserve serve` runs the Ray Serve app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from ttserve.config import Settings
from ttserve.retrieval import Retriever
from ttserve.serving.api import build_api
from ttserve.serving.replica import GeneratorReplica

if TYPE_CHECKING:
    from ttserve.engines import Engine


async def start_local(
    settings: Settings, retriever: Retriever | None = None, engine: Engine | None = None
) -> tuple[FastAPI, GeneratorReplica]:
    """The API app over a started in-process replica (serving with `engine` if given: GeneratorReplica's);
    close the replica when done."""
    retriever = retriever or Retriever.from_settings(settings)
    replica = await GeneratorReplica(settings, retriever.retrieve_async, engine).start()
    return build_api(replica, settings), replica
