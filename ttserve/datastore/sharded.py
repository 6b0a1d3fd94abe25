"""A sharded datastore searched as one: every shard searched at once, their top-K merged exactly.

Per query the shards' searches run concurrently, each bounded by `timeout_s`. Every shard returns its
top-K by |inner product| with the exact rows; the merge keeps the global top-K in the same order
(faiss_index.rank_by_abs), which is exactly the whole store's top-K: a hit in the global top-K has fewer
than K hits above it in the whole store, so fewer than K in its own shard (docs/datastore-scaling.md §3.3).
SIFT then runs once over the merged candidates, in `Retriever`.

A shard that raises or does not answer in time does not fail the query: the candidates come from the
others, and `Candidates.failures` and `.degraded` say what is missing. Only when no shard answers is it
an error.

Shards are reached through clients with two synchronous methods (`ShardClient`); `LocalShard` is one in
this process. A client for a shard in another process (a Ray Serve deployment wrapping `LocalShard`) has
the same two methods and bounds its own calls, e.g. `handle.search.remote(query, k).result(timeout_s=...)`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from ttserve.config import DatastoreConfig, EmbedderConfig
from ttserve.datastore.candidates import Candidates, ShardFailure, ShardHits
from ttserve.datastore.docstore import StoredSequence
from ttserve.datastore.faiss_index import rank_by_abs
from ttserve.datastore.manifest import ShardsManifest, is_sharded
from ttserve.datastore.store import Datastore, check_embedder

# An in-process shard only misses this when the machine is overloaded or a search hangs; a remote one
# gets its own, tighter deadline from its client.
DEFAULT_SHARD_TIMEOUT_S = 5.0


class ShardsUnavailableError(RuntimeError):
    """No shard answered: there are no candidates at all."""


class ShardClient(Protocol):
    def search(self, query: np.ndarray, k: int) -> ShardHits:
        """The shard's top-k for `query` [d], with global ids."""
        ...

    def sequences(self, ids: list[int]) -> list[StoredSequence]:
        """The shard's sequences with these global ids, in the order given, with global ids."""
        ...


class LocalShard:
    """A shard in this process: a `Datastore` whose own row ids are the global ids minus `first_id`."""

    def __init__(
        self,
        path: str | Path,
        first_id: int,
        config: DatastoreConfig | None = None,
        embedder: EmbedderConfig | str | None = None,
    ):
        self.datastore = Datastore(path, config, embedder)
        self.first_id = first_id

    def search(self, query: np.ndarray, k: int) -> ShardHits:
        found = self.datastore.candidates(query, k)
        return ShardHits(found.ids + self.first_id, found.scores, found.vectors)

    def sequences(self, ids: list[int]) -> list[StoredSequence]:
        local = self.datastore.sequences([int(i) - self.first_id for i in ids])
        return [replace(s, id=s.id + self.first_id) for s in local]


class ShardedDatastore:
    """The shards of `root` behind their clients (one per shard, in table order), searched as one datastore."""

    def __init__(
        self,
        root: ShardsManifest,
        clients: Sequence[ShardClient],
        timeout_s: float = DEFAULT_SHARD_TIMEOUT_S,
        path: str | Path | None = None,
    ):
        if len(clients) != len(root.shards):
            raise ValueError(f"{len(clients)} shard clients for {len(root.shards)} shards")
        self.root, self.clients, self.timeout_s = root, list(clients), timeout_s
        self.manifest = root.datastore  # the whole store's: embedder, index type, counts
        self.dimension = self.manifest.embedder.dimension
        self.path = Path(path) if path is not None else None
        self.first_ids = [shard.first_id for shard in root.shards]

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: DatastoreConfig | None = None,
        embedder: EmbedderConfig | str | None = None,
        timeout_s: float = DEFAULT_SHARD_TIMEOUT_S,
    ) -> ShardedDatastore:
        """The sharded datastore at `path`, every shard opened in this process."""
        path = Path(path)
        root = ShardsManifest.read(path)
        check_embedder(path, root.datastore, embedder)
        clients = [LocalShard(path / s.name, s.first_id, config, embedder) for s in root.shards]
        for shard, client in zip(root.shards, clients, strict=True):
            if len(client.datastore) != shard.sequences:
                raise ValueError(
                    f"{path / shard.name} holds {len(client.datastore)} sequences, shards.json says {shard.sequences}"
                )
        return cls(root, clients, timeout_s, path)

    def __len__(self) -> int:
        return self.manifest.counts.sequences

    def candidates(self, query: np.ndarray, k: int) -> Candidates:
        """The global top-k over every shard that answers in time, with their exact rows."""
        calls = [partial(self._search, number, query, k) for number in range(len(self.clients))]
        hits, failures = [], []
        for number, answer in enumerate(_fan_out(calls, self.timeout_s)):
            if isinstance(answer, BaseException):
                shard = self.root.shards[number]
                error = f"{type(answer).__name__}: {answer}"
                failures.append(ShardFailure(number, shard.name, shard.sequences, error))
            else:
                hits.append(answer)
        if not hits:
            raise ShardsUnavailableError(
                "no shard answered: " + "; ".join(f"{f.name} ({f.error})" for f in failures)
            )
        ids = np.concatenate([h.ids for h in hits]).astype(np.int64)
        scores = np.concatenate([h.scores for h in hits]).astype(np.float32)
        top = rank_by_abs(ids, scores)[:k]
        vectors = np.concatenate([h.vectors for h in hits])[top].astype(np.float32)
        degraded = self._describe(failures) if failures else None
        return Candidates(ids[top], scores[top], vectors, tuple(failures), degraded)

    def sequences(self, ids: Sequence[int] | np.ndarray) -> list[StoredSequence]:
        """The sequences with these global ids, in the order given (repeats allowed), each from its shard."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        outside = [i for i in ids if not 0 <= i < len(self)]
        if outside:
            raise KeyError(f"sequence ids not in the datastore: {outside[:10]}")
        wanted: dict[int, list[int]] = {}
        for i in dict.fromkeys(ids):
            wanted.setdefault(bisect_right(self.first_ids, i) - 1, []).append(i)
        # One call per owning shard, all at once (a remote shard costs a round trip each), with no
        # deadline: evaluation reads whole stores, which no per-call deadline would fit.
        with ThreadPoolExecutor(max_workers=len(wanted), thread_name_prefix="shard-fetch") as pool:
            parts = pool.map(lambda item: self.clients[item[0]].sequences(item[1]), wanted.items())
            found = {s.id: s for part in parts for s in part}
        return [found[i] for i in ids]

    def _search(self, number: int, query: np.ndarray, k: int) -> ShardHits:
        """Shard `number`'s top-k, checked: ids in its range, one score and one row of d values per id."""
        hits, shard = self.clients[number].search(query, k), self.root.shards[number]
        ids, stop = np.asarray(hits.ids), shard.first_id + shard.sequences
        if np.any((ids < shard.first_id) | (ids >= stop)):
            raise ValueError(f"returned ids outside its range {shard.first_id}..{stop - 1}")
        if np.shape(hits.scores) != (len(ids),) or np.shape(hits.vectors) != (len(ids), self.dimension):
            raise ValueError(
                f"returned {np.shape(hits.scores)} scores and {np.shape(hits.vectors)} rows for {len(ids)} ids"
            )
        return hits

    def _describe(self, failures: list[ShardFailure]) -> str:
        shards, total = len(self.clients), len(self)
        missing = sum(f.sequences for f in failures)
        reasons = "; ".join(f"{f.name} failed ({f.error})" for f in failures)
        return (
            f"{reasons}; candidates from {shards - len(failures)} of {shards} shards, "
            f"{total - missing} of {total} sequences"
        )


def open_datastore(
    path: str | Path,
    config: DatastoreConfig | None = None,
    embedder: EmbedderConfig | str | None = None,
    shard_timeout_s: float = DEFAULT_SHARD_TIMEOUT_S,
) -> Datastore | ShardedDatastore:
    """The datastore at `path`, whole or sharded (its shards then opened in this process)."""
    if is_sharded(path):
        return ShardedDatastore.open(path, config, embedder, shard_timeout_s)
    return Datastore(path, config, embedder)


def _fan_out(calls: list[Callable[[], object]], timeout_s: float) -> list[object]:
    """Run the calls at once, each in its own thread: each one's result, or the exception it raised, or a
    TimeoutError when it has not returned within `timeout_s`."""
    pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="shard")
    try:
        futures = [pool.submit(call) for call in calls]
        done, _ = wait(futures, timeout=timeout_s)
    finally:
        pool.shutdown(wait=False)  # a late call finishes in the background; nobody waits for it
    outcomes: list[object] = []
    for future in futures:
        if future not in done:
            outcomes.append(TimeoutError(f"no answer within {timeout_s:g} s"))
        elif future.exception() is not None:
            outcomes.append(future.exception())
        else:
            outcomes.append(future.result())
    return outcomes
