"""The datastore manifest: what was embedded how, so that a datastore is never read with the wrong embedder.

A sharded datastore has, instead, a root manifest (`shards.json`): the whole store's manifest and the shard
table. Each shard is an ordinary datastore directory with its own manifest (ttserve/datastore/shards.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.bin"
DOCSTORE_FILE = "docs.sqlite"
SHARDS_FILE = "shards.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedderInfo(_Record):
    model: str
    dimension: int
    normalized: bool = True
    max_seq_length: int


class SplitterInfo(_Record):
    tokenizer: str
    chunk_tokens: int


class IndexInfo(_Record):
    type: Literal["flat", "hnsw", "ivf"]
    hnsw_m: int | None = None
    ivf_nlist: int | None = None


class Counts(_Record):
    documents: int = 0
    sequences: int = 0
    skipped_empty: int = 0
    skipped_invalid_utf8: int = 0


class Manifest(_Record):
    format_version: int = FORMAT_VERSION
    ttserve_version: str
    created_at: str = Field(default_factory=_now)
    updated_at: str = Field(default_factory=_now)
    embedder: EmbedderInfo
    splitter: SplitterInfo
    index: IndexInfo
    embedding_dtype: Literal["float32", "float16"]
    counts: Counts = Counts()
    sources: list[str] = []

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        if is_sharded(directory):
            raise ValueError(
                f"{directory} is a sharded datastore: open it with ttserve.datastore.open_datastore; to add "
                "documents, add them to the unsharded datastore and shard that again"
            )
        return _read(cls, directory, MANIFEST_FILE)

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(self.model_dump_json(indent=2) + "\n")


class ShardInfo(_Record):
    name: str  # its directory in the sharded datastore: "shard-000", ...
    first_id: int  # the global id of its row 0: global id = first_id + the shard's own (local) id
    sequences: int


class ShardsManifest(_Record):
    """A sharded datastore's root: the whole store's manifest and its shards, contiguous id ranges in order."""

    format_version: int = FORMAT_VERSION
    ttserve_version: str
    created_at: str = Field(default_factory=_now)
    datastore: Manifest  # the whole store: embedder, splitter, index type, counts, sources
    shards: list[ShardInfo]

    @model_validator(mode="after")
    def _ranges_tile_the_store(self) -> ShardsManifest:
        # Routing an id to its shard (a binary search over first_id) is only right if the ranges tile 0..N-1.
        expected = 0
        for shard in self.shards:
            if shard.first_id != expected or shard.sequences < 1:
                raise ValueError(f"shard {shard.name} starts at id {shard.first_id}, expected {expected}")
            expected += shard.sequences
        if not self.shards or expected != self.datastore.counts.sequences:
            raise ValueError(
                f"the shards hold {expected} sequences, the datastore {self.datastore.counts.sequences}"
            )
        return self

    @classmethod
    def read(cls, directory: Path) -> ShardsManifest:
        return _read(cls, directory, SHARDS_FILE)

    def write(self, directory: Path) -> None:
        (directory / SHARDS_FILE).write_text(self.model_dump_json(indent=2) + "\n")


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / SHARDS_FILE).is_file()


def _read(cls, directory: Path, name: str):
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a ttserve datastore (no {name})")
    record = cls.model_validate_json(path.read_text())
    if record.format_version != FORMAT_VERSION:
        raise ValueError(
            f"{directory}: datastore format version {record.format_version}, this ttserve reads {FORMAT_VERSION}; rebuild it"
        )
    return record
