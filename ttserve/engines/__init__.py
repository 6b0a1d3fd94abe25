"""Inference engines behind one contract (base.py): transformers + PEFT, and vLLM."""

from __future__ import annotations

from ttserve.config import Settings
from ttserve.engines.base import (
    Adapter,
    ContextLengthError,
    Engine,
    GenerationChunk,
    PromptScores,
    SamplingParams,
    TokenLogprob,
    Usage,
    collect,
)
from ttserve.training import TestTimeTrainer

__all__ = [
    "Adapter",
    "ContextLengthError",
    "Engine",
    "GenerationChunk",
    "PromptScores",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
    "collect",
    "start_engine",
]


async def start_engine(settings: Settings, trainer: TestTimeTrainer) -> Engine:
    """The configured engine for the trainer's model. Call from the event loop that will serve it."""
    if settings.engine.kind == "transformers":
        from ttserve.engines.transformers import TransformersEngine

        return TransformersEngine(trainer, max_model_len=settings.engine.max_model_len)
    from ttserve.adapter_cache import default_scratch_root
    from ttserve.engines.vllm import VLLMEngine

    engine = VLLMEngine(
        trainer.base_name,
        settings.engine,
        settings.training,
        dtype=settings.model.dtype,
        scratch_dir=settings.adapters.scratch_dir or default_scratch_root(),
        max_adapters=settings.adapters.max_adapters,
    )
    return await engine.start()
