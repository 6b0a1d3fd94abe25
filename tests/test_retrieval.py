"""The Retriever end to end on real embeddings: strategies, duplicates, long prompts, adaptive stop, threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import TOPICS, write_jsonl
from ttserve.config import DatastoreConfig, RetrievalConfig, Settings
from ttserve.datastore import Datastore, build_datastore
from ttserve.retrieval import CALIBRATED_LAMBDA, Retriever


def make_retriever(tmp_path, records, embedder, name="ds"):
    out = tmp_path / name
    corpus = write_jsonl(tmp_path / f"{name}.jsonl", records)
    build_datastore([corpus], out, Settings(datastore=DatastoreConfig(path=out)), embedder, progress=False)
    return Retriever(Datastore(out), embedder, RetrievalConfig())


@pytest.fixture(scope="module")
def topic_retriever(tmp_path_factory, small_corpus, embedder):
    out = tmp_path_factory.mktemp("topics") / "ds"
    build_datastore(
        [small_corpus], out, Settings(datastore=DatastoreConfig(path=out)), embedder, progress=False
    )
    return Retriever(Datastore(out), embedder)


def test_knn_and_sift_find_the_topic(topic_retriever):
    for strategy in ("knn", "sift"):
        result = topic_retriever.retrieve(
            "How does Faiss search an inverted file index of vectors?", n=3, strategy=strategy
        )
        assert len(result.ids) == 3 and result.strategy == strategy
        assert result.sequences[0].metadata["topic"] == "faiss"
        assert result.variances.shape == (4,) and result.variances[0] == pytest.approx(1.0, abs=1e-5)
        assert np.all(np.diff(result.variances) <= 1e-9)
        assert set(result.timings_ms) >= {"embed_ms", "index_ms", "selection_ms", "fetch_ms", "total_ms"}
        assert result.doc_ids == [s.doc_id for s in result.sequences]


RELATED = [
    "An inverted file index partitions vectors into Voronoi cells around k-means centroids.",
    "The nprobe parameter sets how many inverted lists Faiss scans per query.",
    "Product quantization compresses each vector into a short code of sub-quantizer indices.",
    "HNSW builds a layered proximity graph for approximate nearest neighbour search.",
    "Inner product search on normalised vectors is equivalent to cosine similarity search.",
    "A flat index compares the query against every stored vector exactly.",
    "GPU Faiss runs brute-force and IVF searches on CUDA devices.",
    "Training an IVF index learns the coarse quantizer from a sample of the data.",
    "Dense retrieval embeds queries and documents into the same vector space.",
    "Maximum inner product search returns the vectors with the largest dot product.",
    "Faiss is a library for efficient similarity search written in C++ with Python bindings.",
    "Recall at k measures how many true neighbours an approximate index returns.",
    "Vector databases shard embeddings across machines to scale similarity search.",
    "Searching an inverted list scans the residuals of the vectors assigned to one centroid.",
]


def test_sift_is_robust_to_duplicates_where_knn_is_not(tmp_path, embedder):
    near = "Faiss searches dense vectors by inner product using an inverted file index."
    records = [{"id": f"copy-{i}", "text": near} for i in range(20)]
    records += [{"id": f"related-{i}", "text": s} for i, s in enumerate(RELATED)]
    records += [{"id": f"other-{t}", "text": s} for t, s in TOPICS.items() if t != "faiss"]
    retriever = make_retriever(tmp_path, records, embedder)
    prompt = "How does Faiss search dense vectors by inner product with an inverted file index?"
    knn = retriever.retrieve(prompt, n=20, strategy="knn")
    sift = retriever.retrieve(prompt, n=20, strategy="sift", lam=0.01)
    assert sorted(knn.doc_ids) == sorted(f"copy-{i}" for i in range(20))
    # The copies share one embedding, so SIFT treats them as one point: it may observe that point several
    # times (one gradient step each) but never mistakes 20 copies for 20 pieces of evidence.
    copy_picks = [d for d in sift.doc_ids if d.startswith("copy-")]
    assert 1 <= len(set(copy_picks)) <= 2
    assert len(copy_picks) <= 10
    assert len({d for d in sift.doc_ids if d.startswith("related-")}) >= 8
    assert sift.uncertainty_after < knn.uncertainty_after


def test_long_prompts_give_several_targets(tmp_path, topic_retriever):
    faiss_part = " ".join([TOPICS["faiss"]] * 25)
    bread_part = " ".join([TOPICS["bread"]] * 25)
    result = topic_retriever.retrieve(faiss_part + " " + bread_part, n=6, strategy="sift")
    assert result.num_targets >= 2
    topics = {s.metadata["topic"] for s in result.sequences}
    assert {"faiss", "bread"} <= topics
    capped = Retriever(
        topic_retriever.datastore, topic_retriever.embedder, RetrievalConfig(max_query_chunks=1)
    )
    assert capped.retrieve(faiss_part + " " + bread_part, n=6).num_targets == 1


def test_adaptive_stop(topic_retriever):
    prompt = "LoRA adapters for language models"
    full = topic_retriever.retrieve(prompt, n=8)
    none = topic_retriever.retrieve(prompt, n=8, alpha=100.0)
    assert none.ids == [] and none.truncated_from == 8 and len(none.variances) == 1
    everything = topic_retriever.retrieve(prompt, n=8, alpha=1e-3)
    assert everything.ids == full.ids and everything.truncated_from == 8
    # The kept prefix is exactly the prefix that satisfies alpha * n * sigma_n <= 1.
    alpha = 1.0 / (3 * np.sqrt(full.variances[3]))
    some = topic_retriever.retrieve(prompt, n=8, alpha=alpha * 0.999)
    assert some.ids == full.ids[: len(some.ids)] and len(some.ids) >= 3


def test_exclude_ids(topic_retriever):
    prompt = "How does Faiss search an inverted file index of vectors?"
    first = topic_retriever.retrieve(prompt, n=3, strategy="knn")
    excluded = set(first.ids)
    again = topic_retriever.retrieve(prompt, n=3, strategy="knn", exclude_ids=excluded)
    assert not excluded & set(again.ids) and len(again.ids) == 3


def test_k_limits_the_candidates(topic_retriever):
    result = topic_retriever.retrieve("weather forecast for tuesday", n=10, k=4, strategy="sift")
    assert result.candidates == 4 and len(set(result.ids)) <= 4 and len(result.ids) == 10
    assert topic_retriever.retrieve("weather", n=30, k=1000, strategy="knn").candidates == 24


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ""}, "non-empty"),
        ({"text": "   "}, "non-empty"),
        ({"text": "x", "strategy": "random"}, "unknown strategy"),
        ({"text": "x", "k": 0}, "k must be"),
        ({"text": "x", "lam": 0.0}, "lam must be"),
        ({"text": "x", "n": -1}, "n must be"),
    ],
)
def test_invalid_requests(topic_retriever, kwargs, message):
    with pytest.raises(ValueError, match=message):
        topic_retriever.retrieve(**kwargs)


def test_concurrent_calls_match_sequential(topic_retriever):
    prompts = [f"{sentence} question {i}" for i, sentence in enumerate(TOPICS.values())] * 2
    strategies = ["sift", "knn"] * len(prompts)

    def run(args):
        prompt, strategy = args
        r = topic_retriever.retrieve(prompt, n=5, strategy=strategy)
        return r.ids, r.variances

    jobs = list(zip(prompts, strategies, strict=False))
    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(run, jobs))
    for (ids_a, var_a), (ids_b, var_b) in zip(sequential, concurrent, strict=True):
        assert ids_a == ids_b
        np.testing.assert_allclose(var_a, var_b, rtol=1e-5, atol=1e-6)


def test_lambda_defaults_to_the_embedders_calibration(topic_retriever):
    assert (
        topic_retriever.retrieve("bread and weather", n=2).lam
        == CALIBRATED_LAMBDA[topic_retriever.embedder.name]
    )
    assert topic_retriever.retrieve("bread and weather", n=2, lam=0.05).lam == 0.05
    configured = Retriever(topic_retriever.datastore, topic_retriever.embedder, RetrievalConfig(lam=0.3))
    assert configured.retrieve("bread and weather", n=2).lam == 0.3
