"""The stdlib corpus's two halves: the default datastore's modules and the tiny model's pretraining files."""

from __future__ import annotations

from pathlib import Path

import pytest

from ttserve.stdlib_corpus import (
    DATASTORE_MAX_FILE_BYTES,
    EXCLUDED_DIRS,
    GENERATED_DIRS,
    datastore_files,
    pretraining_files,
    stdlib_root,
)


def test_the_installed_stdlibs_halves_share_no_file():
    # Uncapped, so that no budget hides an overlap the default selection happens to avoid.
    datastore = {p.resolve() for p in datastore_files(max_bytes=2**62)}
    pretraining = {p.resolve() for p in pretraining_files()}
    assert datastore and pretraining
    assert not datastore & pretraining
    assert set(datastore_files()) <= {p for p in datastore_files(max_bytes=2**62)}
    root = stdlib_root()
    assert all(p.parent == root for p in datastore_files(max_bytes=2**62))
    assert all(p.parent != root and root in p.parents for p in pretraining_files())


def _write(path: Path, size: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x" * size)


def test_each_half_takes_only_its_own_files(tmp_path):
    kept_modules = ["argparse.py", "shlex.py"]
    kept_packages = ["email/parser.py", "json/__init__.py", "json/decoder.py"]
    left_out = [
        "_private.py",  # private modules
        "this.py",  # a joke
        "huge.py",  # over DATASTORE_MAX_FILE_BYTES
        "README.txt",  # not Python
        "json/tests/test_json.py",  # tests
        "idlelib/editor.py",  # GUI code
        "site-packages/vendored/mod.py",  # installed packages
        "encodings/cp1252.py",  # generated tables
        "config-3.11-x86_64-linux-gnu/python-config.py",  # build configuration
    ]
    for name in kept_modules + kept_packages + left_out:
        _write(tmp_path / name, DATASTORE_MAX_FILE_BYTES + 1 if name == "huge.py" else 100)

    assert datastore_files(root=tmp_path) == [tmp_path / n for n in kept_modules]
    assert pretraining_files(root=tmp_path) == [tmp_path / n for n in kept_packages]
    assert {"idlelib", "site-packages"} <= EXCLUDED_DIRS and "encodings" in GENERATED_DIRS


def test_byte_caps_take_files_in_path_order_while_they_fit(tmp_path):
    for name, size in [
        ("a.py", 300),
        ("b.py", 500),
        ("c.py", 200),
        ("p/a.py", 300),
        ("p/b.py", 500),
        ("p/c.py", 200),
    ]:
        _write(tmp_path / name, size)
    assert datastore_files(600, tmp_path) == [tmp_path / "a.py", tmp_path / "c.py"]
    assert pretraining_files(600, tmp_path) == [tmp_path / "p/a.py", tmp_path / "p/c.py"]


def test_the_documentation_names_every_entry():
    from ttserve.stdlib_corpus import documentation

    sections = dict(documentation())
    assert {"pathlib", "pathlib.Path", "json.dumps", "argparse.ArgumentParser"} <= set(sections)
    path = sections["pathlib.Path"]
    assert (
        path.startswith("class pathlib.Path(")
        and "\npathlib.Path.read_text(self, encoding=None, errors=None)\n" in path
    )
    assert "Open the file in text mode, read it, and close the file." in path
    assert (
        "pathlib.Path.__repr__" not in path and "pathlib.Path.joinpath" not in path
    )  # inherited: PurePath's
    assert "\npathlib.PurePath.joinpath(self, *args)" in sections["pathlib.PurePath"]
    assert sections["json.dumps"].startswith("json.dumps(obj, *, skipkeys=False")
    assert sections["os.walk"].startswith("os.walk(top, topdown=True")  # os exports what posix defines
    assert documentation(["getopt", "no_such_module_here"]) == [
        (name, text) for name, text in documentation() if name == "getopt" or name.startswith("getopt.")
    ]  # stable, and a missing module is left out


def test_the_documentation_is_the_same_whatever_this_process_imported_or_patched(monkeypatch):
    """The default datastore must not depend on the process that builds it: a library that replaces
    `sys.excepthook` (several do) used to drop it from the corpus, and object addresses in signatures
    (`interpolation=<object object at 0x...>`) changed the text in every process."""
    import sys

    from ttserve.stdlib_corpus import documentation

    before = documentation(["sys", "configparser"])
    monkeypatch.setattr(sys, "excepthook", lambda *args: None)
    after = documentation(["sys", "configparser"])
    assert after == before and "sys.excepthook" in dict(after)
    assert not any(" at 0x" in text for _, text in after)
    assert "interpolation=<object object>" in dict(after)["configparser.ConfigParser"]


def test_a_documentation_render_that_fails_says_so(monkeypatch):
    import sys

    from ttserve.stdlib_corpus import documentation

    monkeypatch.setattr(sys, "executable", "/bin/false")  # an interpreter that fails at once
    with pytest.raises(RuntimeError, match="rendering the standard library's documentation failed"):
        documentation(["json"])


def test_builtin_corpora_read_by_name():
    from ttserve.datastore import read_corpus
    from ttserve.datastore.sources import ReadStats
    from ttserve.stdlib_corpus import datastore_files, documentation

    stats = ReadStats()
    docs = list(read_corpus(["stdlib:docs"], stats))
    assert [d.id for d in docs] == [name for name, _ in documentation()] and stats.documents == len(docs)
    assert docs[0].source == "stdlib:docs" and docs[0].id == "abc"
    sources = list(read_corpus(["stdlib:sources"]))
    assert [d.id for d in sources] == [p.name for p in datastore_files()]
