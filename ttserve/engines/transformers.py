"""The transformers + PEFT engine: the embedded default, for small models and CPU hosts.

It serves from the serving tree of the trainer's `SharedModel`: its own modules over the trainer's base
weights, so the weights exist once in memory and inference never waits for a training step. Adapters are
loaded into that tree under their own names, and each forward pass runs inside
`SharedModel.routed(adapter)`, which holds the tree's lock and routes every LoRA layer to the request's
adapter (or none) for that pass only. How and why is in shared_model.py.

Concurrency: each request decodes in a thread of this engine's pool, one forward pass at a time under the
serving lock, so concurrent requests interleave token by token, and training runs beside them on its own
thread (ttserve/threads.py has the whole picture). Batching across requests is left out: on the small
models this engine is for, one sequence per forward is already latency-bound, and vLLM is the engine for
throughput.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ttserve.contract import Adapter, GenerationChunk, PromptScores, SamplingParams, TokenLogprob, Usage
from ttserve.engines.base import Engine
from ttserve.shared_model import SharedModel


class TransformersEngine(Engine):
    # Its decoding threads take turns on one model, one forward pass at a time: running more at once adds no
    # throughput and divides each stream's speed. A few keep streams interleaved; the rest wait their turn.
    default_concurrency = 4

    def __init__(self, shared: SharedModel, max_model_len: int | None = None, max_concurrency: int = 4):
        super().__init__()
        self.shared = shared
        shared.serving  # noqa: B018 - built now, before any request or training can run
        self.tokenizer = shared.tokenizer
        self.model_name = shared.name
        self.device = shared.device
        self.max_model_len = min(max_model_len or shared.max_length, shared.max_length)
        # Decoding threads, and one more that loads and unloads adapters: all wait on the serving lock.
        self._executor = ThreadPoolExecutor(max_concurrency + 1, thread_name_prefix="ttserve-generate")
        eos = shared.loaded.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    @property
    def model(self) -> torch.nn.Module:
        """The PEFT-wrapped model this engine serves from: the serving tree over the trainer's weights."""
        return self.shared.serving

    async def _in_thread(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # --- adapters -----------------------------------------------------------------------------------
    async def _load_adapter(self, adapter: Adapter) -> None:
        await self._in_thread(self.shared.load_adapter, adapter.path, adapter.name)

    async def _unload_adapter(self, adapter: Adapter) -> None:
        await self._in_thread(self.shared.delete_adapter, adapter.name)

    # --- the model ----------------------------------------------------------------------------------
    def _forward(self, input_ids: list[int], adapter: Adapter | None, past=None):
        ids = torch.tensor([input_ids], device=self.device)
        with self.shared.routed(adapter.name if adapter else None) as model:
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
        return out.logits[0].float(), out.past_key_values

    async def _score(self, prompt_ids: list[int], adapter: Adapter | None, top_logprobs: int) -> PromptScores:
        ids = prompt_ids

        def run() -> PromptScores:
            logits, _ = self._forward(ids, adapter)
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            chosen = logprobs.gather(1, torch.tensor(ids[1:], device=logprobs.device)[:, None])[:, 0].tolist()
            top: list = [None]
            for row in logprobs:
                top.append(self._top(row, top_logprobs) if top_logprobs else ())
            return PromptScores(
                token_ids=ids,
                tokens=[self.decode_token(t) for t in ids],
                logprobs=[None, *chosen],
                top=top,
            )

        return await self._in_thread(run)

    def _top(self, logprobs: torch.Tensor, k: int) -> tuple[tuple[int, str, float], ...]:
        values, indices = torch.topk(logprobs, min(k, logprobs.numel()))
        return tuple(
            (int(i), self.decode_token(int(i)), float(v)) for v, i in zip(values, indices, strict=True)
        )

    async def _generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter: Adapter | None, request_id: str | None
    ) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: GenerationChunk | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        loop.run_in_executor(self._executor, self._decode, prompt_ids, params, adapter, emit, cancel)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.final:
                    return
        finally:
            cancel.set()  # the client went away (or we are done): the worker stops before its next token

    def _decode(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: Adapter | None,
        emit: Callable[[GenerationChunk | BaseException], None],
        cancel: threading.Event,
    ) -> None:
        try:
            self._decode_loop(prompt_ids, params, adapter, emit, cancel)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            emit(error)

    def _decode_loop(self, prompt_ids, params, adapter, emit, cancel) -> None:
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stops = StopStrings(params.stop)
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        generated: list[int] = []
        emitted_chars = 0
        emitted_tokens = 0
        pending_logprobs: list[TokenLogprob] = []
        finish: str | None = "length" if max_tokens == 0 else None
        text = ""
        past = None
        next_input = prompt_ids
        penalized = bool(params.presence_penalty or params.frequency_penalty)
        counts = None  # how often each token was generated (penalties only)
        while finish is None and not cancel.is_set():
            logits, past = self._forward(next_input, adapter, past)
            logits = logits[-1]
            if penalized:
                counts = torch.zeros_like(logits, dtype=torch.float32) if counts is None else counts
                token = sample(penalize(logits, counts, params), params, generator)
                counts[token] += 1
            else:
                token = sample(logits, params, generator)
            generated.append(token)
            next_input = [token]
            if params.logprobs is not None:
                row = torch.log_softmax(logits, dim=-1)
                pending_logprobs.append(
                    TokenLogprob(
                        token, self.decode_token(token), float(row[token]), self._top(row, params.logprobs)
                    )
                )
            text += detokenizer.add(token)
            cut = stops.find(text, emitted_chars)
            if cut is not None:
                text, finish = text[:cut], "stop"
            elif token in self.eos_token_ids and not params.ignore_eos:
                finish = "stop"
            elif len(generated) >= max_tokens:
                finish = "length"
            if finish and cut is None:
                text += detokenizer.flush()  # a trailing incomplete character, as decode() would give it
            safe = len(text) if finish else stops.safe_length(text)
            if safe > emitted_chars or finish:
                chunk = GenerationChunk(
                    text=text[emitted_chars:safe],
                    token_ids=generated[emitted_tokens:],
                    logprobs=pending_logprobs,
                )
                if finish:
                    chunk.finish_reason, chunk.usage = finish, Usage(len(prompt_ids), len(generated))
                emit(chunk)
                emitted_chars, emitted_tokens, pending_logprobs = safe, len(generated), []
        if finish is None:  # cancelled: nobody is listening, but end the stream properly anyway
            emit(GenerationChunk(finish_reason="abort", usage=Usage(len(prompt_ids), len(generated))))
        elif max_tokens == 0:
            emit(GenerationChunk(finish_reason=finish, usage=Usage(len(prompt_ids), 0)))

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def penalize(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties (SamplingParams), given how often each token was generated."""
    penalty = params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits.float() - penalty


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token: greedy at temperature 0, else temperature, top-k and top-p (nucleus) sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs >= params.top_p  # the first token always stays
        logits = logits.clone()
        logits[order[outside]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class IncrementalDetokenizer:
    """Text deltas token by token without decoding the whole output each time (vLLM's method).

    A token's text can depend on its neighbours (byte-level pieces of one character, leading-space rules),
    so each step decodes only a few tokens of context plus the new ones, and holds a delta back while it
    ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # where the context window starts
        self.read = 0  # tokens whose text has been given out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


class StopStrings:
    """Stop-string matching on streamed text, holding back what could still become a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, emitted: int) -> int | None:
        """Where the first stop string starts, searching only text that could hold a new match."""
        start = max(0, emitted - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def safe_length(self, text: str) -> int:
        """How much of `text` can be sent: not a trailing partial stop string, not a half-decoded character."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence decodes as U+FFFD
            end -= 1
        for stop in self.stops:
            for length in range(min(len(stop) - 1, end), 0, -1):
                if text.endswith(stop[:length], 0, end):
                    end -= length
                    break
        return end
