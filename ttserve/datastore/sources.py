"""Reading corpora: JSONL files, directories of text/markdown files, and Parquet files.

Every reader yields `Document`s and reports bad input with the file (and line or row) it came from.
Records whose text is empty are skipped and counted; duplicates are kept (SIFT copes with them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from ttserve.config import BuiltinCorpus

BUILTIN_CORPORA: tuple[str, ...] = get_args(BuiltinCorpus)  # named where a path would go
# Plain text, markup and source code: the Pile, which the paper retrieves from, is mostly code.
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class CorpusError(ValueError):
    """Bad input in a corpus, located by file and line (or row)."""

    def __init__(self, path: Path, message: str, line: int | None = None):
        self.path, self.line = path, line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadStats:
    documents: int = 0
    skipped_empty: int = 0
    skipped_invalid_utf8: int = 0


def read_corpus(
    paths: Iterable[Path], stats: ReadStats | None = None, skip_invalid_utf8: bool = False
) -> Iterator[Document]:
    """Documents from every path in order: a file by its suffix, a directory by its text files, a name in
    BUILTIN_CORPORA by what it names."""
    stats = stats if stats is not None else ReadStats()
    for path in map(Path, paths):
        if str(path) in BUILTIN_CORPORA:
            documents = _read_builtin(str(path), stats)
        elif path.is_dir():
            documents = _read_text_dir(path, stats, skip_invalid_utf8)
        elif not path.exists():
            raise CorpusError(path, "no such file or directory")
        elif path.suffix.lower() in JSONL_SUFFIXES:
            documents = _read_jsonl(path, stats, skip_invalid_utf8)
        elif path.suffix.lower() in PARQUET_SUFFIXES:
            documents = _read_parquet(path)
        elif path.suffix.lower() in TEXT_SUFFIXES:
            documents = _read_text_files([path], path.parent, stats, skip_invalid_utf8)
        else:
            raise CorpusError(
                path,
                f"unsupported file type {path.suffix!r}: use JSONL, Parquet, text/markdown files or a directory",
            )
        for document in documents:
            if document.text.strip():
                stats.documents += 1
                yield document
            else:
                stats.skipped_empty += 1


def _read_builtin(name: str, stats: ReadStats) -> Iterator[Document]:
    from ttserve.stdlib_corpus import datastore_files, documentation, stdlib_root

    if name == "stdlib:sources":
        yield from _read_text_files(datastore_files(), stdlib_root(), stats, skip_invalid_utf8=False)
        return
    for qualified_name, text in documentation():  # a module, class or function
        yield Document(id=qualified_name, text=text, source=name)


def _record_to_document(
    record: Any, path: Path, default_id: str, line: int | None = None, row: int | None = None
) -> Document:
    """A JSON object (a JSONL line or a Parquet row) as a Document: `text` required, `id` optional, the rest metadata."""

    def error(message: str) -> CorpusError:
        return CorpusError(path, message if row is None else f"row {row}: {message}", line)

    if not isinstance(record, dict):
        raise error(f"expected a JSON object, got {type(record).__name__}")
    if "text" not in record:
        raise error("missing required field 'text'")
    text = "" if record["text"] is None else record["text"]
    if not isinstance(text, str):
        raise error(f"field 'text' must be a string, got {type(text).__name__}")
    doc_id = record.get("id")
    metadata = {k: v for k, v in record.items() if k not in ("text", "id")}
    return Document(
        id=default_id if doc_id is None else str(doc_id), text=text, source=str(path), metadata=metadata
    )


def _read_jsonl(path: Path, stats: ReadStats, skip_invalid_utf8: bool) -> Iterator[Document]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, stats, skip_invalid_utf8, line_number)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorpusError(
                    path, f"malformed JSON: {error.msg} (column {error.colno})", line_number
                ) from None
            yield _record_to_document(record, path, f"{path.name}:{line_number}", line=line_number)


def _decode(raw: bytes, path: Path, stats: ReadStats, skip: bool, line: int | None = None) -> str | None:
    """UTF-8 text, or None for a record to skip (counted) when `skip`; otherwise an error with its location."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if skip:
            stats.skipped_invalid_utf8 += 1
            return None
        if line is not None:  # one JSONL line: the offset is within the line
            raise CorpusError(path, f"invalid UTF-8 at byte {error.start} of the line", line) from None
        raise CorpusError(
            path, f"invalid UTF-8 at byte {error.start}", raw[: error.start].count(b"\n") + 1
        ) from None


def _read_text_dir(root: Path, stats: ReadStats, skip_invalid_utf8: bool) -> Iterator[Document]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise CorpusError(root, f"directory has no text files ({', '.join(TEXT_SUFFIXES)})")
    yield from _read_text_files(files, root, stats, skip_invalid_utf8)


def _read_text_files(
    files: list[Path], root: Path, stats: ReadStats, skip_invalid_utf8: bool
) -> Iterator[Document]:
    for file in files:
        text = _decode(file.read_bytes(), file, stats, skip_invalid_utf8)
        if text is not None:
            yield Document(id=file.relative_to(root).as_posix(), text=text, source=str(file))


def _read_parquet(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise CorpusError(path, f"not a readable Parquet file: {error}") from None
    if "text" not in parquet.schema_arrow.names:
        raise CorpusError(
            path, f"missing required column 'text' (columns: {', '.join(parquet.schema_arrow.names)})"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield _record_to_document(record, path, f"{path.name}:{row}", row=row)
            row += 1
