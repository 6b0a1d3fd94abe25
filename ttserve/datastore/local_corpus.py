"""The embedded default corpus: source files of the Python standard library.

It is on every machine that runs ttserve, needs no download, and is code, as most of the Pile is. The
selection is deterministic for a given Python version: top-level modules in name order up to a byte
budget, so the first build stays within a couple of minutes on a 2-core CPU.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from ttserve.config import Settings
from ttserve.datastore.build import build_datastore
from ttserve.datastore.manifest import MANIFEST_FILE, Manifest

DEFAULT_BUDGET_BYTES = 600_000
MAX_FILE_BYTES = 30_000
# Modules that are jokes or generated tables rather than code anyone asks about.
SKIP = {"this.py", "antigravity.py", "__phello__.foo.py", "_pydecimal.py", "pydoc_data"}


def stdlib_sources(max_bytes: int = DEFAULT_BUDGET_BYTES) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        # Many mid-sized modules make a more varied corpus than a few huge ones.
        if (
            path.name in SKIP
            or path.name.startswith("_")
            or size > MAX_FILE_BYTES
            or total + size > max_bytes
        ):
            continue
        chosen.append(path)
        total += size
    return chosen


def ensure_datastore(settings: Settings, progress: bool = True) -> Manifest:
    """The configured datastore, built from the standard-library corpus the first time it is missing."""
    path = Path(settings.datastore.path)
    if (path / MANIFEST_FILE).is_file():
        return Manifest.read(path)
    return build_datastore(stdlib_sources(), path, settings, progress=progress)
