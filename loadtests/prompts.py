"""The prompts a load test draws from: the built-in 20, a few hundred generated from the standard library, or
a file.

Repeated prompts reuse adapters (the cache is keyed by what retrieval selects), so a run that should train
fresh adapters needs many distinct prompts: `stdlib` asks "What does `json.dumps` do?" of the public
functions and classes of well-known standard-library modules, in the same order on every machine with the
same Python version.
"""

from __future__ import annotations

import importlib
import inspect
import json
from itertools import zip_longest
from pathlib import Path

BUILTIN = "builtin"
STDLIB = "stdlib"

DEFAULT_PROMPTS = [
    "What does functools.lru_cache do, and when should I use it?",
    "Write a Python function that parses command line options with getopt.",
    "How do I read a CSV file with the csv module and skip the header row?",
    "Explain the difference between a list and a tuple in Python.",
    "Show how to use contextlib.contextmanager to time a block of code.",
    "How does asyncio.gather differ from asyncio.wait?",
    "Write a regular expression that matches an ISO 8601 date.",
    "What is the purpose of __slots__ in a Python class?",
    "How do I walk a directory tree with pathlib and list every .py file?",
    "Explain what a dataclass is and show a small example.",
    "How can I serialize a datetime object to JSON?",
    "Write a generator that yields the Fibonacci numbers.",
    "What does the GIL mean for multithreaded Python programs?",
    "How do I make an HTTP GET request with urllib.request?",
    "Summarise what the itertools.groupby function does.",
    "Write a function that merges two sorted lists into one sorted list.",
    "How do I use the logging module to write messages to a file?",
    "Explain how heapq can be used as a priority queue.",
    "Give a short explanation of how hash tables handle collisions.",
    "Write a haiku about a program that learns while it answers.",
]

# Modules people ask a Python assistant about, whose import has no side effects.
STDLIB_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
    "html", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "operator", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "secrets", "shlex", "shutil", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "traceback", "typing", "unicodedata", "urllib.parse", "uuid", "warnings",
    "weakref", "zipfile", "zlib",
)  # fmt: skip


def stdlib_prompts(count: int | None = None) -> list[str]:
    """'What does `module.name` do?' for public functions and classes, taking one name per module in turn
    (so the first `count` cover many modules), each module's names in alphabetical order."""
    per_module = [
        [f"What does `{module}.{name}` do?" for name in _public_names(module)] for module in STDLIB_MODULES
    ]
    prompts = [p for turn in zip_longest(*per_module) for p in turn if p is not None]
    return prompts[:count] if count is not None else prompts


def _public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    return sorted(
        name
        for name in set(names)
        if not name.startswith("_")
        and (inspect.isroutine(getattr(module, name, None)) or inspect.isclass(getattr(module, name, None)))
    )


def load_prompts(path: Path) -> list[str]:
    """One prompt per line: a JSON string (for prompts with newlines) or plain text. Blank lines skipped."""
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith('"'):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, str):
                if value.strip():
                    prompts.append(value)
                continue
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def prompt_source(spec: str) -> list[str]:
    """`builtin`, `stdlib` (all of them), `stdlib:N` (the first N), or the path of a prompts file."""
    if spec in ("", BUILTIN):
        return DEFAULT_PROMPTS
    name, _, count = spec.partition(":")
    if name == STDLIB:
        if count and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"bad prompt count in {spec!r}: stdlib:N with N a positive integer")
        return stdlib_prompts(int(count) if count else None)
    return load_prompts(Path(spec))
