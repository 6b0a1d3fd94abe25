"""A datastore's files as the server opened them, whatever happens to their paths afterwards.

A datastore is replaced by renaming a new directory into place (`ttserve index build --overwrite`,
files.staged_directory), and a server that has it open keeps answering from the files it opened: the
index is in memory, the embedding rows are memory-mapped, and the texts are read through a connection
opened with the datastore (never reopened by path, which would mix the new texts with the old picks). A file
changed in place (rewritten, or truncated: a mapped read past its end is a SIGBUS, not an exception) is
noticed before each read and refused with a clear error instead of wrong rows or a crash.
"""

from __future__ import annotations

import os
from pathlib import Path


class DatastoreChangedError(RuntimeError):
    """A datastore file was changed in place while the server had it open."""


class FileGuard:
    """An open descriptor on `path` and its size and modification time when it was opened."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> tuple[int, int]:
        stat = os.fstat(self.fd)
        return stat.st_size, stat.st_mtime_ns

    def check(self) -> None:
        """Raise DatastoreChangedError if the file was rewritten or truncated since it was opened."""
        if self._fingerprint() != self.fingerprint:
            raise DatastoreChangedError(
                f"{self.path} was changed in place while the server had it open (rewritten or truncated); "
                "its rows would not match the index. Replace a datastore by building a new one "
                "(`ttserve index build --overwrite` swaps it atomically) and restart to load it"
            )

    def close(self) -> None:
        os.close(self.fd)
