"""The document store: an embedded SQLite database mapping sequence ids to text, source and metadata.

Sequence ids are the rows of the embedding matrix and the ids of the Faiss index, 0..N-1 in insertion
order. A document longer than the splitter's limit becomes several sequences (chunk 0, 1, ...).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS sequences (
    id INTEGER PRIMARY KEY,
    doc_id TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sequences_doc_id ON sequences (doc_id);
"""


@dataclass(frozen=True)
class StoredSequence:
    id: int
    doc_id: str
    chunk: int
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


class DocStoreWriter:
    """Appends sequences inside one transaction; nothing is visible until `commit`."""

    def __init__(self, path: Path):
        self.connection = sqlite3.connect(path)
        self.connection.executescript(SCHEMA)
        self.connection.execute("BEGIN")

    def next_id(self) -> int:
        (count,) = self.connection.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM sequences").fetchone()
        return int(count)

    def add(self, rows: Iterable[StoredSequence]) -> None:
        self.connection.executemany(
            "INSERT INTO sequences (id, doc_id, chunk, text, source, metadata) VALUES (?, ?, ?, ?, ?, ?)",
            (
                (r.id, r.doc_id, r.chunk, r.text, r.source, json.dumps(r.metadata, ensure_ascii=False))
                for r in rows
            ),
        )

    def commit(self) -> None:
        self.connection.commit()
        self.connection.close()

    def rollback(self) -> None:
        self.connection.rollback()
        self.connection.close()


class DocStore:
    """Read-only access through one connection, opened at once: it keeps reading the file it opened even
    after a new datastore is renamed into place (guard.py). Threads share it under a lock; a prompt's fetch
    is a few rows."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"document store not found: {path}")
        self.path = path
        self._lock = threading.Lock()
        # immutable: no locks or journal; a change in place is the Datastore's guard to notice.
        self._shared = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._shared

    def __len__(self) -> int:
        with self._connection() as connection:
            (count,) = connection.execute("SELECT COUNT(*) FROM sequences").fetchone()
        return int(count)

    def get(self, ids: Sequence[int]) -> list[StoredSequence]:
        """The sequences with these ids, in the order given (repeats allowed)."""
        unique = sorted({int(i) for i in ids})
        found: dict[int, StoredSequence] = {}
        # SQLite limits the number of bound parameters; 500 per query stays well inside every build's limit.
        for start in range(0, len(unique), 500):
            part = unique[start : start + 500]
            query = f"SELECT id, doc_id, chunk, text, source, metadata FROM sequences WHERE id IN ({','.join('?' * len(part))})"
            with self._connection() as connection:
                rows = connection.execute(query, part).fetchall()
            for row in rows:
                found[row[0]] = StoredSequence(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]))
        missing = [i for i in unique if i not in found]
        if missing:
            raise KeyError(f"sequence ids not in the document store: {missing[:10]}")
        return [found[int(i)] for i in ids]
