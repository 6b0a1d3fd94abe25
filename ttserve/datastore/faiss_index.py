"""Faiss indexes over L2-normalised embeddings, searched by absolute inner product.

Why |inner product|: SIFT's gain from a candidate x grows with k(x*, x)², so a candidate anti-correlated
with the prompt is as informative as a correlated one (spec §2). Faiss ranks by signed score, so we
search with q and −q and merge the two result lists.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist

from ttserve.config import DatastoreConfig


def new_index(kind: str, dimension: int, expected_size: int, config: DatastoreConfig) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(dimension)
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dimension, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf":
        nlist = config.ivf_nlist or max(1, int(4 * math.sqrt(max(expected_size, 1))))
        # IVF needs enough training points per list; a tiny corpus gets few lists rather than a Faiss error.
        nlist = max(1, min(nlist, expected_size // 39 or 1))
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dimension), dimension, nlist, faiss.METRIC_INNER_PRODUCT)
    raise ValueError(f"unknown index type {kind!r}")


def train_if_needed(index: faiss.Index, vectors: np.ndarray, seed: int = 0) -> None:
    if index.is_trained:
        return
    sample = vectors
    limit = 256 * faiss.extract_index_ivf(index).nlist
    if len(vectors) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), limit, replace=False))
        sample = vectors[rows]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


def ivf_nlist(index: faiss.Index) -> int | None:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def ivf_range(index: faiss.Index, first: int, stop: int) -> faiss.Index:
    """A copy of the IVF `index` holding only its vectors with ids in [first, stop), renumbered from 0.

    The copy keeps the trained quantizer, and each vector is moved into the list the whole index put it in
    rather than assigned again. Probing the same lists for a query then scans exactly the in-range part of
    the whole index's scan, so shards cut this way answer together what the whole index answers
    (docs/datastore-scaling.md §3.3).
    """
    part = faiss.clone_index(index)
    part.reset()  # keeps the quantizer, empties the lists
    whole_ivf, part_ivf = faiss.extract_index_ivf(index), faiss.extract_index_ivf(part)
    for list_no in range(whole_ivf.nlist):
        ids, codes = get_invlist(whole_ivf.invlists, list_no)
        inside = (ids >= first) & (ids < stop)
        if inside.any():
            local_ids = np.ascontiguousarray(ids[inside] - first)
            local_codes = np.ascontiguousarray(codes[inside])
            part_ivf.invlists.add_entries(
                list_no, len(local_ids), faiss.swig_ptr(local_ids), faiss.swig_ptr(local_codes)
            )
    part_ivf.ntotal = part.ntotal = stop - first
    return part


def configure_search(index: faiss.Index, config: DatastoreConfig) -> faiss.Index:
    """Search-time parameters, and a GPU copy when a GPU build of Faiss sees a GPU."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(config.hnsw_ef_search, 1)
    if ivf_nlist(index) is not None:
        faiss.extract_index_ivf(index).nprobe = config.ivf_nprobe
    if config.use_gpu == "auto" and gpu_count() > 0 and not isinstance(index, faiss.IndexHNSW):
        index = faiss.index_cpu_to_all_gpus(index)  # HNSW has no GPU implementation; it stays on the CPU
    return index


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def read_index(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def rank_by_abs(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The positions of hits in pre-selection order: |inner product| descending, then id ascending.

    The one order of every search and of every merge of searches (shards). The id breaks ties, so exact
    duplicates (identical embeddings, common in real corpora) rank the same way wherever they are searched.
    """
    return np.lexsort((ids, -np.abs(scores)))


def search_abs(index: faiss.Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k ids by |<x, query>| for one query vector [d], with their signed inner products, in
    `rank_by_abs` order.

    Faiss keeps an arbitrary few of the hits tied at its k-th score, so a k-th place shared by exact
    duplicates would be filled differently by a whole store and by its shards. Searching deeper than k shows
    whether a hit left out could tie with the k-th: if so the search widens until none can, and the order
    then gives the place to the lowest id. (HNSW is approximate anyway: one search.)
    """
    k = min(k, index.ntotal)
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    depth = k + 1
    while True:
        depth = min(depth, index.ntotal)
        side_scores, side_ids = index.search(np.concatenate([q, -q]), depth)
        ids, scores = _signed_hits(side_ids, side_scores)
        top = rank_by_abs(ids, scores)[:k]
        # A side that filled all `depth` places may have left out hits scoring up to its last score.
        full = side_ids[:, -1] >= 0
        unseen = side_scores[full, -1].max(initial=-np.inf)
        settled = len(top) < k or np.abs(scores[top[-1]]) > unseen
        if settled or depth == index.ntotal or isinstance(index, faiss.IndexHNSW):
            return ids[top].astype(np.int64), scores[top].astype(np.float32)
        depth *= 2


def _signed_hits(side_ids: np.ndarray, side_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hits of the searches with q (row 0) and −q (row 1), each with its signed inner product <x, q>.

    A hit counts only from the side its sign belongs to (<x, q> ≥ 0 from the q search, < 0 from the −q
    search), where its side's score is |<x, q>|. From the other side it ranks below everything that side
    returns, so whether it is there at all depends on how deep the search went, which differs between a
    whole store and its shards (and an IVF search may never scan its list from its own side).
    """
    scores = side_scores * np.array([[1.0], [-1.0]], dtype=np.float32)  # row 1 held −<x, q>
    # (Approximate indexes may return fewer hits than asked: id −1.)
    own_side = np.stack([scores[0] >= 0, scores[1] < 0]) & (side_ids >= 0)
    ids, first = np.unique(side_ids[own_side], return_index=True)
    return ids, scores[own_side][first]
