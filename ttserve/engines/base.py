"""The contract every inference engine keeps: what the server may ask of it, and what it gets back.

An engine answers with the base model or with one adapter named by the request. It streams text deltas with
a final usage record, scores prompts (per-token logprobs, for OpenAI `echo` + `logprobs` and for bits per
byte), and loads/unloads adapters. Prompts are token ids: the server tokenizes once (to count tokens and
check the context) with `encode` / `encode_chat`, so both engines see exactly the same ids; a text prompt
is encoded the same way.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one and excludes it
    seed: int | None = None  # same seed, same request: same output
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter loaded into an engine. `name` and `id` are never reused for other weights."""

    name: str
    id: int
    path: Path
    bytes: int


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, token, logprob), most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationChunk:
    """One streamed step: new text, the new token ids, their logprobs if asked; the last one is `final`."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length, on the final chunk only
    usage: Usage | None = None  # on the final chunk only

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class PromptScores:
    """logprobs[i] = log p(token i | tokens < i); None for the first token, which has no context."""

    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float | None]
    top: list[tuple[tuple[int, str, float], ...] | None]


class ContextLengthError(ValueError):
    """The prompt (plus what must be generated) does not fit the model's context."""


class Engine(abc.ABC):
    """Base class: the shared tokenizer-side helpers; subclasses implement the model-side methods."""

    tokenizer: Any  # a transformers tokenizer, the same files the model was loaded from
    model_name: str  # what adapters' base_model_name_or_path names
    max_model_len: int

    def __init__(self) -> None:
        # Adapter names and ids come from one monotonic counter: vLLM keys its prefix cache and request
        # identity by adapter name, so new weights must never reuse an old name.
        self._adapter_ids = itertools.count(1)

    def _next_adapter_identity(self) -> tuple[str, int]:
        adapter_id = next(self._adapter_ids)
        return f"ttt-{adapter_id}", adapter_id

    # --- tokenizer side -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A plain prompt's ids, with the model's special tokens (e.g. BOS) as its tokenizer adds them."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A chat rendered by the model's template, ready for the assistant's turn.

        The template writes its own special tokens, so the rendered text is tokenized without adding more
        (as vLLM does); a second BOS would shift every logit.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name} has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids as given, or a text prompt encoded (with the tokenizer's special tokens)."""
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def check_context(self, prompt_ids: Sequence[int], max_tokens: int = 0) -> None:
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_ids)} tokens and {max_tokens} more were requested"
            )

    # --- model side -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        adapter: Adapter | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of `prompt` (text or token ids); the last chunk has finish_reason and usage."""

    @abc.abstractmethod
    async def score(
        self, prompt: str | Sequence[int], adapter: Adapter | None = None, top_logprobs: int = 0
    ) -> PromptScores:
        """Per-token logprobs of the prompt itself."""

    @abc.abstractmethod
    async def add_adapter(self, path: str | Path) -> Adapter:
        """Load a PEFT adapter directory under a fresh name and id."""

    @abc.abstractmethod
    async def remove_adapter(self, adapter: Adapter) -> None:
        """Unload an adapter (its files are the caller's)."""

    @abc.abstractmethod
    def loaded_adapters(self) -> set[str]:
        """Names of the adapters loaded now (for leak checks and metrics)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""


async def collect(chunks: AsyncIterator[GenerationChunk]) -> GenerationChunk:
    """A whole generation as one chunk: the concatenated text, ids and logprobs, with the final record."""
    whole = GenerationChunk()
    async for chunk in chunks:
        whole.text += chunk.text
        whole.token_ids += chunk.token_ids
        whole.logprobs += chunk.logprobs
        whole.finish_reason = chunk.finish_reason or whole.finish_reason
        whole.usage = chunk.usage or whole.usage
    return whole


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
