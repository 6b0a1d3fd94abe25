"""The Python standard library as the embedded default's corpus, split into two halves that share no file.

The standard library is on every machine that runs ttserve, needs no download, and is code, as most of
the Pile is. The embedded default makes two things from it:

- the **datastore** (`datastore_files`): top-level modules (`argparse.py`, `shlex.py`, ...). This is the
  text retrieval serves and test-time training fine-tunes on, and what `ttserve eval --sample-datastore`
  scores;
- the **tiny model's pretraining corpus** (`pretraining_files`): the files inside packages (`asyncio/`,
  `email/`, `json/`, ...), from which the model learns Python and the library's style.

The halves are disjoint on purpose. Test-time training can only show a gain on text the model has not
already learnt, so if pretraining saw the datastore's text, retrieval would hand the model what it
already knows and evaluation would measure nothing. A file is either top-level or inside a package, never
both; the exclusions below only drop text that belongs to neither half (tests, GUI code, vendored
packages, generated tables, jokes).

Both selections are deterministic for a given Python version: files are taken in path order.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

# --- the datastore half: top-level modules ----------------------------------------------------------------
DATASTORE_BUDGET_BYTES = 600_000  # bounds how long the first build of the default datastore takes
DATASTORE_MAX_FILE_BYTES = 30_000  # many mid-sized modules make a more varied corpus than a few huge ones
# Modules that are jokes or generated tables rather than code anyone asks about.
DATASTORE_SKIP = {"this.py", "antigravity.py", "__phello__.foo.py", "_pydecimal.py"}

# --- the pretraining half: files inside packages ----------------------------------------------------------
# Tests, GUI code and vendored packages, as the rest of ttserve treats them.
EXCLUDED_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "ensurepip"}
# Generated data that would spend the tiny model's small capacity on tables: `encodings/` is ~100
# machine-generated codec tables (1.4 MB, a quarter of all package source), `pydoc_data/topics.py` is one
# 750 kB string dict. `config-3.x-*` directories (build configuration) are dropped by prefix.
GENERATED_DIRS = {"encodings", "pydoc_data", "__phello__", "__pycache__"}


def stdlib_root() -> Path:
    """The directory of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def datastore_files(max_bytes: int = DATASTORE_BUDGET_BYTES, root: Path | None = None) -> list[Path]:
    """The top-level stdlib modules the default datastore is built from: absolute paths, in name order.

    Private modules (`_*.py`), `DATASTORE_SKIP` and files over `DATASTORE_MAX_FILE_BYTES` are left out;
    the rest are taken while they fit in `max_bytes`.
    """
    root = root or stdlib_root()
    chosen, total = [], 0
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        if (
            path.name in DATASTORE_SKIP
            or path.name.startswith("_")
            or size > DATASTORE_MAX_FILE_BYTES
            or total + size > max_bytes
        ):
            continue
        chosen.append(path)
        total += size
    return chosen


def pretraining_files(max_bytes: int | None = None, root: Path | None = None) -> list[Path]:
    """The stdlib package sources the tiny model is pretrained on: absolute paths, in path order.

    Only `.py` files inside subdirectories of the root, outside `EXCLUDED_DIRS`, `GENERATED_DIRS` and
    `config-*`. With `max_bytes`, files are taken in path order while they fit, so a cap selects the same
    files on every machine with the same Python version.
    """
    root = root or stdlib_root()
    found: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        # Prune in place (and sort, so the walk order never depends on the filesystem).
        subdirs[:] = sorted(
            d
            for d in subdirs
            if d not in EXCLUDED_DIRS and d not in GENERATED_DIRS and not d.startswith("config-")
        )
        if Path(directory) == root:
            continue  # top-level modules are the datastore's
        found += [Path(directory, n) for n in names if n.endswith(".py")]
    chosen, total = [], 0
    for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        size = path.stat().st_size
        if max_bytes is not None and total + size > max_bytes:
            continue
        chosen.append(path)
        total += size
    return chosen


# --- the documentation: what a chat model's users ask about ---------------------------------------------------
# Modules people ask a Python assistant about. Their documentation comes from this interpreter's own
# docstrings and signatures (what pydoc renders): the same text on every machine with the same Python, offline.
DOCUMENTED_MODULES = (
    "abc argparse array asyncio base64 bisect calendar collections concurrent.futures configparser "
    "contextlib copy csv dataclasses datetime decimal difflib doctest enum filecmp fnmatch fractions "
    "functools getopt glob gzip hashlib heapq html http.client inspect io itertools json locale logging "
    "math multiprocessing operator os pathlib pickle platform pprint queue random re secrets shlex shutil "
    "signal socket sqlite3 statistics string struct subprocess sys tarfile tempfile textwrap threading "
    "time timeit traceback types typing unittest urllib.request uuid warnings weakref "
    "xml.etree.ElementTree zipfile"
).split()


def documentation(modules: Sequence[str] = DOCUMENTED_MODULES) -> list[tuple[str, str]]:
    """`render_documentation(modules)`, run in a fresh interpreter.

    Rendered in this process, the text would depend on what the process had imported and patched (a
    library that replaces `sys.excepthook` removes it from `sys`'s functions), so the default datastore
    would differ between a server and a test run. A fresh interpreter imports nothing but the stdlib.
    """
    code = "import json, sys; from ttserve.stdlib_corpus import render_documentation as r; json.dump(r(sys.argv[1:]), sys.stdout)"
    result = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"rendering the standard library's documentation failed:\n{result.stderr[-2000:]}")
    return [(name, text) for name, text in json.loads(result.stdout)]


def render_documentation(modules: Sequence[str]) -> list[tuple[str, str]]:
    """(qualified name, text): each module's docstring, then one section per public class and function.

    Every entry starts with its qualified name and signature (`pathlib.Path.read_text(self, encoding=None,
    errors=None)`), so a piece of a long class, once the datastore splits it, still says what it documents;
    pydoc's own page, by contrast, repeats inherited members under every class and loses the class name a
    few lines in. Public names are the module's `__all__`, else its names not starting with "_" that it
    defines itself; a module this Python was built without is left out.
    """
    import importlib

    sections = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        sections.append((name, f"Module {name}\n\n{_docstring(module)}".rstrip()))
        exported = getattr(module, "__all__", None)
        for member in sorted(set(exported or dir(module))):
            value = getattr(module, member, None)
            if member.startswith("_") or value is None or inspect.ismodule(value):
                continue
            if exported is None and getattr(value, "__module__", None) != name:
                continue  # imported from elsewhere
            qualified = f"{name}.{member}"
            if inspect.isclass(value):
                sections.append((qualified, _class_section(qualified, value)))
            elif callable(value):
                sections.append((qualified, _entry(qualified, value)))
    return sections


def _class_section(qualified: str, cls: type) -> str:
    parts = [f"class {_entry(qualified, cls)}"]
    for attribute, value in sorted(vars(cls).items()):  # defined here, not inherited
        if attribute.startswith("_") and attribute != "__init__":
            continue
        if isinstance(value, property):
            doc = _docstring(value)
            parts.append(f"{qualified}.{attribute} (property)" + (f"\n    {_indent(doc)}" if doc else ""))
        elif callable(function := getattr(value, "__func__", value)):
            parts.append(_entry(f"{qualified}.{attribute}", function))
    return "\n\n".join(parts)


def _entry(qualified: str, value: object) -> str:
    try:
        # Defaults that are bare objects print their address, which differs in every process.
        signature = re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(value)))
    except (TypeError, ValueError):  # some builtins have none
        signature = "(...)"
    doc = _docstring(value)
    return f"{qualified}{signature}" + (f"\n    {_indent(doc)}" if doc else "")


def _docstring(value: object) -> str:
    """The object's own docstring, dedented (inspect.getdoc would fall back to its base class's)."""
    doc = getattr(value, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _indent(text: str) -> str:
    return text.replace("\n", "\n    ")
