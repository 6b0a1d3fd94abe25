"""Sharding a datastore: contiguous id ranges, each an ordinary datastore, under a root manifest.

    DESTINATION/
        shards.json   the whole store's manifest and the shard table: name, first_id, sequences
        shard-000/    a complete datastore (manifest.json, index.faiss, embeddings.bin, docs.sqlite) whose
        shard-001/    row ids are its own, from 0: global id = first_id + local id
        ...

The shards are cut from a built datastore in its id order, so a global id is the source's id. What a
shard's index is, per index type of the source:
- flat: a flat index. The shards' merged top-K is exactly the source's.
- ivf: the source's trained quantizer, each vector in the list the source put it in
  (faiss_index.ivf_range). With the same nprobe the merged top-K is again exactly the source's.
- hnsw: a graph built per shard. Approximate like the source's, but not the same approximation.
ttserve/datastore/sharded.py searches the shards together.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ttserve import __version__
from ttserve.config import DatastoreConfig, Settings
from ttserve.datastore import faiss_index
from ttserve.datastore.build import add_to_index, build_datastore
from ttserve.datastore.docstore import DocStore, DocStoreWriter
from ttserve.datastore.manifest import (
    DOCSTORE_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    Counts,
    Manifest,
    ShardInfo,
    ShardsManifest,
)
from ttserve.datastore.store import Datastore
from ttserve.embedding import Embedder
from ttserve.files import staged_directory

TEXT_BLOCK = 4096  # texts copied per step: bounds memory on any shard size


def shard_datastore(
    source: str | Path, destination: str | Path, shards: int, overwrite: bool = False, progress: bool = True
) -> ShardsManifest:
    """Cut the built datastore at `source` into `shards` datastores under `destination`.

    Atomic: the whole destination appears at once, or on any failure nothing does. An existing
    `destination` is an error unless `overwrite`, which replaces it as a whole.
    """
    source, destination = Path(source), Path(destination)
    whole = Manifest.read(source)  # not a datastore, or a sharded one: an error before anything is written
    _check_shard_count(shards, whole.counts.sequences)
    if destination.exists() and not overwrite:
        raise FileExistsError(
            f"{destination} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if destination.resolve() == source.resolve():
        raise ValueError("the sharded datastore must go to a new directory, not over its source")
    with staged_directory(destination, replace=overwrite) as staging:
        return write_shards(source, staging, shards, progress)


def build_sharded_datastore(
    corpus: Sequence[str | Path],
    out: str | Path,
    shards: int,
    settings: Settings | None = None,
    embedder: Embedder | None = None,
    overwrite: bool = False,
    skip_invalid_utf8: bool = False,
    progress: bool = True,
) -> ShardsManifest:
    """`build_datastore`, then shard it, as one atomic step: the unsharded build exists only while staged."""
    out = Path(out)
    _check_shard_count(shards)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    with staged_directory(out, replace=overwrite) as staging:
        whole = staging / ".unsharded"
        build_datastore(
            corpus, whole, settings, embedder, skip_invalid_utf8=skip_invalid_utf8, progress=progress
        )
        root = write_shards(whole, staging, shards, progress)
        shutil.rmtree(whole)
    return root


def write_shards(source: Path, directory: Path, shards: int, progress: bool = False) -> ShardsManifest:
    """Write the shards of the datastore at `source`, then the root manifest, into the empty `directory`."""
    store = Datastore(source, DatastoreConfig(path=source, use_gpu="never"))
    _check_shard_count(shards, len(store))
    bounds = [len(store) * number // shards for number in range(shards + 1)]  # sizes differ by at most 1
    table = []
    for number in tqdm(range(shards), desc="sharding", unit="shard", disable=not progress):
        shard = ShardInfo(
            name=f"shard-{number:03d}", first_id=bounds[number], sequences=bounds[number + 1] - bounds[number]
        )
        _write_shard(store, shard, directory / shard.name)
        table.append(shard)
    root = ShardsManifest(ttserve_version=__version__, datastore=store.manifest, shards=table)
    root.write(directory)
    return root


def _write_shard(store: Datastore, shard: ShardInfo, directory: Path) -> None:
    """Rows first_id.. of `store` as a datastore of their own, renumbered from 0."""
    first, stop = shard.first_id, shard.first_id + shard.sequences
    directory.mkdir()
    store.embeddings[first:stop].tofile(directory / EMBEDDINGS_FILE)  # the rows' bytes, dtype unchanged
    documents = _copy_texts(store.docs, first, stop, directory / DOCSTORE_FILE)
    faiss_index.write_index(_shard_index(store, first, stop), directory / INDEX_FILE)
    counts = Counts(documents=documents, sequences=shard.sequences)
    store.manifest.model_copy(update={"counts": counts}).write(directory)


def _copy_texts(docs: DocStore, first: int, stop: int, path: Path) -> int:
    """Copy the texts of ids first..stop-1, renumbered from 0; returns the documents whose first chunk is
    among them (a document cut by a shard boundary counts where it starts)."""
    writer = DocStoreWriter(path)
    documents = 0
    try:
        for start in range(first, stop, TEXT_BLOCK):
            rows = docs.get(range(start, min(start + TEXT_BLOCK, stop)))
            documents += sum(row.chunk == 0 for row in rows)
            writer.add(replace(row, id=row.id - first) for row in rows)
    except BaseException:
        writer.rollback()
        raise
    writer.commit()
    return documents


def _shard_index(store: Datastore, first: int, stop: int):
    kind = store.manifest.index.type
    if kind == "ivf":
        return faiss_index.ivf_range(store.index, first, stop)
    config = store.config.model_copy(update={"hnsw_m": store.manifest.index.hnsw_m or store.config.hnsw_m})
    index = faiss_index.new_index(kind, store.dimension, stop - first, config)
    add_to_index(index, store.embeddings[first:stop], 0, progress=False)
    return index


def _check_shard_count(shards: int, sequences: int | None = None) -> None:
    if shards < 1:
        raise ValueError(f"the number of shards must be at least 1, got {shards}")
    if sequences is not None and shards > sequences:
        raise ValueError(
            f"cannot cut {sequences} sequences into {shards} shards: every shard needs at least one"
        )
