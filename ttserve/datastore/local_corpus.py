"""The embedded default datastore, built on first use from a corpus of this interpreter's standard library.

`datastore.corpus` picks it: `stdlib:docs` (the default model's) or `stdlib:sources` (the tiny model's). What
each holds, and why the sources never overlap the tiny model's pretraining text, is ttserve/stdlib_corpus.py.
"""

from __future__ import annotations

from pathlib import Path

from ttserve.config import Settings
from ttserve.datastore.build import build_datastore
from ttserve.datastore.manifest import MANIFEST_FILE, Manifest, ShardsManifest, is_sharded


def ensure_datastore(settings: Settings, progress: bool = True) -> Manifest:
    """The configured datastore's manifest (a sharded one's: the whole store's), built from
    `datastore.corpus` the first time it is missing."""
    path = Path(settings.datastore.path)
    if is_sharded(path):
        return ShardsManifest.read(path).datastore
    if (path / MANIFEST_FILE).is_file():
        return Manifest.read(path)
    return build_datastore([settings.datastore.corpus], path, settings, progress=progress)
