"""Two-stage retrieval (spec §2): Faiss pre-selects K candidates by |inner product|, then SIFT (or kNN)
picks N of them using their exact embeddings. A sharded datastore merges its shards' candidates exactly
first (ttserve/datastore/sharded.py); SIFT runs once, over the merged candidates.

`Retriever` is safe to call from many threads: the embedder serialises its own forward passes, Faiss
searches and SIFT run concurrently, and the document store serialises its (few-row) reads on one connection.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from ttserve import selection
from ttserve.config import RetrievalConfig, Settings
from ttserve.contract import STRATEGIES, Strategy  # Strategy stays importable from here
from ttserve.datastore import (
    Datastore,
    EmbedderMismatchError,
    ShardedDatastore,
    StoredSequence,
    open_datastore,
)
from ttserve.embedding import Embedder

# λ′ depends on how the embedder spreads similarities (spec §1: calibrate per embedding model).
# all-MiniLM-L6-v2's cosine similarities are compressed: at activeft's 0.01 SIFT over-diversifies and loses
# to kNN. The value here is the best of a sweep on a Pile tuning set that is never used for reporting
# (BENCHMARKS.md, "λ′ calibration for MiniLM").
CALIBRATED_LAMBDA = {"sentence-transformers/all-MiniLM-L6-v2": 3.0}


def default_lambda(embedder: str) -> float:
    return CALIBRATED_LAMBDA.get(embedder, selection.DEFAULT_LAMBDA)


@dataclass(frozen=True)
class Retrieval:
    """What was selected for one prompt, in selection order (SIFT may repeat a sequence)."""

    ids: list[int]  # sequence ids (rows of the datastore), one per pick
    sequences: list[StoredSequence]
    variances: np.ndarray  # summed posterior variance, len(ids) + 1 (spec §2: σ_0², σ_1², ...)
    strategy: Strategy
    lam: float
    num_targets: int  # m: prompt chunks that acted as SIFT targets
    candidates: int  # K actually pre-selected
    timings_ms: dict[str, float] = field(default_factory=dict)
    truncated_from: int | None = None  # picks before adaptive truncation, when alpha was given
    # What was missing from the candidates, as a sentence for the request's reason: shards that failed or
    # timed out in a sharded datastore. None when every shard answered (always, unsharded).
    degraded: str | None = None

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.sequences]

    @property
    def doc_ids(self) -> list[str]:
        return [s.doc_id for s in self.sequences]

    @property
    def uncertainty_before(self) -> float:
        return float(self.variances[0])

    @property
    def uncertainty_after(self) -> float:
        return float(self.variances[-1])

    @property
    def selection(self) -> selection.Selection:
        """The picks as a Selection over themselves: what the budget policy plans from."""
        return selection.Selection(np.arange(len(self.ids)), self.variances, self.lam, self.strategy)


class Retriever:
    def __init__(
        self,
        datastore: Datastore | ShardedDatastore,
        embedder: Embedder,
        config: RetrievalConfig | None = None,
    ):
        if datastore.manifest.embedder.model != embedder.name:
            raise EmbedderMismatchError(
                f"datastore embedded with {datastore.manifest.embedder.model!r}, embedder is {embedder.name!r}"
            )
        self.datastore = datastore
        self.embedder = embedder
        self.config = config or RetrievalConfig()

    @property
    def lam(self) -> float:
        """The λ′ used when a call gives none: configured, else calibrated for the embedder."""
        return self.config.lam if self.config.lam is not None else default_lambda(self.embedder.name)

    def embed(self, text: str) -> np.ndarray:
        """The prompt's target embeddings [m, d] (one per chunk, the last `max_query_chunks` kept)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("prompt text must be a non-empty string")
        return self.embedder.encode_query(text, self.config.max_query_chunks)

    @classmethod
    def from_settings(cls, settings: Settings, path: str | None = None) -> Retriever:
        """The configured retriever; a sharded datastore's shards are opened in this process."""
        embedder = Embedder(settings.embedder)
        config = settings.datastore
        datastore = open_datastore(path or config.path, config, settings.embedder, config.shard_timeout_s)
        return cls(datastore, embedder, settings.retrieval)

    def retrieve(
        self,
        text: str,
        n: int | None = None,
        k: int | None = None,
        strategy: Strategy | None = None,
        lam: float | None = None,
        alpha: float | None = None,
        exclude_ids: set[int] | None = None,
    ) -> Retrieval:
        """Select up to n sequences for the prompt `text` (see `retrieve_embeddings`)."""
        started = time.perf_counter()
        targets = self.embed(text)
        embed_ms = (time.perf_counter() - started) * 1e3
        result = self.retrieve_embeddings(targets, n, k, strategy, lam, alpha, exclude_ids)
        result.timings_ms["embed_ms"] = embed_ms
        result.timings_ms["total_ms"] += embed_ms
        return result

    async def retrieve_async(
        self, text: str, *, n: int | None = None, strategy: Strategy | None = None, lam: float | None = None
    ) -> Retrieval:
        """`retrieve` off the event loop (in its default executor): what a replica's pipeline awaits."""
        return await asyncio.to_thread(self.retrieve, text, n=n, strategy=strategy, lam=lam)

    def retrieve_embeddings(
        self,
        targets: np.ndarray,
        n: int | None = None,
        k: int | None = None,
        strategy: Strategy | None = None,
        lam: float | None = None,
        alpha: float | None = None,
        exclude_ids: set[int] | None = None,
    ) -> Retrieval:
        """Select for prompt target embeddings [d] or [m, d].

        Pre-selection uses the mean target (spec §1); SIFT then minimises the summed variance of all m.
        `exclude_ids` removes sequences from the candidates (evaluation: a test document must not
        retrieve itself). `alpha` applies the adaptive-SIFT truncation (may leave zero picks).
        """
        n = self.config.n if n is None else n
        k = self.config.k if k is None else k
        strategy = strategy or self.config.strategy
        lam = self.lam if lam is None else lam
        alpha = self.config.alpha if alpha is None else alpha
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: use {' or '.join(map(repr, STRATEGIES))}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        targets = np.atleast_2d(np.asarray(targets, dtype=np.float32))
        if targets.shape[1] != self.datastore.dimension:
            raise ValueError(
                f"target embeddings have dimension {targets.shape[1]}, datastore {self.datastore.dimension}"
            )

        started = time.perf_counter()
        extra = len(exclude_ids) if exclude_ids else 0
        found = self.datastore.candidates(targets.mean(0), k + extra)
        ids, candidates = found.ids, found.vectors
        if exclude_ids:
            keep = ~np.isin(ids, np.fromiter(exclude_ids, dtype=np.int64, count=len(exclude_ids)))
            ids, candidates = ids[keep], candidates[keep]
        ids, candidates = ids[:k], candidates[:k]
        index_ms = (time.perf_counter() - started) * 1e3

        started = time.perf_counter()
        if len(ids) == 0:
            raise LookupError("the datastore returned no candidates")
        select = selection.sift if strategy == "sift" else selection.nearest_neighbors
        picked = select(candidates, targets, n, lam=lam)
        truncated_from = None
        if alpha is not None:
            truncated_from = len(picked)
            picked = picked.stop_adaptive(alpha)
        selection_ms = (time.perf_counter() - started) * 1e3

        started = time.perf_counter()
        chosen = [int(i) for i in ids[picked.indices]]
        sequences = self.datastore.sequences(chosen)
        fetch_ms = (time.perf_counter() - started) * 1e3
        return Retrieval(
            ids=chosen,
            sequences=sequences,
            variances=picked.variances,
            strategy=strategy,
            lam=lam,
            num_targets=len(targets),
            candidates=len(ids),
            truncated_from=truncated_from,
            degraded=found.degraded,
            timings_ms={
                "index_ms": index_ms,
                "selection_ms": selection_ms,
                "fetch_ms": fetch_ms,
                "total_ms": index_ms + selection_ms + fetch_ms,
            },
        )
