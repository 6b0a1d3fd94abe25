"""One generator replica, built from settings: the model, the trainer, the engine, the adapter cache, the
policy and the request pipeline over them. This is the composition root: the only place that chooses the
real parts (tests give `RequestPipeline` stand-ins instead, or hand a replica a vLLM engine they started).

The Ray Serve Generator deployment (app.py) and the in-process server (local.py) both hold one
`GeneratorReplica` and hand it to the HTTP layer as its backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ttserve.config import Settings, served_model_name
from ttserve.contract import (
    GenerateRequest,
    GenerationChunk,
    NotReadyError,
    ReplicaStats,
    Started,
    TrainingPlan,
)
from ttserve.engines import Engine
from ttserve.pipeline import RequestPipeline, Retrieve
from ttserve.serving.autoscaling import GENERATIONS, TRAINING_BACKLOG_S

if TYPE_CHECKING:
    from ttserve.training import TestTimeTrainer


class GeneratorReplica:
    def __init__(self, settings: Settings, retrieve: Retrieve | None, engine: Engine | None = None):
        """`engine`: one already started on this model with weights of its own (vLLM's), to serve with
        instead of starting the configured one (tests share one: a start takes half a minute on a CPU).
        The replica owns it from then on and closes it."""
        self.settings = settings
        self.retrieve = retrieve
        self.model_id = served_model_name(settings)
        self.pipeline: RequestPipeline | None = None  # None while the model loads
        self._engine = engine

    async def start(self) -> GeneratorReplica:
        """Load the model and start the engine; call once from the event loop that will serve requests."""
        from ttserve.adapter_cache import AdapterCache
        from ttserve.lm import load_model
        from ttserve.policy import Policy, load_gain_model
        from ttserve.threads import default_torch_threads, set_torch_threads
        from ttserve.training import TestTimeTrainer

        settings = self.settings
        training_threads = settings.training.cpu_threads or default_torch_threads()
        set_torch_threads(settings.engine.cpu_threads)  # loading runs here: no team of its own either
        trainer = TestTimeTrainer(load_model(settings.model), settings.training)
        engine = self._engine or await start_engine(settings, trainer)
        adapters = settings.adapters
        self.pipeline = RequestPipeline(
            engine=engine,
            trainer=trainer,
            training=settings.training,
            adapters=AdapterCache(engine, adapters.max_adapters, adapters.max_bytes, adapters.scratch_dir),
            policy=Policy(settings.policy, load_gain_model(settings.policy, settings.model.name_or_path)),
            retrieve=self.retrieve,
            limits=settings.server,
            default_strategy=settings.retrieval.strategy,
            model=self.model_id,  # what the Planner deployment keys adapters by too
        )
        # The CPU split (threads.py): the training thread first, then everything that runs torch later.
        await self.pipeline.training.set_torch_threads(training_threads)
        await self.pipeline.training.lower_priority(settings.training.cpu_niceness)
        set_torch_threads(settings.engine.cpu_threads)
        return self

    def _ready(self) -> RequestPipeline:
        if self.pipeline is None:
            raise NotReadyError("the model is still loading")
        return self.pipeline

    # The backend the HTTP layer calls (serving/api.py's Backend).
    async def stream(
        self, request: GenerateRequest, plan: TrainingPlan | None = None
    ) -> AsyncIterator[Started | GenerationChunk]:
        async for event in self._ready().stream(request, plan):
            yield event

    async def complete(
        self, request: GenerateRequest, plan: TrainingPlan | None = None
    ) -> tuple[Started, GenerationChunk]:
        return await self._ready().complete(request, plan)

    async def query(self, request: GenerateRequest) -> str:
        """The text retrieval searches with for `request` (token ids are decoded by this model)."""
        return self._ready().query(request)

    def load(self) -> dict[str, float]:
        """What limits this replica (serving/autoscaling.py): the training backlog in seconds at the measured
        step speed, and the requests generating now or waiting for a generation slot."""
        if self.pipeline is None:
            return {}
        training = self.pipeline.training
        return {
            TRAINING_BACKLOG_S: training.queued_steps * (training.seconds_per_step or 0.0),
            GENERATIONS: float(self.pipeline.generating + self.pipeline.slots.waiting),
        }

    def adapter_ids(self) -> list[str]:
        """The adapters this replica holds or is training: what the router sends their requests by."""
        return self.pipeline.adapters.held_ids() if self.pipeline is not None else []

    async def stats(self) -> ReplicaStats:
        return self._ready().stats()

    async def check_health(self) -> None:
        """Raise unless the replica can serve: loaded, and its engine alive."""
        await self._ready().engine.check_health()

    async def close(self) -> None:
        pipeline, self.pipeline, self._engine = self.pipeline, None, None
        if pipeline is not None:
            try:
                pipeline.close()
                await pipeline.adapters.close()
            finally:  # whatever failed above, the engine's processes and memory are freed
                await pipeline.engine.close()


async def start_engine(settings: Settings, trainer: TestTimeTrainer) -> Engine:
    """The configured engine for the trainer's model. Call from the event loop that will serve it."""
    if settings.engine.kind == "transformers":
        from ttserve.engines.transformers import TransformersEngine

        return TransformersEngine(
            trainer.shared,
            max_model_len=settings.engine.max_model_len,
            max_concurrency=settings.server.max_running_generations or TransformersEngine.default_concurrency,
        )
    from ttserve.engines.vllm import VLLMEngine
    from ttserve.files import default_scratch_root

    engine = VLLMEngine(
        trainer.base_name,
        settings.engine,
        settings.training,
        dtype=settings.model.dtype,
        scratch_dir=settings.adapters.scratch_dir or default_scratch_root(),
        max_adapters=settings.adapters.max_adapters,
    )
    return await engine.start()
