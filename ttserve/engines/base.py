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
from pathlib import Path
from typing import Any

from ttserve.contract import (
    Adapter,
    ContextLengthError,
    GenerationChunk,
    NoChatTemplateError,
    PromptScores,
    SamplingParams,
)
from ttserve.engines.lora_gate import GateStats
from ttserve.files import directory_bytes


class Engine(abc.ABC):
    """Base class: the tokenizer side, the adapter registry and the checks every request passes before it
    reaches the model; subclasses implement `_generate`, `_score`, `_load_adapter` and `_unload_adapter`."""

    tokenizer: Any  # a transformers tokenizer, the same files the model was loaded from
    model_name: str  # what adapters' base_model_name_or_path names
    max_model_len: int
    # Generations worth running at once when the server sets no limit (server.max_running_generations).
    default_concurrency: int = 16

    def __init__(self) -> None:
        # Adapter names and ids come from one monotonic counter: vLLM keys its prefix cache and request
        # identity by adapter name, so new weights must never reuse an old name.
        self._adapter_ids = itertools.count(1)
        self._adapters: dict[str, Adapter] = {}  # loaded now, by name

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
            raise NoChatTemplateError(
                f"model {self.model_name} has no chat template; use /v1/completions", param="messages"
            )
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids as given, or a text prompt encoded (with the tokenizer's special tokens)."""
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def decode_token(self, token_id: int) -> str:
        """One token's text, special tokens included (for logprobs)."""
        return self.tokenizer.decode([token_id])

    def check_context(self, prompt_ids: Sequence[int], max_tokens: int = 0) -> None:
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_ids)} tokens and {max_tokens} more were requested"
            )

    # --- adapters -------------------------------------------------------------------------------------
    async def add_adapter(self, path: str | Path) -> Adapter:
        """Load a PEFT adapter directory under a fresh name and id."""
        path = Path(path)
        name, adapter_id = self._next_adapter_identity()
        adapter = Adapter(name=name, id=adapter_id, path=path, bytes=directory_bytes(path))
        await self._load_adapter(adapter)
        self._adapters[name] = adapter
        return adapter

    async def remove_adapter(self, adapter: Adapter) -> None:
        """Unload an adapter (its files are the caller's)."""
        if self._adapters.pop(adapter.name, None) is None:
            raise KeyError(f"adapter {adapter.name} is not loaded")
        await self._unload_adapter(adapter)

    def loaded_adapters(self) -> set[str]:
        """Names of the adapters loaded now (for leak checks and metrics)."""
        return set(self._adapters)

    def _require_loaded(self, adapter: Adapter | None) -> None:
        if adapter is not None and adapter.name not in self._adapters:
            raise KeyError(f"adapter {adapter.name} is not loaded")

    # --- requests: checked here, before anything is queued, then handed to the subclass ----------------
    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        adapter: Adapter | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of `prompt` (text or token ids); the last chunk has finish_reason and usage."""
        prompt_ids = self.prompt_ids(prompt)
        self.check_context(prompt_ids)
        self._require_loaded(adapter)
        async for chunk in self._generate(prompt_ids, params, adapter, request_id):
            yield chunk

    async def score(
        self, prompt: str | Sequence[int], adapter: Adapter | None = None, top_logprobs: int = 0
    ) -> PromptScores:
        """Per-token logprobs of the prompt itself."""
        prompt_ids = self.prompt_ids(prompt)
        self.check_context(prompt_ids)
        self._require_loaded(adapter)
        return await self._score(prompt_ids, adapter, top_logprobs)

    @abc.abstractmethod
    def _generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter: Adapter | None, request_id: str | None
    ) -> AsyncIterator[GenerationChunk]: ...

    @abc.abstractmethod
    async def _score(
        self, prompt_ids: list[int], adapter: Adapter | None, top_logprobs: int
    ) -> PromptScores: ...

    @abc.abstractmethod
    async def _load_adapter(self, adapter: Adapter) -> None: ...

    @abc.abstractmethod
    async def _unload_adapter(self, adapter: Adapter) -> None: ...

    def lora_gate_stats(self) -> GateStats | None:
        """The LoRA gate's counts, for an engine that gates LoRA and base requests (vLLM on CPU)."""
        return None

    async def check_health(self) -> None:  # noqa: B027 - optional hook
        """Raise if the engine can no longer serve (its process died): the replica then reports itself
        unhealthy and Ray Serve replaces it. An engine in this process is healthy while the process is."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""

    def remove_files(self) -> None:  # noqa: B027 - optional hook
        """Free what the engine keeps outside its process (shared memory, scratch files). Safe from any
        thread, also while it runs: Serve calls it from `__del__` before it kills the replica."""
