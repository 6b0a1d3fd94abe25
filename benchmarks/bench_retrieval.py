"""SIFT's added time over Faiss kNN retrieval on a 100k x 1024 flat index.

    .venv/bin/python benchmarks/bench_retrieval.py                    # N=100k, d=1024, 200 queries
    .venv/bin/python benchmarks/bench_retrieval.py --blas-threads 1  # small linear algebra single-threaded

The datastore is written through ttserve's own datastore code from synthetic clustered unit vectors
(real text would need ~3 hours of embedding on 2 CPU cores at d=1024; the timings of search and
selection depend only on N, d, K and N-picks, not on where the vectors came from). Each query goes
through `Retriever.retrieve_embeddings` (Faiss ±q pre-selection of K=200, candidate vectors from the
memory-mapped embedding matrix, selection, document fetch), once with strategy knn and once with sift,
in alternating order. "Faiss kNN" is the plain top-50 search a nearest-neighbour retriever would do.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ttserve import __version__
from ttserve.config import DatastoreConfig, RetrievalConfig
from ttserve.datastore import Datastore, faiss_index
from ttserve.datastore.docstore import DocStoreWriter, StoredSequence
from ttserve.datastore.manifest import (
    DOCSTORE_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    Counts,
    EmbedderInfo,
    IndexInfo,
    Manifest,
    SplitterInfo,
)
from ttserve.retrieval import Retriever


def clustered_unit_vectors(n: int, d: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    vectors = centers[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def write_datastore(path: Path, vectors: np.ndarray) -> None:
    n, d = vectors.shape
    path.mkdir(parents=True)
    manifest = Manifest(
        ttserve_version=__version__,
        embedder=EmbedderInfo(model="synthetic", dimension=d, max_seq_length=512),
        splitter=SplitterInfo(tokenizer="synthetic", chunk_tokens=512),
        index=IndexInfo(type="flat"),
        embedding_dtype="float32",
        counts=Counts(documents=n, sequences=n),
    )
    vectors.tofile(path / EMBEDDINGS_FILE)
    index = faiss_index.new_index("flat", d, n, DatastoreConfig())
    index.add(vectors)
    faiss_index.write_index(index, path / INDEX_FILE)
    writer = DocStoreWriter(path / DOCSTORE_FILE)
    writer.add(StoredSequence(i, f"doc-{i}", 0, f"synthetic sequence {i}", "synthetic") for i in range(n))
    writer.commit()
    manifest.write(path)


class FixedEmbedder:
    """Only the attributes Retriever checks; queries arrive as embeddings."""

    name = "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument(
        "--blas-threads", type=int, default=None, help="limit BLAS threads (default: library default)"
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    vectors = clustered_unit_vectors(args.size, args.dim, clusters=args.size // 100, rng=rng)
    picks = rng.integers(0, args.size, args.queries)
    queries = vectors[picks] + 0.5 * rng.standard_normal((args.queries, args.dim)).astype(
        np.float32
    ) / np.sqrt(args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    with tempfile.TemporaryDirectory() as tmp:
        write_datastore(Path(tmp) / "ds", vectors)
        del vectors
        store = Datastore(Path(tmp) / "ds", DatastoreConfig(use_gpu="never"))
        retriever = Retriever(store, FixedEmbedder(), RetrievalConfig(k=args.k, n=args.n))  # type: ignore[arg-type]
        limits = threadpool_limits(args.blas_threads, user_api="blas") if args.blas_threads else None

        timings: dict[str, list[float]] = {
            "faiss_knn": [],
            "knn": [],
            "sift": [],
            "index": [],
            "selection": [],
            "fetch": [],
        }
        for warmup in (True, False):
            for i, q in enumerate(queries[:10] if warmup else queries):
                started = time.perf_counter()
                store.index.search(q[None, :], args.n)
                faiss_knn = (time.perf_counter() - started) * 1e3
                order = ("knn", "sift") if i % 2 else ("sift", "knn")
                results = {}
                for strategy in order:
                    started = time.perf_counter()
                    results[strategy] = retriever.retrieve_embeddings(q, strategy=strategy)
                    results[strategy].timings_ms["wall_ms"] = (time.perf_counter() - started) * 1e3
                if warmup:
                    continue
                timings["faiss_knn"].append(faiss_knn)
                timings["knn"].append(results["knn"].timings_ms["wall_ms"])
                timings["sift"].append(results["sift"].timings_ms["wall_ms"])
                for part in ("index", "selection", "fetch"):
                    timings[part].append(results["sift"].timings_ms[f"{part}_ms"])
        if limits is not None:
            limits.restore_original_limits()

    med = {name: statistics.median(values) for name, values in timings.items()}
    p90 = {name: float(np.percentile(values, 90)) for name, values in timings.items()}
    print(
        f"N={args.size} d={args.dim} K={args.k} picks={args.n} queries={args.queries} blas_threads={args.blas_threads or 'default'}"
    )
    print("| measurement | median ms | p90 ms |")
    print("|---|---:|---:|")
    rows = [
        ("plain Faiss top-50 search (a kNN retriever)", "faiss_knn"),
        ("ttserve retrieve, strategy knn (±q K=200 pre-selection)", "knn"),
        ("ttserve retrieve, strategy sift", "sift"),
        ("  of which Faiss ±q search + candidate vectors", "index"),
        ("  of which SIFT selection", "selection"),
        ("  of which document fetch (SQLite)", "fetch"),
    ]
    for label, key in rows:
        print(f"| {label} | {med[key]:.2f} | {p90[key]:.2f} |")
    print(f"SIFT added over ttserve knn: {100 * (med['sift'] - med['knn']) / med['knn']:.1f}% (median)")
    print(
        f"SIFT added over plain Faiss kNN: {100 * (med['sift'] - med['faiss_knn']) / med['faiss_knn']:.1f}% (median)"
    )
    print(
        f"SIFT selection alone relative to the Faiss search: {100 * med['selection'] / med['index']:.1f}% (median)"
    )


if __name__ == "__main__":
    main()
