"""What pre-selection hands to selection: candidate ids, their scores and their exact rows.

A datastore, whole or sharded, answers a query with `Candidates`; each shard of a sharded one answers with
`ShardHits`, which the coordinator merges. Both are plain numpy arrays in frozen dataclasses, so a shard's
answer pickles across processes (a Ray Serve handle) as cheaply as it can.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardHits:
    """One shard's top-k for a query, in `faiss_index.rank_by_abs` order."""

    ids: np.ndarray  # int64 global sequence ids
    scores: np.ndarray  # float32 signed inner products with the query
    vectors: np.ndarray  # float32 [len(ids), d]: the exact stored rows


@dataclass(frozen=True)
class ShardFailure:
    """A shard that gave no answer, and why."""

    shard: int  # position in the shard table
    name: str  # its directory, "shard-001"
    sequences: int  # how many sequences the answer lacks
    error: str  # "TimeoutError: no answer within 0.5 s"


@dataclass(frozen=True)
class Candidates:
    """A query's pre-selected candidates, in `faiss_index.rank_by_abs` order, with SIFT's exact rows."""

    ids: np.ndarray  # int64 sequence ids (global ones in a sharded datastore)
    scores: np.ndarray  # float32 signed inner products with the query
    vectors: np.ndarray  # float32 [len(ids), d]
    failures: tuple[ShardFailure, ...] = ()  # shards that did not answer: these are from the others
    degraded: str | None = None  # the failures as a sentence for the request's reason; None when complete
