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


def search_abs(index: faiss.Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k ids by |<x, query>| for one query vector [d], with their signed inner products."""
    k = min(k, index.ntotal)
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    scores, ids = index.search(np.concatenate([q, -q]), k)
    # Row 1 holds −<x, q>: as an absolute score it ranks anti-correlated candidates.
    ids, abs_scores = ids.reshape(-1), scores.reshape(-1)
    signs = np.repeat(np.array([1.0, -1.0], dtype=np.float32), k)
    keep = ids >= 0  # approximate indexes may return fewer than k hits (id −1)
    ids, abs_scores, signs = ids[keep], abs_scores[keep], signs[keep]
    order = np.argsort(-abs_scores, kind="stable")
    ids, abs_scores, signs = ids[order], abs_scores[order], signs[order]
    # An id can appear in both lists only when |<x, q>| is tiny; keep its first (larger) occurrence.
    _, first = np.unique(ids, return_index=True)
    first = np.sort(first)[:k]
    return ids[first].astype(np.int64), (abs_scores[first] * signs[first]).astype(np.float32)
