"""A built datastore opened for retrieval: manifest, Faiss index, embedding matrix and document store.

Candidate embeddings for SIFT come from the datastore's own embedding matrix (embeddings.bin, memory-
mapped, row = sequence id), not from the index. That keeps SIFT's kernel exact whatever the index
does to save memory (HNSW graphs, IVF lists, and in the large-scale design compressed PQ codes), costs
one K-row read per query (~0.05 ms for K=200 from the page cache), and needs no re-embedding (which
would cost K encoder passes per query). The price is disk: N·d·4 bytes (or ·2 for float16) beside the
index.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from ttserve.config import DatastoreConfig, EmbedderConfig
from ttserve.datastore import faiss_index
from ttserve.datastore.candidates import Candidates
from ttserve.datastore.docstore import DocStore, StoredSequence
from ttserve.datastore.guard import FileGuard
from ttserve.datastore.manifest import DOCSTORE_FILE, EMBEDDINGS_FILE, INDEX_FILE, Manifest


class EmbedderMismatchError(ValueError):
    """The datastore was embedded with a different model than the one configured for queries."""


class Datastore:
    def __init__(
        self,
        path: str | Path,
        config: DatastoreConfig | None = None,
        embedder: EmbedderConfig | str | None = None,
    ):
        """Open the datastore at `path`; `embedder` (config or model name) is checked against the manifest."""
        self.path = Path(path)
        self.config = config or DatastoreConfig(path=self.path)
        self.manifest = Manifest.read(self.path)
        check_embedder(self.path, self.manifest, embedder)
        self.dimension = self.manifest.embedder.dimension
        # Held from here on: a datastore replaced on disk leaves this one answering as it was (guard.py).
        self._guards = [FileGuard(self.path / EMBEDDINGS_FILE), FileGuard(self.path / DOCSTORE_FILE)]
        self.embeddings = open_embeddings(self.path, self.manifest)
        self.index = faiss_index.configure_search(faiss_index.read_index(self.path / INDEX_FILE), self.config)
        self.docs = DocStore(self.path / DOCSTORE_FILE)
        if not (self.index.ntotal == len(self.embeddings) == self.manifest.counts.sequences):
            raise ValueError(
                f"{self.path} is inconsistent: index has {self.index.ntotal} vectors, embeddings "
                f"{len(self.embeddings)}, manifest {self.manifest.counts.sequences}"
            )

    def __len__(self) -> int:
        return self.manifest.counts.sequences

    def __del__(self) -> None:
        for guard in getattr(self, "_guards", ()):
            guard.close()

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Pre-selection: the top-k sequence ids by |inner product| with `query` [d], and their inner products."""
        return faiss_index.search_abs(self.index, query, k)

    def candidates(self, query: np.ndarray, k: int) -> Candidates:
        """Pre-selection with the candidates' exact rows: what `Retriever` selects from."""
        ids, scores = self.search(query, k)
        return Candidates(ids, scores, self.vectors(ids))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The exact stored embeddings of `ids`, float32 [len(ids), d]."""
        self._guards[0].check()  # a truncated mapping would be a SIGBUS, not an exception
        return np.asarray(self.embeddings[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def sequences(self, ids: np.ndarray | list[int]) -> list[StoredSequence]:
        self._guards[1].check()
        return self.docs.get([int(i) for i in ids])


def check_embedder(path: Path, manifest: Manifest, embedder: EmbedderConfig | str | None) -> None:
    """`embedder` (config or model name; None: no check) must be the model the datastore was embedded with."""
    if embedder is None:
        return
    expected = embedder if isinstance(embedder, str) else embedder.model
    if expected != manifest.embedder.model:
        raise EmbedderMismatchError(
            f"{path} was embedded with {manifest.embedder.model!r} but the configured embedder is "
            f"{expected!r}; query embeddings would not be comparable. Rebuild the datastore or configure "
            f"embedder.model: {manifest.embedder.model}"
        )


def open_embeddings(path: Path, manifest: Manifest, mode: str = "r") -> np.memmap:
    file = path / EMBEDDINGS_FILE
    shape = (manifest.counts.sequences, manifest.embedder.dimension)
    expected = shape[0] * shape[1] * np.dtype(manifest.embedding_dtype).itemsize
    if file.stat().st_size != expected:
        raise ValueError(f"{file} has {file.stat().st_size} bytes, the manifest implies {expected}")
    if shape[0] == 0:
        return np.zeros(shape, dtype=manifest.embedding_dtype)  # np.memmap cannot map an empty file
    vectors = np.memmap(file, dtype=manifest.embedding_dtype, mode=mode, shape=shape)
    # Retrieval reads K scattered rows per query. The kernel's default read-ahead (several MB per fault)
    # turned 200 cold row reads into ~1 s of I/O in docs/datastore-scaling.md §6; random access is honest.
    mapping = getattr(vectors, "_mmap", None)  # numpy keeps the mmap object here; absent on exotic platforms
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return vectors
