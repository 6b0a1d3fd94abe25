"""Inference engines behind one contract (base.py): transformers + PEFT, and vLLM.

Importing this package loads no model library: each engine module imports its own (torch, vLLM), and the
composition root (ttserve/serving/replica.py) imports only the one configured.
"""

from __future__ import annotations

from ttserve.contract import (
    Adapter,
    ContextLengthError,
    GenerationChunk,
    PromptScores,
    SamplingParams,
    TokenLogprob,
    Usage,
    collect,
)
from ttserve.engines.base import Engine

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
]
