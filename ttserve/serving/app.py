"""The Ray Serve application: three thin deployments over the plain-Python core, composed in `build_app`.

    Ingress (FastAPI, CPU)  --handle-->  Generator (policy, trainer, engine; GPU where present)
                                              --handle-->  Retriever (embedder, Faiss, SIFT; CPU)

Each replica loads its settings itself (the YAML file named in the app's args, then TTSERVE_* environment
variables, then the args' overrides), so the same config works under `serve run`, `serve deploy`, KubeRay
and `ttserve serve`. Resources and autoscaling below are defaults; configs/serve*.yaml override them.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from ttserve.config import Settings, load_settings
from ttserve.retrieval import Retrieval, Retriever
from ttserve.serving.generator import GenerateRequest, Generator, served_model_name


def _settings(config: str | None, overrides: dict[str, Any] | None) -> Settings:
    return load_settings(config, **(overrides or {}))


@serve.deployment(
    name="Retriever",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=8,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
)
class RetrieverDeployment:
    def __init__(self, config: str | None = None, overrides: dict[str, Any] | None = None):
        self.retriever = Retriever.from_settings(_settings(config, overrides))

    async def retrieve(self, text: str, n=None, strategy=None, lam=None) -> Retrieval:
        return await asyncio.to_thread(self.retriever.retrieve, text, n=n, strategy=strategy, lam=lam)


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class GeneratorDeployment:
    async def __init__(
        self, retriever: DeploymentHandle, config: str | None = None, overrides: dict[str, Any] | None = None
    ):
        async def retrieve(text: str, **options) -> Retrieval:
            return await retriever.retrieve.remote(text, **options)

        self.generator = await Generator(_settings(config, overrides), retrieve).start()

    async def stream(self, request: GenerateRequest) -> AsyncIterator:
        async for event in self.generator.stream(request):
            yield event

    async def complete(self, request: GenerateRequest) -> tuple:
        return await self.generator.complete(request)

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown: free the adapters' scratch space (memory, in /dev/shm).
        cache = getattr(getattr(self, "generator", None), "cache", None)
        if cache is not None:
            shutil.rmtree(cache.directory, ignore_errors=True)

    async def check_health(self) -> None:
        if self.generator.engine is None:
            raise RuntimeError("engine not started")


class HandleBackend:
    """The API's backend: the generator deployment, streamed through its handle."""

    def __init__(self, generator: DeploymentHandle, model_id: str):
        self.handle = generator
        self.streaming = generator.options(stream=True)
        self.model_id = model_id

    async def stream(self, request: GenerateRequest) -> AsyncIterator:
        async for event in self.streaming.stream.remote(request):
            yield event

    async def complete(self, request: GenerateRequest) -> tuple:
        return await self.handle.complete.remote(request)


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=128,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
)
@serve.ingress()
class Ingress:
    def __init__(
        self, generator: DeploymentHandle, config: str | None = None, overrides: dict[str, Any] | None = None
    ):
        self.settings = _settings(config, overrides)
        self.backend = HandleBackend(generator, served_model_name(self.settings))

    def __serve_build_asgi_app__(self):
        from ttserve.serving.api import build_api

        return build_api(self.backend, self.settings)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application builder `serve run` / `serve deploy` / KubeRay call: ttserve.serving.app:build_app.

    args: `config` (a ttserve YAML settings file) and `overrides` (settings as nested dicts), both optional.
    """
    args = dict(args or {})
    config = args.pop("config", None)
    overrides = args.pop("overrides", None)
    if args:
        raise ValueError(f"unknown application args: {sorted(args)} (expected config, overrides)")
    if config is not None and Path(config).is_file():
        # Resolved where the builder runs (`serve run`'s working directory), so replicas find it too.
        config = str(Path(config).resolve())
    retriever = RetrieverDeployment.bind(config, overrides)
    generator = GeneratorDeployment.bind(retriever, config, overrides)
    return Ingress.bind(generator, config, overrides)
