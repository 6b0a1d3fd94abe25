"""The Ray Serve application: three thin deployments over the plain-Python core, composed in `build_app`.

    Ingress (FastAPI, CPU)  --handle-->  Generator (GeneratorReplica: policy, trainer, engine; GPU where present)
                                              --handle-->  Retriever (embedder, Faiss, SIFT; CPU)

Each replica loads its settings itself (the YAML file named in the app's args, then TTSERVE_* environment
variables, then the args' overrides), so the same config works under `serve run`, `serve deploy`, KubeRay
and `ttserve serve`. Sizing comes from sizing.py: the decorators carry its local CPU profile (what
`ttserve serve` runs with), and configs/serve*.yaml, generated from the same source, override it.

This module is imported by every replica, the ingress included, so it imports no ML library at the top:
each deployment imports what it runs in its constructor.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from ttserve.config import Settings, load_settings, served_model_name
from ttserve.contract import GenerateRequest, ReplicaStats
from ttserve.serving.sizing import deployment_options


def _settings(config: str | None, overrides: dict[str, Any] | None) -> Settings:
    return load_settings(config, **(overrides or {}))


@serve.deployment(name="Retriever", **deployment_options("Retriever"))
class RetrieverDeployment:
    def __init__(self, config: str | None = None, overrides: dict[str, Any] | None = None):
        from ttserve.retrieval import Retriever

        self.retriever = Retriever.from_settings(_settings(config, overrides))

    async def retrieve(self, text: str, *, n=None, strategy=None, lam=None):
        return await self.retriever.retrieve_async(text, n=n, strategy=strategy, lam=lam)


@serve.deployment(name="Generator", **deployment_options("Generator"))
class GeneratorDeployment:
    async def __init__(
        self, retriever: DeploymentHandle, config: str | None = None, overrides: dict[str, Any] | None = None
    ):
        from ttserve.serving.replica import GeneratorReplica

        async def retrieve(text: str, **options):
            return await retriever.retrieve.remote(text, **options)

        self.replica = await GeneratorReplica(_settings(config, overrides), retrieve).start()

    async def stream(self, request: GenerateRequest) -> AsyncIterator:
        async for event in self.replica.stream(request):
            yield event

    async def complete(self, request: GenerateRequest) -> tuple:
        return await self.replica.complete(request)

    async def stats(self) -> ReplicaStats:
        return await self.replica.stats()

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown: free the adapters' scratch space (memory, in /dev/shm).
        pipeline = getattr(getattr(self, "replica", None), "pipeline", None)
        if pipeline is not None:
            shutil.rmtree(pipeline.adapters.directory, ignore_errors=True)

    async def check_health(self) -> None:
        if self.replica.pipeline is None:
            raise RuntimeError("the generator replica is not running")


class HandleBackend:
    """The API's backend (serving/api.py's Backend): the Generator deployment, through its handle."""

    def __init__(self, generator: DeploymentHandle, model_id: str):
        self.handle = generator
        self.streaming = generator.options(stream=True)
        self.model_id = model_id

    async def stream(self, request: GenerateRequest) -> AsyncIterator:
        async for event in self.streaming.stream.remote(request):
            yield event

    async def complete(self, request: GenerateRequest) -> tuple:
        return await self.handle.complete.remote(request)

    async def stats(self) -> ReplicaStats:
        # With several Generator replicas this reads the one the handle routes to.
        return await self.handle.stats.remote()


@serve.deployment(name="Ingress", **deployment_options("Ingress"))
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


def serve_on_local_ray(
    config: Path | None,
    host: str,
    port: int,
    on_ready: Callable[[str], None],
    on_stop: Callable[[], None],
) -> None:
    """`ttserve serve`: start a local Ray cluster and the app (settings from `config`), call `on_ready(url)`,
    and serve until Ctrl-C or SIGTERM; then `on_stop()` and shut Serve and Ray down."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user cluster
    ray.init(
        include_dashboard=False, object_store_memory=256 * 2**20, configure_logging=False, log_to_driver=False
    )
    try:
        serve.start(http_options={"host": host, "port": port})
        args = {"config": str(config.resolve()) if config else None}
        serve.run(build_app(args), name="ttserve", route_prefix="/", blocking=False)
        on_ready(f"http://{host}:{port}")
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        on_stop()
    finally:
        serve.shutdown()
        ray.shutdown()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
