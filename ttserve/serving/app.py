"""The Ray Serve application: thin deployments over the plain-Python core, composed in `build_app`.

    Ingress (FastAPI, CPU) --plan--> Planner (embedder, datastore or Shard handles, SIFT, policy; CPU)
           │                             └--search--> Shard 0..N-1 (one part of a sharded datastore; CPU)
           └--routed by the plan's adapter id--> Generator (GeneratorReplica: trainer, engine; GPU where present)

A request is planned before a Generator replica is chosen (ttserve/planning.py): the plan names the
adapter it needs, and the Generator handle's router (routing.py) sends it to the replica that holds or
owns that adapter. Why, and what happens when that replica dies: docs/scaling.md.

Each replica loads its settings itself (the YAML file named in the app's args, then TTSERVE_* environment
variables, then the args' overrides), so the same config works under `serve run`, `serve deploy`, KubeRay
and `ttserve serve`. Sizing comes from sizing.py: the decorators carry its local CPU profile (what
`ttserve serve` runs with), and configs/serve*.yaml, generated from the same source, override it.

This module is imported by every replica, the ingress included, so it imports no ML library at the top:
each deployment imports what it runs in its constructor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from ttserve.config import Settings, load_settings, served_model_name
from ttserve.contract import GenerateRequest, ReplicaStats, RequestError, TrainingPlan
from ttserve.planning import RequestPlanner
from ttserve.serving.routing import ADAPTERS
from ttserve.serving.sizing import deployment_options

log = logging.getLogger(__name__)
# How often a Generator replica exports its counters as Ray metrics: Ray's agent sends them on every
# metrics_report_interval_ms (10 s by default), so twice as often loses nothing.
RAY_METRICS_PERIOD_S = 5.0


def _settings(config: str | None, overrides: dict[str, Any] | None) -> Settings:
    return load_settings(config, **(overrides or {}))


@serve.deployment(name="Shard", **deployment_options("Shard"))
class ShardDeployment:
    """One shard of a sharded datastore (`datastore.shards`): its index, rows and texts."""

    def __init__(self, number: int, config: str | None = None, overrides: dict[str, Any] | None = None):
        from ttserve.datastore.manifest import ShardsManifest
        from ttserve.datastore.sharded import LocalShard

        settings = _settings(config, overrides)
        root = settings.datastore.path
        shard = ShardsManifest.read(root).shards[number]
        self.shard = LocalShard(root / shard.name, shard.first_id, settings.datastore, settings.embedder)

    def search(self, query, k: int):
        return self.shard.search(query, k)

    def sequences(self, ids: list[int]):
        return self.shard.sequences(ids)


class RemoteShard:
    """A shard client (datastore/sharded.py's ShardClient) for a Shard deployment, called from the
    Planner's retrieval thread; each call gives up after `timeout_s`, as the fan-out does."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float):
        self.handle = handle
        self.timeout_s = timeout_s

    def search(self, query, k: int):
        return self.handle.search.remote(query, k).result(timeout_s=self.timeout_s)

    def sequences(self, ids: list[int]):
        return self.handle.sequences.remote(ids).result(timeout_s=self.timeout_s)


@serve.deployment(name="Planner", **deployment_options("Planner"))
class PlannerDeployment:
    """Retrieval and the policy: everything decided before a Generator replica is chosen. With `shards`
    (handles to the Shard deployments) it searches them in parallel instead of opening the datastore."""

    def __init__(
        self,
        shards: list[DeploymentHandle] | None = None,
        config: str | None = None,
        overrides: dict[str, Any] | None = None,
    ):
        from ttserve.planning import RequestPlanner
        from ttserve.policy import Policy, load_gain_model
        from ttserve.retrieval import Retriever

        settings = _settings(config, overrides)
        self.retriever = (
            Retriever.from_settings(settings) if not shards else _sharded_retriever(settings, shards)
        )
        self.planner = RequestPlanner(
            retrieve=self.retriever.retrieve_async,
            policy=Policy(settings.policy, load_gain_model(settings.policy, settings.model.name_or_path)),
            training=settings.training,
            model=served_model_name(settings),  # as the Generator replicas key their adapters
            limits=settings.server,
            default_strategy=settings.retrieval.strategy,
        )

    async def plan(self, request: GenerateRequest, query: str) -> TrainingPlan:
        return await self.planner.plan(request, query)

    async def retrieve(self, text: str, *, n=None, strategy=None, lam=None):
        return await self.retriever.retrieve_async(text, n=n, strategy=strategy, lam=lam)


def _sharded_retriever(settings: Settings, shards: list[DeploymentHandle]):
    from ttserve.datastore.manifest import ShardsManifest
    from ttserve.datastore.sharded import ShardedDatastore
    from ttserve.embedding import Embedder
    from ttserve.retrieval import Retriever

    config = settings.datastore
    root = ShardsManifest.read(config.path)
    if len(root.shards) != len(shards):
        raise ValueError(f"datastore.shards is {len(shards)} but {config.path} has {len(root.shards)} shards")
    clients = [RemoteShard(handle, config.shard_timeout_s) for handle in shards]
    datastore = ShardedDatastore(root, clients, config.shard_timeout_s, config.path)
    return Retriever(datastore, Embedder(settings.embedder), settings.retrieval)


@serve.deployment(name="Generator", **deployment_options("Generator"))
class GeneratorDeployment:
    async def __init__(
        self, planner: DeploymentHandle, config: str | None = None, overrides: dict[str, Any] | None = None
    ):
        from ttserve.serving.replica import GeneratorReplica

        async def retrieve(text: str, **options):
            # Only for a request that arrives without a plan (the Planner was unreachable from the ingress).
            return await planner.retrieve.remote(text, **options)

        self.replica = await GeneratorReplica(_settings(config, overrides), retrieve).start()
        self.replica_tag = serve.get_replica_context().replica_id.unique_id
        self._export = asyncio.get_running_loop().create_task(self._export_metrics())

    async def _export_metrics(self) -> None:
        """This replica's counters as Ray metrics (serving/metrics.py), for as long as the replica lives."""
        from ttserve.serving.metrics import RayReplicaMetrics

        metrics = RayReplicaMetrics()
        while True:
            try:
                metrics.export(await self.replica.stats())
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                log.exception("exporting the replica's metrics failed")
            await asyncio.sleep(RAY_METRICS_PERIOD_S)

    async def stream(self, request: GenerateRequest, plan: TrainingPlan | None = None) -> AsyncIterator:
        async for event in self.replica.stream(request, plan):
            yield event

    async def complete(self, request: GenerateRequest, plan: TrainingPlan | None = None) -> tuple:
        return await self.replica.complete(request, plan)

    async def query(self, request: GenerateRequest) -> str:
        return await self.replica.query(request)

    async def stats(self) -> ReplicaStats:
        # Named, so that the ingress's /metrics keeps one series per replica (metrics.ReplicaCollector).
        return dataclasses.replace(await self.replica.stats(), replica=self.replica_tag)

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router (routing.py) sends requests by: the adapters held or being trained here."""
        return {ADAPTERS: self.replica.adapter_ids()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the Generator's autoscaling policy (autoscaling.py) scales on."""
        return self.replica.load()

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown, then kills the process: free what it keeps in /dev/shm (memory).
        pipeline = getattr(getattr(self, "replica", None), "pipeline", None)
        if pipeline is not None:
            pipeline.adapters.remove_directory()
            pipeline.engine.remove_files()

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine died (vLLM's engine process) raises here, and Serve
        replaces it."""
        if self.replica.pipeline is None:
            raise RuntimeError("the generator replica is not running")
        await self.replica.check_health()


class HandleBackend:
    """The API's backend (serving/api.py's Backend) under Ray: plan with the Planner, then send the request
    to the Generator replica its adapter routes to. `here` makes the plans that need no retrieval (base
    model requests) in the ingress itself, sparing them the hop."""

    def __init__(
        self, generator: DeploymentHandle, planner: DeploymentHandle, here: RequestPlanner, model_id: str
    ):
        self.generator = generator
        self.planner = planner
        self.here = here
        self.model_id = model_id

    async def plan(self, request: GenerateRequest) -> TrainingPlan | None:
        """The request's plan; None when the Planner cannot be reached (the Generator then plans itself,
        through the same Planner's retrieval, and falls back to the base model if that fails too)."""
        try:
            query = request.retrieval_text()
            if query is None:  # token ids: only the model's tokenizer reads them (any replica will do)
                query = await self.generator.query.remote(request)
            skipped = self.here.plan_before_retrieval(request, query, can_retrieve=True)
            if skipped is not None:
                return skipped
            return await self.planner.plan.remote(request, query)
        except RequestError:
            raise
        except Exception:  # noqa: BLE001 - a planner fault must not fail the request
            log.exception("planning failed; the Generator plans the request itself")
            return None

    def _generator_for(self, plan: TrainingPlan | None) -> DeploymentHandle:
        adapter_id = plan.adapter_id if plan is not None else None
        return self.generator.options(multiplexed_model_id=adapter_id) if adapter_id else self.generator

    async def stream(self, request: GenerateRequest) -> AsyncIterator:
        plan = await self.plan(request)
        async for event in self._generator_for(plan).options(stream=True).stream.remote(request, plan):
            yield event

    async def complete(self, request: GenerateRequest) -> tuple:
        plan = await self.plan(request)
        return await self._generator_for(plan).complete.remote(request, plan)

    async def stats(self) -> ReplicaStats:
        # With several Generator replicas this reads the one the handle routes to.
        return await self.generator.stats.remote()


@serve.deployment(name="Ingress", **deployment_options("Ingress"))
@serve.ingress()
class Ingress:
    def __init__(
        self,
        generator: DeploymentHandle,
        planner: DeploymentHandle,
        config: str | None = None,
        overrides: dict[str, Any] | None = None,
    ):
        from ttserve.policy import Policy

        self.settings = settings = _settings(config, overrides)

        here = RequestPlanner(
            retrieve=None,  # it only plans what needs no retrieval; the Planner deployment retrieves
            policy=Policy(settings.policy),  # what decides before retrieval needs no gain model
            training=settings.training,
            model=served_model_name(settings),
            limits=settings.server,
            default_strategy=settings.retrieval.strategy,
        )
        self.backend = HandleBackend(generator, planner, here, served_model_name(settings))

    def __serve_build_asgi_app__(self):
        from ttserve.serving.api import build_api

        return build_api(self.backend, self.settings)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application builder `serve run` / `serve deploy` / KubeRay call: ttserve.serving.app:build_app.

    args: `config` (a ttserve YAML settings file) and `overrides` (settings as nested dicts), both optional;
    `deployments`: Serve options per deployment name, as a Serve config's `deployments` entries give them
    (for programs that run the app without a config file, such as tests and benchmarks; `Shard` applies to
    every Shard<i>).
    """
    args = dict(args or {})
    config = args.pop("config", None)
    overrides = args.pop("overrides", None)
    deployments = args.pop("deployments", None) or {}
    if args:
        raise ValueError(
            f"unknown application args: {sorted(args)} (expected config, overrides, deployments)"
        )
    if config is not None and Path(config).is_file():
        # Resolved where the builder runs (`serve run`'s working directory), so replicas find it too.
        config = str(Path(config).resolve())
    shards = [
        ShardDeployment.options(
            name=f"Shard{i}", **{**deployments.get("Shard", {}), **deployments.get(f"Shard{i}", {})}
        ).bind(i, config, overrides)
        for i in range(_settings(config, overrides).datastore.shards or 0)
    ]
    planner = PlannerDeployment.options(**deployments.get("Planner", {})).bind(shards, config, overrides)
    generator = GeneratorDeployment.options(**deployments.get("Generator", {})).bind(
        planner, config, overrides
    )
    return Ingress.options(**deployments.get("Ingress", {})).bind(generator, planner, config, overrides)


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
        url = f"http://{host}:{port}"
        wait_for_interrupt(lambda: on_ready(url))
    except KeyboardInterrupt:
        on_stop()
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_for_interrupt(on_waiting: Callable[[], None]) -> None:
    """Call `on_waiting()`, then block until Ctrl-C or SIGTERM, both of which raise KeyboardInterrupt here:
    `kill` (a service manager, `docker stop`) stops the server as cleanly as Ctrl-C. Call from the main
    thread after `ray.init`, whose own SIGTERM handler exits with an error. `on_waiting` runs once this
    handler is in place, so whoever it tells that the server is ready may stop it from then on."""
    signal.signal(signal.SIGTERM, _interrupt)
    on_waiting()
    while True:
        time.sleep(3600)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
