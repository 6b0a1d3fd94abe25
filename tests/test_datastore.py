"""Datastore build / load / add round trips, bad input, and the interrupted-build guarantee."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_jsonl
from ttserve.config import DatastoreConfig, EmbedderConfig, Settings
from ttserve.datastore import (
    CorpusError,
    Datastore,
    EmbedderMismatchError,
    Manifest,
    add_to_datastore,
    build_datastore,
)
from ttserve.datastore import build as build_module
from ttserve.datastore.faiss_index import search_abs


def build(corpus, out, embedder, **datastore):
    settings = Settings(datastore=DatastoreConfig(path=out, **datastore))
    return build_datastore(
        corpus if isinstance(corpus, list) else [corpus], out, settings, embedder, progress=False
    )


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".building-" in p.name or ".old-" in p.name)


def test_jsonl_round_trip(tmp_path, small_corpus, embedder):
    out = tmp_path / "ds"
    manifest = build(small_corpus, out, embedder)
    assert manifest.counts.documents == 24 and manifest.counts.sequences == 24
    assert manifest.embedder.model == embedder.name and manifest.embedder.dimension == 384

    store = Datastore(out, embedder=EmbedderConfig())
    assert len(store) == 24 and store.index.ntotal == 24
    sequences = store.sequences([0, 5, 0])
    assert [s.id for s in sequences] == [0, 5, 0]
    records = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    assert sequences[1].doc_id == records[5]["id"] and sequences[1].text == records[5]["text"]
    assert sequences[1].metadata == {"topic": records[5]["topic"]}
    # Stored vectors are the embedder's normalised embeddings of the stored text.
    expected = embedder.encode([records[i]["text"] for i in (0, 5)])
    np.testing.assert_allclose(store.vectors(np.array([0, 5])), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(store.vectors(np.arange(24)), axis=1), 1.0, atol=1e-5)
    assert Manifest.read(out) == manifest


def test_text_directories_and_parquet(tmp_path, embedder):
    docs = tmp_path / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "intro.md").write_text("# Intro\nttserve fine-tunes at test time.")
    (docs / "guide" / "usage.txt").write_text("Run make run to start the server.")
    (docs / "image.png").write_bytes(b"\x89PNG not text")
    table = pa.table(
        {"id": ["p1", "p2"], "text": ["parquet row one", "parquet row two"], "lang": ["en", "de"]}
    )
    pq.write_table(table, tmp_path / "rows.parquet")

    manifest = build([docs, tmp_path / "rows.parquet"], tmp_path / "ds", embedder)
    assert manifest.counts.documents == 4
    stored = Datastore(tmp_path / "ds").sequences(range(4))
    assert [s.doc_id for s in stored] == ["guide/usage.txt", "intro.md", "p1", "p2"]
    assert stored[1].text == "# Intro\nttserve fine-tunes at test time."
    assert stored[3].metadata == {"lang": "de"}


def test_long_documents_split_into_whole_sequences(tmp_path, embedder):
    long_text = " ".join(f"sentence {i} talks about vectors and adapters." for i in range(300))
    manifest = build(
        write_jsonl(tmp_path / "long.jsonl", [{"id": "long", "text": long_text}]),
        tmp_path / "ds",
        embedder,
        chunk_tokens=64,
    )
    store = Datastore(tmp_path / "ds")
    chunks = store.sequences(range(manifest.counts.sequences))
    assert manifest.counts.documents == 1 and len(chunks) > 10
    assert [c.chunk for c in chunks] == list(range(len(chunks))) and {c.doc_id for c in chunks} == {"long"}
    assert "".join(c.text for c in chunks) == long_text
    assert all(len(embedder.tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 64 for c in chunks)
    assert manifest.splitter.chunk_tokens == 64


def test_duplicates_are_kept(tmp_path, embedder):
    records = [{"text": "the same document"}] * 20 + [{"text": "another one"}]
    manifest = build(write_jsonl(tmp_path / "dup.jsonl", records), tmp_path / "ds", embedder)
    assert manifest.counts.sequences == 21


def test_add_appends_and_keeps_existing_ids(tmp_path, small_corpus, embedder):
    out = tmp_path / "ds"
    build(small_corpus, out, embedder)
    before = Datastore(out).sequences(range(24))
    extra = write_jsonl(
        tmp_path / "extra.jsonl",
        [{"id": "new-1", "text": "Adapters are cached by content hash."}, {"text": ""}],
    )
    manifest = add_to_datastore(out, [extra], Settings(), embedder, progress=False)
    assert (
        manifest.counts.documents == 25
        and manifest.counts.sequences == 25
        and manifest.counts.skipped_empty == 1
    )
    assert manifest.sources == [str(small_corpus), str(extra)]
    store = Datastore(out)
    assert store.index.ntotal == 25 and store.sequences(range(24)) == before
    assert store.sequences([24])[0].doc_id == "new-1"
    hits, _ = store.search(embedder.encode(["Adapters are cached by content hash."])[0], 1)
    assert hits[0] == 24
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "fine"}\n{"text": oops}\n', r"bad\.jsonl:2: malformed JSON"),
        (b'{"text": "fine"}\n\n{"title": "no text"}\n', r"bad\.jsonl:3: missing required field 'text'"),
        (b'{"text": 42}\n', r"bad\.jsonl:1: field 'text' must be a string"),
        (b'["a", "list"]\n', r"bad\.jsonl:1: expected a JSON object"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: invalid UTF-8 at byte 13 of the line"),
    ],
)
def test_bad_jsonl_fails_with_location_and_writes_nothing(tmp_path, embedder, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        build(bad, tmp_path / "ds", embedder)
    assert not (tmp_path / "ds").exists() and leftovers(tmp_path) == []


def test_invalid_utf8_can_be_skipped_and_counted(tmp_path, embedder):
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_bytes(b'{"text": "good one"}\n{"text": "caf\xe9"}\n{"text": "good two"}\n')
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "a.txt").write_bytes(b"fine text")
    (text_dir / "b.txt").write_bytes(b"line one\nbroken \xff byte")
    with pytest.raises(CorpusError, match=r"b\.txt:2: invalid UTF-8"):
        build(text_dir, tmp_path / "ds0", embedder)
    settings = Settings(datastore=DatastoreConfig(path=tmp_path / "ds"))
    manifest = build_datastore(
        [corpus, text_dir], tmp_path / "ds", settings, embedder, skip_invalid_utf8=True, progress=False
    )
    assert manifest.counts.documents == 3 and manifest.counts.skipped_invalid_utf8 == 2


def test_empty_texts_are_skipped_and_counted(tmp_path, embedder):
    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"text": "real"}, {"text": ""}, {"text": "  \n"}, {"text": None}]
    )
    assert build(corpus, tmp_path / "ds", embedder).counts.skipped_empty == 3
    only_empty = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}])
    with pytest.raises(CorpusError, match="no non-empty documents"):
        build(only_empty, tmp_path / "ds2", embedder)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("missing.jsonl", None, "no such file"),
        ("data.csv", lambda p: p.write_text("a,b"), "unsupported file type '.csv'"),
        ("empty_dir", lambda p: p.mkdir(), "directory has no text files"),
        (
            "notext.parquet",
            lambda p: pq.write_table(pa.table({"body": ["x"]}), p),
            "missing required column 'text'",
        ),
        ("broken.parquet", lambda p: p.write_bytes(b"not parquet"), "not a readable Parquet file"),
    ],
)
def test_unreadable_sources(tmp_path, embedder, name, make, message):
    path = tmp_path / name
    if make:
        make(path)
    with pytest.raises(CorpusError, match=message):
        build(path, tmp_path / "ds", embedder)
    assert not (tmp_path / "ds").exists()


class InterruptingEmbedder:
    """The real embedder, interrupted (as by Ctrl-C) on its second batch."""

    def __init__(self, inner, error=KeyboardInterrupt):
        self.inner, self.calls, self.error = inner, 0, error

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts, batch_size=None):
        self.calls += 1
        if self.calls == 2:
            raise self.error("interrupted")
        return self.inner.encode(texts, batch_size)


def test_interrupted_build_leaves_nothing(tmp_path, small_corpus, embedder, monkeypatch):
    monkeypatch.setattr(build_module, "EMBED_BLOCK", 5)
    flaky = InterruptingEmbedder(embedder)
    with pytest.raises(KeyboardInterrupt):
        build(small_corpus, tmp_path / "ds", flaky)
    assert flaky.calls == 2
    assert not (tmp_path / "ds").exists() and leftovers(tmp_path) == []


def test_failed_overwrite_and_add_keep_the_previous_datastore(tmp_path, small_corpus, embedder, monkeypatch):
    out = tmp_path / "ds"
    original = build(small_corpus, out, embedder)
    monkeypatch.setattr(build_module, "EMBED_BLOCK", 5)
    settings = Settings(datastore=DatastoreConfig(path=out))
    with pytest.raises(RuntimeError):
        build_datastore(
            [small_corpus, small_corpus],
            out,
            settings,
            InterruptingEmbedder(embedder, RuntimeError),
            overwrite=True,
            progress=False,
        )
    with pytest.raises(RuntimeError):
        add_to_datastore(
            out, [small_corpus], settings, InterruptingEmbedder(embedder, RuntimeError), progress=False
        )
    assert Manifest.read(out) == original and Datastore(out).index.ntotal == 24
    assert leftovers(tmp_path) == []


def test_existing_target_needs_overwrite(tmp_path, small_corpus, embedder):
    out = tmp_path / "ds"
    build(small_corpus, out, embedder)
    with pytest.raises(FileExistsError, match="overwrite"):
        build(small_corpus, out, embedder)
    settings = Settings(datastore=DatastoreConfig(path=out))
    replaced = build_datastore(
        [small_corpus, small_corpus], out, settings, embedder, overwrite=True, progress=False
    )
    assert replaced.counts.sequences == 48 and Datastore(out).index.ntotal == 48
    assert leftovers(tmp_path) == []


def test_embedder_mismatch_is_a_clear_error(tmp_path, small_corpus, embedder):
    out = tmp_path / "ds"
    build(small_corpus, out, embedder)
    with pytest.raises(
        EmbedderMismatchError, match="was embedded with 'sentence-transformers/all-MiniLM-L6-v2'"
    ):
        Datastore(out, embedder=EmbedderConfig(model="BAAI/bge-small-en-v1.5"))
    with pytest.raises(EmbedderMismatchError):
        add_to_datastore(
            out,
            [small_corpus],
            Settings(embedder=EmbedderConfig(model="BAAI/bge-small-en-v1.5")),
            progress=False,
        )


def test_not_a_datastore(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a ttserve datastore"):
        Datastore(tmp_path)


@pytest.mark.parametrize(
    ("index_type", "dtype"), [("hnsw", "float32"), ("ivf", "float16"), ("flat", "float16")]
)
def test_approximate_indexes_and_float16(
    tmp_path, pile_part, pile_datastore, memo_embedder, index_type, dtype
):
    flat = pile_datastore
    other = tmp_path / index_type
    manifest = build(pile_part, other, memo_embedder, index_type=index_type, embedding_dtype=dtype)
    assert manifest.index.type == index_type and manifest.embedding_dtype == dtype
    if index_type == "ivf":
        assert manifest.index.ivf_nlist and manifest.index.ivf_nlist > 1
    exact, approx = Datastore(flat), Datastore(other)
    np.testing.assert_allclose(approx.vectors(np.arange(50)), exact.vectors(np.arange(50)), atol=2e-3)
    queries = exact.vectors(np.arange(0, len(exact), 10))
    recall = np.mean([len(set(exact.search(q, 20)[0]) & set(approx.search(q, 20)[0])) / 20 for q in queries])
    assert recall >= 0.8


def test_pile_sample_round_trip(pile_part, pile_datastore):
    out = pile_datastore
    manifest = Manifest.read(out)
    records = [json.loads(line) for line in pile_part.read_text().splitlines()]
    assert manifest.counts.documents == len(records)
    store = Datastore(out)
    assert manifest.counts.sequences >= len(records) and store.index.ntotal == manifest.counts.sequences
    # Every document is stored whole, split into chunks in order.
    by_doc: dict[str, list] = {}
    for s in store.sequences(range(len(store))):
        by_doc.setdefault(s.doc_id, []).append(s)
    for record in records:
        assert "".join(s.text for s in by_doc[record["id"]]) == record["text"]
    # A stored sequence's own embedding finds itself first.
    for i in (0, 123, len(store) - 1):
        hits, scores = store.search(store.vectors(np.array([i]))[0], 5)
        assert hits[0] == i or scores[0] == pytest.approx(scores[list(hits).index(i)], abs=1e-5)


def test_search_ranks_by_absolute_inner_product():
    rng = np.random.default_rng(0)
    q = rng.normal(size=16).astype(np.float32)
    q /= np.linalg.norm(q)
    noise = rng.normal(size=(50, 16)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    vectors = np.concatenate([noise * 0.1 + 0.0, [-q], [0.9 * q + 0.1 * noise[0]]]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(16)
    index.add(vectors)
    ids, scores = search_abs(index, q, 3)
    assert list(ids[:2]) == [50, 51]  # the anti-correlated vector ranks first
    assert scores[0] == pytest.approx(-1.0, abs=1e-5) and scores[1] > 0.9
    assert len(set(ids)) == len(ids)
    all_ids, all_scores = search_abs(index, q, 100)
    assert sorted(all_ids) == list(range(52))  # k larger than the index: everything, once
    assert np.all(np.diff(np.abs(all_scores)) <= 1e-6)


def test_a_datastore_replaced_on_disk_keeps_answering_as_it_was_opened(tmp_path, small_corpus, memo_embedder):
    """`index build --overwrite` renames a new datastore into place: an open one keeps its own files (a
    thread that opens its first text connection afterwards too), so picks and texts never mix versions."""
    import threading

    from ttserve.config import Settings
    from ttserve.datastore import Datastore, build_datastore
    from ttserve.datastore.docstore import DocStore

    path = tmp_path / "store"
    settings = Settings(datastore={"path": path})
    build_datastore([small_corpus], path, settings, memo_embedder, progress=False)
    store = Datastore(path)
    before = store.sequences([0, 1])
    other = tmp_path / "other.txt"
    other.write_text("completely different text " * 40)
    build_datastore([other], path, settings, memo_embedder, overwrite=True, progress=False)
    assert DocStore(path / "docs.sqlite").get([0])[0].text != before[0].text  # the path names the new one
    seen = []
    thread = threading.Thread(target=lambda: seen.append(store.sequences([0, 1])))
    thread.start()
    thread.join()
    assert seen == [before] and store.sequences([0, 1]) == before


@pytest.mark.parametrize("file", ["embeddings.bin", "docs.sqlite"])
def test_a_datastore_file_changed_in_place_is_a_clear_error_not_wrong_rows(
    tmp_path, small_corpus, memo_embedder, file
):
    from ttserve.config import Settings
    from ttserve.datastore import Datastore, DatastoreChangedError, build_datastore

    path = tmp_path / "store"
    build_datastore([small_corpus], path, Settings(datastore={"path": path}), memo_embedder, progress=False)
    store = Datastore(path)
    query = store.vectors([0])[0]
    with open(path / file, "r+b") as handle:  # truncated in place: a mapped read past the end is a SIGBUS
        handle.truncate(max(0, handle.seek(0, 2) // 2))
    with pytest.raises(DatastoreChangedError, match="changed in place"):
        store.candidates(query, 8)
        store.sequences([0])
