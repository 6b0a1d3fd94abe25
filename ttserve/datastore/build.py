"""Building and extending a datastore, atomically.

A build reads every corpus once to validate it (so a malformed line fails before any embedding work),
then splits, embeds and writes into a staging directory beside the target, and renames it into place
at the end. An interrupted or failed build therefore never leaves a half-written datastore: the target
either does not exist or is the previous complete version. `add` works the same way on a copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ttserve import __version__
from ttserve.chunking import split_text
from ttserve.config import Settings
from ttserve.datastore import faiss_index
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
from ttserve.datastore.sources import CorpusError, ReadStats, read_corpus
from ttserve.datastore.store import EmbedderMismatchError, open_embeddings
from ttserve.embedding import Embedder
from ttserve.files import staged_directory

EMBED_BLOCK = 512  # sequences embedded and written per step: bounds memory on any corpus size
INDEX_BLOCK = 65536


def build_datastore(
    corpus: Sequence[str | Path],
    out: str | Path,
    settings: Settings | None = None,
    embedder: Embedder | None = None,
    overwrite: bool = False,
    skip_invalid_utf8: bool = False,
    progress: bool = True,
) -> Manifest:
    """Build a datastore from `corpus` (JSONL / Parquet files, text files or directories) into `out`."""
    settings = settings or Settings()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    stats = _validate(corpus, skip_invalid_utf8)
    embedder = embedder or Embedder(settings.embedder)
    _check_embedder(embedder, settings.embedder.model)
    config = settings.datastore
    tokenizer_name = config.tokenizer or embedder.name
    manifest = Manifest(
        ttserve_version=__version__,
        embedder=EmbedderInfo(
            model=embedder.name, dimension=embedder.dimension, max_seq_length=embedder.max_seq_length
        ),
        splitter=SplitterInfo(
            tokenizer=tokenizer_name, chunk_tokens=config.chunk_tokens or embedder.max_tokens
        ),
        index=IndexInfo(type=config.index_type),
        embedding_dtype=config.embedding_dtype,
        counts=Counts(
            skipped_empty=stats.skipped_empty,
            skipped_invalid_utf8=stats.skipped_invalid_utf8,
        ),
        sources=[str(p) for p in corpus],
    )
    with _writing(out, replace=overwrite) as (staging, writer):
        (staging / EMBEDDINGS_FILE).touch()
        added = _embed_corpus(
            corpus, stats.documents, manifest, embedder, writer, staging, skip_invalid_utf8, progress
        )
        manifest.counts.documents, manifest.counts.sequences = stats.documents, added
        vectors = open_embeddings(staging, manifest)
        index = faiss_index.new_index(config.index_type, embedder.dimension, added, config)
        faiss_index.train_if_needed(index, vectors)
        add_to_index(index, vectors, 0, progress)
        manifest.index.hnsw_m = config.hnsw_m if config.index_type == "hnsw" else None
        manifest.index.ivf_nlist = faiss_index.ivf_nlist(index)
        faiss_index.write_index(index, staging / INDEX_FILE)
        manifest.write(staging)
    return manifest


def add_to_datastore(
    path: str | Path,
    corpus: Sequence[str | Path],
    settings: Settings | None = None,
    embedder: Embedder | None = None,
    skip_invalid_utf8: bool = False,
    progress: bool = True,
) -> Manifest:
    """Append `corpus` to the datastore at `path`, split and embedded exactly as its manifest records."""
    settings = settings or Settings()
    path = Path(path)
    manifest = Manifest.read(path)
    if manifest.embedder.model != settings.embedder.model:
        raise EmbedderMismatchError(
            f"{path} was embedded with {manifest.embedder.model!r}, the configured embedder is {settings.embedder.model!r}"
        )
    stats = _validate(corpus, skip_invalid_utf8)
    embedder = embedder or Embedder(settings.embedder)
    _check_embedder(embedder, manifest.embedder.model)
    with _writing(path, replace=True, copy_from=path) as (staging, writer):
        before = manifest.counts.sequences
        added = _embed_corpus(
            corpus, stats.documents, manifest, embedder, writer, staging, skip_invalid_utf8, progress
        )
        manifest.counts.documents += stats.documents
        manifest.counts.sequences += added
        manifest.counts.skipped_empty += stats.skipped_empty
        manifest.counts.skipped_invalid_utf8 += stats.skipped_invalid_utf8
        manifest.sources += [str(p) for p in corpus]
        manifest.updated_at = datetime.now(UTC).isoformat(timespec="seconds")
        index = faiss_index.read_index(staging / INDEX_FILE)
        add_to_index(index, open_embeddings(staging, manifest), before, progress)
        faiss_index.write_index(index, staging / INDEX_FILE)
        manifest.write(staging)
    return manifest


def _validate(corpus: Sequence[str | Path], skip_invalid_utf8: bool) -> ReadStats:
    """Read every document once without keeping any: bad input fails here, before anything is written."""
    if not corpus:
        raise ValueError("no corpus given")
    stats = ReadStats()
    for _ in read_corpus([Path(p) for p in corpus], stats, skip_invalid_utf8):
        pass
    if stats.documents == 0:
        raise CorpusError(
            Path(str(corpus[0])), f"no non-empty documents ({stats.skipped_empty} empty skipped)"
        )
    return stats


def _check_embedder(embedder: Embedder, expected: str) -> None:
    if embedder.name != expected:
        raise EmbedderMismatchError(f"embedder {embedder.name!r} given, {expected!r} expected")


def _splitter_tokenizer(manifest: Manifest, embedder: Embedder):
    if manifest.splitter.tokenizer == embedder.name:
        return embedder.tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(manifest.splitter.tokenizer)


def _embed_corpus(
    corpus: Sequence[str | Path],
    total_documents: int,
    manifest: Manifest,
    embedder: Embedder,
    writer: DocStoreWriter,
    staging: Path,
    skip_invalid_utf8: bool,
    progress: bool,
) -> int:
    """Split, embed and append every document; returns the number of sequences written."""
    tokenizer = _splitter_tokenizer(manifest, embedder)
    dtype = np.dtype(manifest.embedding_dtype)
    next_id = writer.next_id()
    first_id = next_id
    pending: list[StoredSequence] = []

    with open(staging / EMBEDDINGS_FILE, "ab") as vectors_out:

        def flush() -> None:
            vectors = embedder.encode([s.text for s in pending])
            vectors_out.write(vectors.astype(dtype).tobytes())
            writer.add(pending)
            pending.clear()

        documents = read_corpus([Path(p) for p in corpus], ReadStats(), skip_invalid_utf8)
        for document in tqdm(
            documents, total=total_documents, unit="doc", desc="embedding", disable=not progress
        ):
            for chunk, text in enumerate(
                split_text(document.text, tokenizer, manifest.splitter.chunk_tokens)
            ):
                pending.append(
                    StoredSequence(next_id, document.id, chunk, text, document.source, document.metadata)
                )
                next_id += 1
                if len(pending) >= EMBED_BLOCK:
                    flush()
        if pending:
            flush()
    return next_id - first_id


def add_to_index(index, vectors: np.ndarray, start: int, progress: bool) -> None:
    """Add rows `start:` of `vectors` as float32, a block at a time: bounded memory on any size."""
    for offset in tqdm(
        range(start, len(vectors), INDEX_BLOCK),
        unit="block",
        desc="indexing",
        disable=not progress or len(vectors) - start <= INDEX_BLOCK,
    ):
        index.add(np.ascontiguousarray(vectors[offset : offset + INDEX_BLOCK], dtype=np.float32))


@contextmanager
def _writing(
    target: Path, replace: bool, copy_from: Path | None = None
) -> Iterator[tuple[Path, DocStoreWriter]]:
    """A staging directory and an open document-store transaction; both become `target` only on success."""
    with staged_directory(target, replace=replace, copy_from=copy_from) as staging:
        writer = DocStoreWriter(staging / DOCSTORE_FILE)
        try:
            yield staging, writer
        except BaseException:
            writer.rollback()
            raise
        writer.commit()
