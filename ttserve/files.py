"""Directories written atomically, and private scratch space that outlives no process.

`staged_directory` is how every multi-file artefact ttserve writes (a datastore, the tiny model, a trained
adapter) appears: built in a hidden directory beside its target, renamed into place only when complete, so
a reader never sees a half-written one and an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(
    target: Path, *, replace: bool = False, copy_from: Path | None = None, create: bool = True
) -> Iterator[Path]:
    """A scratch directory beside `target` (same filesystem, so the rename is atomic) that becomes `target`
    only if the block finishes without an exception.

    `copy_from`: start from a copy of that directory (to extend an existing artefact). `replace`: an existing
    `target` is swapped out; otherwise an existing target is an error and is never touched. `create=False`
    yields a fresh path that does not exist yet, for writers that create their own directory.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; artefacts are read like any other cache entry
    try:
        if not create:
            staging.rmdir()  # the name stays unique: nothing else writes `.building-` names here
        elif copy_from is not None:
            shutil.copytree(copy_from, staging, dirs_exist_ok=True)
        yield staging
        if not target.exists():
            os.rename(staging, target)  # (os.rename would also silently replace an empty directory)
        elif replace:
            retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            raise FileExistsError(f"{target} appeared while it was being written")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def scratch_directory(root: str | Path | None, prefix: str = "ttserve-adapters") -> Path:
    """A private directory for this process under `root` (default: `default_scratch_root()`), removed at exit.

    The name carries the owner's pid, so directories left by a process that was killed (a Ray replica
    is SIGKILLed when it does not stop in time) are swept the next time one is made: /dev/shm is memory.
    """
    root = Path(root) if root else default_scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep_scratch(root, prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))
    atexit.register(shutil.rmtree, path, True)
    return path


def sweep_scratch(
    root: str | Path, prefix: str = "ttserve-adapters", before_removal: Callable[[Path], None] | None = None
) -> None:
    """Remove the scratch directories under `root` whose owner process has gone. Called when one is made
    and again now and then (the adapter cache does before each training): a process killed on a lost node
    can still be exiting when its replacement makes its own directory. `before_removal(directory)` frees
    what a directory lists outside itself."""
    for stale in Path(root).glob(f"{prefix}-*-*"):
        match = re.fullmatch(rf"{re.escape(prefix)}-(\d+)-.+", stale.name)
        if match and not _alive(int(match.group(1))):
            if before_removal is not None:
                before_removal(stale)
            shutil.rmtree(stale, ignore_errors=True)


def default_scratch_root() -> Path:
    """/dev/shm (memory-backed, fast to write and read back) when usable, else the temp directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shm.stat().st_mode & 0o002:
        return shm
    return Path(tempfile.gettempdir())


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:  # a zombie (exited, not yet reaped by its parent) has gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
