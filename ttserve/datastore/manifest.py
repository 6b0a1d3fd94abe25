"""The datastore manifest: what was embedded how, so that a datastore is never read with the wrong embedder."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.bin"
DOCSTORE_FILE = "docs.sqlite"


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
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a ttserve datastore (no {MANIFEST_FILE})")
        manifest = cls.model_validate_json(path.read_text())
        if manifest.format_version != FORMAT_VERSION:
            raise ValueError(
                f"{directory}: datastore format version {manifest.format_version}, this ttserve reads {FORMAT_VERSION}; rebuild it"
            )
        return manifest

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(self.model_dump_json(indent=2) + "\n")
