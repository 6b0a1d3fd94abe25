"""Sharded datastores: the layout and its atomic writing, the exact merge (picks equal the unsharded store's),
degraded answers when shards fail or time out, routing texts to their shards, and the CLI commands.

Most tests use synthetic unit vectors written through ttserve's own datastore code (fast, and with exact
duplicate rows placed on purpose); the CLI tests use the real embedder on the eight-topic corpus.
"""

from __future__ import annotations

import json
import threading

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from ttserve import __version__
from ttserve.cli import app
from ttserve.config import DatastoreConfig, RetrievalConfig, Settings
from ttserve.datastore import (
    Datastore,
    LocalShard,
    ShardedDatastore,
    ShardHits,
    ShardsManifest,
    ShardsUnavailableError,
    build_datastore,
    faiss_index,
    is_sharded,
    open_datastore,
    shard_datastore,
)
from ttserve.datastore import build as build_module
from ttserve.datastore.build import add_to_index
from ttserve.datastore.docstore import DocStoreWriter, StoredSequence
from ttserve.datastore.manifest import (
    DOCSTORE_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    Counts,
    EmbedderInfo,
    IndexInfo,
    Manifest,
    SplitterInfo,
)
from ttserve.retrieval import Retriever

SIZE, DIM, CHUNKS = 600, 24, 3  # 200 synthetic documents of 3 chunks each


class SyntheticEmbedder:
    """Only what Retriever checks: queries arrive as embeddings."""

    name = "synthetic"


def clustered_with_duplicates(rng: np.random.Generator) -> np.ndarray:
    """Unit vectors in 12 clusters; 15 rows are each copied onto 12 random rows (exact duplicates, which
    land on both sides of shard boundaries and tie at the K-th place of many queries)."""
    centers = rng.normal(size=(12, DIM))
    vectors = centers[rng.integers(0, 12, SIZE)] + 0.6 * rng.normal(size=(SIZE, DIM))
    for row in rng.integers(0, SIZE, 15):
        vectors[rng.choice(SIZE, 12, replace=False)] = vectors[row]
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_datastore(path, vectors, kind, config, dtype="float32"):
    """A datastore of these vectors, written as `build_datastore` writes one."""
    n, d = vectors.shape
    path.mkdir(parents=True)
    stored = vectors.astype(dtype)
    stored.tofile(path / EMBEDDINGS_FILE)
    index = faiss_index.new_index(kind, d, n, config)
    faiss_index.train_if_needed(index, stored)
    add_to_index(index, stored, 0, progress=False)
    faiss_index.write_index(index, path / INDEX_FILE)
    writer = DocStoreWriter(path / DOCSTORE_FILE)
    writer.add(
        StoredSequence(i, f"doc-{i // CHUNKS}", i % CHUNKS, f"text {i}", "synthetic", {"row": i})
        for i in range(n)
    )
    writer.commit()
    Manifest(
        ttserve_version=__version__,
        embedder=EmbedderInfo(model="synthetic", dimension=d, max_seq_length=512),
        splitter=SplitterInfo(tokenizer="synthetic", chunk_tokens=512),
        index=IndexInfo(
            type=kind,
            hnsw_m=config.hnsw_m if kind == "hnsw" else None,
            ivf_nlist=faiss_index.ivf_nlist(index),
        ),
        embedding_dtype=dtype,
        counts=Counts(documents=n // CHUNKS, sequences=n),
    ).write(path)
    return path


# nprobe 2 of 8 lists: IVF really is approximate here, so sharded == unsharded is not flat's exactness again.
CONFIG = DatastoreConfig(path="unused", ivf_nlist=8, ivf_nprobe=2, hnsw_m=8, use_gpu="never")


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered_with_duplicates(np.random.default_rng(0))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, vectors):
    """Whole datastores by index type, and each cut into 3 shards."""
    root = tmp_path_factory.mktemp("stores")
    paths = {}
    for kind in ("flat", "ivf", "hnsw"):
        write_datastore(root / kind, vectors, kind, CONFIG)
        shard_datastore(root / kind, root / f"{kind}-3", 3, progress=False)
        paths[kind], paths[f"{kind}-3"] = root / kind, root / f"{kind}-3"
    return paths


def retriever(path) -> Retriever:
    datastore = open_datastore(path, CONFIG, "synthetic")
    return Retriever(datastore, SyntheticEmbedder(), RetrievalConfig(lam=0.1))  # type: ignore[arg-type]


def queries(vectors, count, seed=1):
    """Noisy copies of stored rows (many near a duplicated row) and unrelated directions."""
    rng = np.random.default_rng(seed)
    near = vectors[rng.integers(0, SIZE, count)] + 0.3 * rng.normal(size=(count, DIM))
    anywhere = rng.normal(size=(count // 4, DIM))
    return np.concatenate([near, anywhere]).astype(np.float32)


def brute_force_top(vectors, query, k):
    """The top-k by |inner product|, ties to the lower id, computed the way Faiss computes the scores."""
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors)
    scores, ids = index.search(query[None, :], SIZE)
    signed = np.empty(SIZE, dtype=np.float32)
    signed[ids[0]] = scores[0]
    return np.lexsort((np.arange(SIZE), -np.abs(signed)))[:k], signed


def test_search_breaks_ties_by_id(vectors):
    """Faiss fills a tied K-th place with an arbitrary few of the tied rows; search_abs gives it to the
    lowest ids, whatever the index holds around them."""
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors)
    tied_at_k = 0
    for query in queries(vectors, 40):
        for k in (5, 20, 60):
            expected, signed = brute_force_top(vectors, query, k)
            ids, scores = faiss_index.search_abs(index, query, k)
            np.testing.assert_array_equal(ids, expected)
            np.testing.assert_array_equal(scores, signed[expected])
            tied_at_k += abs(signed[expected[-1]]) in np.abs(np.delete(signed, expected))
    assert tied_at_k >= 5  # the duplicates really did tie at the K-th place


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("strategy", ["sift", "knn"])
def test_sharded_picks_equal_unsharded(stores, vectors, kind, strategy):
    whole, sharded = retriever(stores[kind]), retriever(stores[f"{kind}-3"])
    assert isinstance(sharded.datastore, ShardedDatastore) and isinstance(whole.datastore, Datastore)
    for query in queries(vectors, 40, seed=2):
        for k in (5, 20, 60):
            expected = whole.retrieve_embeddings(query, n=10, k=k, strategy=strategy)
            got = sharded.retrieve_embeddings(query, n=10, k=k, strategy=strategy)
            assert got.ids == expected.ids and got.candidates == expected.candidates
            np.testing.assert_array_equal(got.variances, expected.variances)
            assert got.texts == expected.texts and got.degraded is None


def test_ivf_shards_merge_to_the_unsharded_approximation(stores, vectors):
    """IVF shards share the source's quantizer and lists: their merged candidates are the unsharded IVF
    search's, including where that search misses flat's exact top-K."""
    flat, ivf, sharded = (
        open_datastore(stores[name], CONFIG, "synthetic") for name in ("flat", "ivf", "ivf-3")
    )
    missed = 0
    for query in queries(vectors, 40, seed=3):
        expected = ivf.candidates(query, 20)
        got = sharded.candidates(query, 20)
        np.testing.assert_array_equal(got.ids, expected.ids)
        np.testing.assert_array_equal(got.scores, expected.scores)
        np.testing.assert_array_equal(got.vectors, expected.vectors)
        missed += not np.array_equal(flat.candidates(query, 20).ids, expected.ids)
    assert missed > 0  # nprobe 2 of 8 lists is approximate: the equality above is not flat's again


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_one_shard_equals_unsharded(stores, vectors, tmp_path, kind):
    shard_datastore(stores[kind], tmp_path / "one", 1, progress=False)
    whole, sharded = retriever(stores[kind]), retriever(tmp_path / "one")
    for query in queries(vectors, 10, seed=4):
        expected, got = (
            whole.retrieve_embeddings(query, n=8, k=30),
            sharded.retrieve_embeddings(query, n=8, k=30),
        )
        assert got.ids == expected.ids
        np.testing.assert_array_equal(got.variances, expected.variances)


def test_hnsw_shards_open_and_answer(stores, vectors):
    """HNSW shards get graphs of their own (approximate, so only close to the exact answers)."""
    root = ShardsManifest.read(stores["hnsw-3"])
    assert [Manifest.read(stores["hnsw-3"] / s.name).index.hnsw_m for s in root.shards] == [8, 8, 8]
    flat, sharded = retriever(stores["flat"]), retriever(stores["hnsw-3"])
    recall = []
    for query in queries(vectors, 20, seed=5):
        result = sharded.retrieve_embeddings(query, n=8, k=20)
        assert len(result.ids) == 8 and result.candidates == 20 and all(0 <= i < SIZE for i in result.ids)
        exact = flat.datastore.candidates(query, 20).ids
        recall.append(len(set(exact) & set(sharded.datastore.candidates(query, 20).ids)) / 20)
    assert np.mean(recall) >= 0.8


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layout(tmp_path, vectors, dtype):
    source = write_datastore(tmp_path / "ds", vectors, "flat", CONFIG, dtype)
    root = shard_datastore(source, tmp_path / "sharded", 4, progress=False)
    assert is_sharded(tmp_path / "sharded") and not is_sharded(source)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "shard-000",
        "shard-001",
        "shard-002",
        "shard-003",
        "shards.json",
    ]
    assert ShardsManifest.read(tmp_path / "sharded") == root and root.datastore == Manifest.read(source)
    assert [(s.first_id, s.sequences) for s in root.shards] == [(0, 150), (150, 150), (300, 150), (450, 150)]
    whole = Datastore(source)
    documents = 0
    for shard in root.shards:
        part = Datastore(tmp_path / "sharded" / shard.name)  # each shard is an ordinary datastore
        assert part.manifest.embedding_dtype == dtype and len(part) == shard.sequences
        rows = np.arange(shard.sequences)
        np.testing.assert_array_equal(part.vectors(rows), whole.vectors(rows + shard.first_id))
        texts = part.sequences(rows)
        assert [s.id for s in texts] == list(rows)  # local ids
        assert [s.text for s in texts] == [f"text {i}" for i in rows + shard.first_id]
        documents += part.manifest.counts.documents
    assert documents == whole.manifest.counts.documents  # a document counts in the shard where it starts


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".building-" in p.name or ".old-" in p.name)


def test_sharding_is_atomic(tmp_path, vectors, monkeypatch):
    source = write_datastore(tmp_path / "ds", vectors, "ivf", CONFIG)
    written = []

    def write_then_fail(index, path):
        if written:
            raise OSError("disk full")
        written.append(path)
        faiss.write_index(index, str(path))

    monkeypatch.setattr(faiss_index, "write_index", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        shard_datastore(source, tmp_path / "sharded", 3, progress=False)
    assert len(written) == 1  # it failed on the second shard, after writing the first
    assert not (tmp_path / "sharded").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()

    shard_datastore(source, tmp_path / "sharded", 3, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        shard_datastore(source, tmp_path / "sharded", 2, progress=False)
    assert len(ShardsManifest.read(tmp_path / "sharded").shards) == 3
    shard_datastore(source, tmp_path / "sharded", 2, overwrite=True, progress=False)
    assert len(ShardsManifest.read(tmp_path / "sharded").shards) == 2 and leftovers(tmp_path) == []


def test_sharding_errors(tmp_path, stores):
    with pytest.raises(ValueError, match="at least 1"):
        shard_datastore(stores["flat"], tmp_path / "a", 0)
    with pytest.raises(ValueError, match="cannot cut 600 sequences into 601 shards"):
        shard_datastore(stores["flat"], tmp_path / "a", 601)
    with pytest.raises(FileNotFoundError, match="not a ttserve datastore"):
        shard_datastore(tmp_path, tmp_path / "a", 2)
    with pytest.raises(ValueError, match="is a sharded datastore"):
        shard_datastore(stores["flat-3"], tmp_path / "a", 2)
    with pytest.raises(ValueError, match="new directory"):
        shard_datastore(stores["flat"], stores["flat"], 2, overwrite=True)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="is a sharded datastore"):
        Datastore(stores["flat-3"])


class FailingShard:
    def __init__(self, inner, error):
        self.inner, self.error = inner, error

    def search(self, query, k):
        raise self.error

    def sequences(self, ids):
        return self.inner.sequences(ids)


class HangingShard(FailingShard):
    """Answers only when released: a shard that misses its deadline."""

    def __init__(self, inner):
        super().__init__(inner, None)
        self.release = threading.Event()

    def search(self, query, k):
        self.release.wait(30)
        return self.inner.search(query, k)


class StrayShard(FailingShard):
    """Answers with ids outside its range (the wrong shard behind a handle, say)."""

    def search(self, query, k):
        hits = self.inner.search(query, k)
        return ShardHits(hits.ids + 10_000, hits.scores, hits.vectors)


def local_shards(path):
    root = ShardsManifest.read(path)
    return root, [LocalShard(path / s.name, s.first_id, CONFIG) for s in root.shards]


def test_failed_and_late_shards_degrade_the_answer(stores, vectors):
    root, shards = local_shards(stores["flat-3"])
    hanging = HangingShard(shards[2])
    clients = [shards[0], FailingShard(shards[1], RuntimeError("disk gone")), hanging]
    degraded = ShardedDatastore(root, clients, timeout_s=0.3)
    only_first = ShardedDatastore(
        root, [shards[0], FailingShard(shards[1], OSError()), FailingShard(shards[2], OSError())]
    )
    try:
        for query in queries(vectors, 5, seed=6):
            found = degraded.candidates(query, 20)
            assert [(f.name, f.error.split(":")[0]) for f in found.failures] == [
                ("shard-001", "RuntimeError"),
                ("shard-002", "TimeoutError"),
            ]
            assert found.degraded == (
                "shard-001 failed (RuntimeError: disk gone); shard-002 failed (TimeoutError: no answer "
                "within 0.3 s); candidates from 1 of 3 shards, 200 of 600 sequences"
            )
            # What is left is the first shard's own top-K.
            np.testing.assert_array_equal(found.ids, only_first.candidates(query, 20).ids)
            assert np.all(found.ids < 200)
        result = Retriever(degraded, SyntheticEmbedder()).retrieve_embeddings(query, n=5, k=20)  # type: ignore[arg-type]
        assert len(result.ids) == 5 and result.degraded == found.degraded
    finally:
        hanging.release.set()


def test_a_shard_answering_outside_its_range_is_a_failure(stores, vectors):
    root, shards = local_shards(stores["flat-3"])
    found = ShardedDatastore(root, [shards[0], StrayShard(shards[1], None), shards[2]]).candidates(
        vectors[0], 10
    )
    assert [f.name for f in found.failures] == [
        "shard-001"
    ] and "outside its range 200..399" in found.degraded


def test_all_shards_failing_is_an_error(stores, vectors):
    root, shards = local_shards(stores["flat-3"])
    clients = [FailingShard(s, ConnectionError("replica died")) for s in shards]
    with pytest.raises(ShardsUnavailableError, match="shard-000 \\(ConnectionError: replica died\\)"):
        ShardedDatastore(root, clients).candidates(vectors[0], 10)


def test_sequences_come_from_their_shards_in_order(stores):
    whole, sharded = Datastore(stores["flat"]), open_datastore(stores["flat-3"], CONFIG)
    ids = [599, 0, 200, 199, 200, 401, 5]  # every shard, both sides of each boundary, a repeat
    assert sharded.sequences(ids) == whole.sequences(ids)  # global ids, texts, metadata
    assert [s.text for s in sharded.sequences(np.array(ids))] == [f"text {i}" for i in ids]
    with pytest.raises(KeyError, match="600"):
        sharded.sequences([3, 600])


def test_evaluation_reads_a_sharded_datastore(stores):
    from ttserve.evaluation import exact_copies, sample_documents

    whole, sharded = Datastore(stores["flat"]), open_datastore(stores["flat-3"], CONFIG)
    assert len(sharded) == len(whole) == SIZE
    assert sample_documents(sharded, 30, seed=1) == sample_documents(whole, 30, seed=1)
    assert exact_copies(sharded) == exact_copies(whole)


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def session_embedder(monkeypatch, memo_embedder):
    """The CLI's builds and retrievals use the session's embedder instead of loading their own."""
    from ttserve import retrieval

    monkeypatch.setattr(build_module, "Embedder", lambda config: memo_embedder)
    monkeypatch.setattr(retrieval, "Embedder", lambda config: memo_embedder)
    return memo_embedder


def build_corpus(corpus, out, embedder):
    build_datastore([corpus], out, Settings(datastore=DatastoreConfig(path=out)), embedder, progress=False)
    return out


def test_cli_shard_info_and_retrieve(tmp_path, small_corpus, session_embedder):
    whole, sharded = tmp_path / "ds", tmp_path / "sharded"
    build_corpus(small_corpus, whole, session_embedder)
    result = invoke("index", "shard", whole, sharded, "--shards", "3", "--quiet")
    assert result.exit_code == 0, result.output
    assert "24 documents, 24 sequences (flat index" in result.output and "3 shards (8, 8, 8)" in result.output

    info = json.loads(invoke("index", "info", sharded).output)
    assert [s["first_id"] for s in info["shards"]] == [0, 8, 16]
    assert info["datastore"]["counts"]["sequences"] == 24

    for prompt in ("How does Faiss search an inverted file index?", "bake bread and weather tomorrow"):
        picks = [
            json.loads(invoke("retrieve", path, prompt, "--n", "6", "--json").output)["picks"]
            for path in (whole, sharded)
        ]
        assert picks[0] == picks[1] and len(picks[0]) == 6

    failed = invoke("index", "add", sharded, "--corpus", small_corpus)
    assert failed.exit_code == 2 and "is a sharded datastore" in failed.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("index", "shard", "{ds}", "{tmp}/out", "--shards", "0"), "at least 1"),
        (("index", "shard", "{ds}", "{tmp}/out", "--shards", "25"), "cannot cut 24 sequences into 25"),
        (("index", "shard", "{tmp}", "{tmp}/out", "--shards", "2"), "not a ttserve datastore"),
        (("index", "shard", "{ds}", "{ds}", "--shards", "2"), "already exists"),
        (("index", "build", "--corpus", "{corpus}", "--out", "{tmp}/out", "--shards", "0"), "at least 1"),
        (("index", "build", "--corpus", "{corpus}", "--out", "{tmp}/out", "--shards", "25"), "cannot cut"),
    ],
)
def test_cli_shard_errors(tmp_path, small_corpus, session_embedder, args, message):
    ds = build_corpus(small_corpus, tmp_path / "ds", session_embedder)
    values = {"ds": ds, "tmp": tmp_path, "corpus": small_corpus}
    result = invoke(*(a.format(**values) for a in args))
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_build_sharded(tmp_path, small_corpus, session_embedder):
    out = tmp_path / "sharded"
    result = invoke("index", "build", "--corpus", small_corpus, "--out", out, "--shards", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "24 documents, 24 sequences (flat index" in result.output and "in 2 shards" in result.output
    # Only the shards and their root manifest: no unsharded copy, no staging directory.
    assert sorted(p.name for p in out.iterdir()) == ["shard-000", "shard-001", "shards.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]
    text = invoke("retrieve", out, "What does a LoRA adapter change?", "--n", "2", "--strategy", "knn")
    assert text.exit_code == 0 and "lora-" in text.output and "degraded" not in text.output
    again = invoke("index", "build", "--corpus", small_corpus, "--out", out, "--shards", "3", "--quiet")
    assert again.exit_code == 2 and "already exists" in again.output
    replaced = invoke(
        "index", "build", "--corpus", small_corpus, "--out", out, "--shards", "3", "--overwrite", "--quiet"
    )
    assert replaced.exit_code == 0 and len(ShardsManifest.read(out).shards) == 3
