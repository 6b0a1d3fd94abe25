"""The embedded default datastore: the top-level modules of the Python standard library.

Which files, and why they never overlap the tiny model's pretraining text, is ttserve/stdlib_corpus.py.
"""

from __future__ import annotations

from pathlib import Path

from ttserve.config import Settings
from ttserve.datastore.build import build_datastore
from ttserve.datastore.manifest import MANIFEST_FILE, Manifest


def ensure_datastore(settings: Settings, progress: bool = True) -> Manifest:
    """The configured datastore, built from the standard-library corpus the first time it is missing."""
    path = Path(settings.datastore.path)
    if (path / MANIFEST_FILE).is_file():
        return Manifest.read(path)
    return build_datastore(["stdlib:sources"], path, settings, progress=progress)
