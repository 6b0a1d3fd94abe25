"""The evaluation protocol end to end on the tiny model: exclusion, checkpoints, outputs, calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import write_jsonl
from ttserve.cli import app
from ttserve.config import DatastoreConfig, Settings
from ttserve.datastore import Datastore, Document, build_datastore
from ttserve.evaluation import (
    Checkpoint,
    DocumentResult,
    EvalReport,
    _digest,
    cross_validate_policy,
    evaluate,
    exact_copies,
    fit_gain_model,
    load_report,
    sample_documents,
    split_halves,
)
from ttserve.policy import GainModel, replay
from ttserve.retrieval import CALIBRATED_LAMBDA, Retriever
from ttserve.scoring import score_text

SNIPPETS = [
    "def load_config(path):\n    with open(path) as handle:\n        return json.load(handle)\n",
    "def save_config(path, config):\n    with open(path, 'w') as handle:\n        json.dump(config, handle)\n",
    "class LRUCache:\n    def __init__(self, size):\n        self.size = size\n        self.items = OrderedDict()\n",
    "def fetch(url, timeout=10):\n    return urllib.request.urlopen(url, timeout=timeout).read()\n",
    "for name in sorted(os.listdir(directory)):\n    print(name)\n",
    "def retry(times):\n    def wrap(function):\n        return function\n    return wrap\n",
]


@pytest.fixture(scope="module")
def code_datastore(tmp_path_factory, embedder):
    root = tmp_path_factory.mktemp("evalstore")
    records = [{"id": f"s{i}", "text": t} for i, t in enumerate(SNIPPETS)] + [
        {"id": "copy", "text": SNIPPETS[0]}
    ]
    out = root / "ds"
    build_datastore(
        [write_jsonl(root / "c.jsonl", records)],
        out,
        Settings(datastore=DatastoreConfig(path=out)),
        embedder,
        progress=False,
    )
    return out


def test_exact_copies_are_found_by_full_text(code_datastore):
    copies = exact_copies(Datastore(code_datastore))
    assert len(copies) == len(SNIPPETS)  # "copy" duplicates s0
    assert sorted(len(ids) for ids in copies.values()) == [1] * (len(SNIPPETS) - 1) + [2]


def test_evaluate_never_retrieves_the_document_itself(code_datastore, embedder, make_trainer):
    retriever = Retriever(Datastore(code_datastore), embedder)
    trainer = make_trainer()
    documents = [
        Document(id="t0", text=SNIPPETS[0], source="test"),
        Document(id="t3", text=SNIPPETS[3], source="test"),
    ]
    report = evaluate(
        documents, retriever, trainer, steps=(1, 3), gain_model=GainModel(slope=0.5), progress=False
    )
    copies = exact_copies(retriever.datastore)
    for document, result in zip(documents, report.documents, strict=True):
        own = copies[
            next(
                k
                for k, ids in copies.items()
                if Datastore(code_datastore).sequences(sorted(ids))[0].text == document.text
            )
        ]
        assert result.excluded == len(own)
        for strategy in ("knn", "sift"):
            assert not own & set(result.picks[strategy])
            assert [c.budget for c in result.runs[strategy]] == [1, 3]
            assert all(c.steps <= c.budget for c in result.runs[strategy])
        with trainer.session() as session, session.model.disable_adapter():
            base = score_text(session.model, trainer.tokenizer, document.text, trainer.max_length)
        assert result.base_loglik == pytest.approx(base.loglik, rel=1e-6)
        assert result.adaptive is not None and result.adaptive.steps <= 3 and result.adaptive_reason
    assert report.documents[0].excluded == 2
    summary = report.summary()
    assert set(summary["bpb"]) == {"base", "knn", "sift"} and math.isfinite(summary["bpb"]["sift"]["3"])
    assert 0 <= summary["adaptive"]["steps"] <= summary["adaptive"]["full_steps"]


def test_each_checkpoint_is_scored_as_a_plan_of_that_many_steps(code_datastore, embedder, make_trainer):
    retriever = Retriever(Datastore(code_datastore), embedder)
    # 1 step trains at 4x the rate, 2 steps at 2x, 4 steps at 1x: three runs, not one scored on the way.
    trainer = make_trainer(learning_rate=1e-3, learning_rate_steps=4)
    document = Document(id="t3", text=SNIPPETS[3], source="test")
    report = evaluate([document], retriever, trainer, steps=(1, 2, 4), strategies=("sift",), progress=False)
    result = report.documents[0]
    texts = [s.text for s in retriever.datastore.sequences(result.picks["sift"])]
    for checkpoint in result.runs["sift"]:
        with trainer.session(planned_steps=checkpoint.budget) as session:
            session.train(texts, checkpoint.budget)
            alone = score_text(session.model, trainer.tokenizer, document.text, trainer.max_length)
        assert checkpoint.loglik == pytest.approx(alone.loglik, rel=1e-6)
    assert report.config["learning_rate_steps"] == 4


def test_a_stored_chunk_used_as_a_test_document_is_excluded(tmp_path, embedder):
    long_text = " ".join(f"def handler_{i}(request):\n    return respond(request, {i})\n" for i in range(60))
    out = tmp_path / "ds"
    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"id": "long", "text": long_text}, {"id": "other", "text": SNIPPETS[1]}]
    )
    build_datastore(
        [corpus],
        out,
        Settings(datastore=DatastoreConfig(path=out, chunk_tokens=64)),
        embedder,
        progress=False,
    )
    store = Datastore(out)
    chunk = store.sequences([3])[0]
    assert chunk.doc_id == "long" and chunk.chunk == 3
    copies = exact_copies(store)
    assert copies[_digest(chunk.text)] == {3}
    assert copies[_digest(long_text)] == {
        s.id for s in store.sequences(range(len(store))) if s.doc_id == "long"
    }


def test_sample_documents_draws_stored_sequences_by_seed(code_datastore):
    store = Datastore(code_datastore)
    stored = {s.id: s for s in store.sequences(range(len(store)))}
    drawn = sample_documents(store, 3, seed=0)
    assert len(drawn) == 3 and len({d.id for d in drawn}) == 3
    by_name = {f"{s.doc_id}#{s.chunk}": s for s in stored.values()}
    assert all(by_name[d.id].text == d.text and by_name[d.id].source == d.source for d in drawn)
    assert [by_name[d.id].id for d in drawn] == sorted(by_name[d.id].id for d in drawn)  # in id order
    assert sample_documents(store, 3, seed=0) == drawn
    assert sorted(d.id for d in sample_documents(store, 100, seed=1)) == sorted(by_name)  # all, no more


def test_split_protocol(code_datastore, embedder, make_trainer):
    first, second = split_halves(SNIPPETS[2])
    assert first + second == SNIPPETS[2] and first and second
    report = evaluate(
        [Document(id="t", text=SNIPPETS[2], source="test")],
        Retriever(Datastore(code_datastore), embedder),
        make_trainer(),
        steps=(2,),
        strategies=("sift",),
        split=True,
        progress=False,
    )
    assert report.documents[0].bytes == len(second.encode())


def synthetic_report() -> EvalReport:
    rng = np.random.default_rng(0)
    documents = []
    for i in range(12):
        base = -200.0
        runs = {}
        for strategy in ("knn", "sift"):
            checkpoints = []
            for n in (8, 16):
                reduction = float(rng.uniform(0.05, 0.6)) * n / 16
                gain_bits = 0.4 * reduction**0.8 * 100 * math.log(2)  # 100 bytes
                checkpoints.append(
                    Checkpoint(budget=n, steps=n, loglik=base + gain_bits, reduction=reduction)
                )
            runs[strategy] = checkpoints
        documents.append(
            DocumentResult(
                id=f"d{i}",
                bytes=100,
                tokens=40,
                excluded=0,
                base_loglik=base,
                runs=runs,
                adaptive=runs["sift"][0],
                adaptive_reason="r",
            )
        )
    return EvalReport(
        config={"steps": [8, 16], "strategies": ["knn", "sift"], "model": "m", "datastore": "d"},
        documents=documents,
    )


def test_results_round_trip_and_calibrate(tmp_path):
    report = synthetic_report()
    report.write(tmp_path / "run", "m")
    for name in ("results.json", "results.csv", "bpb.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    loaded = load_report(tmp_path / "run" / "results.json")
    assert loaded.summary()["bpb"] == report.summary()["bpb"]
    assert loaded.summary()["adaptive"] == report.summary()["adaptive"]
    assert len((tmp_path / "run" / "results.csv").read_text().splitlines()) == 1 + 12 * (1 + 4 + 1)

    result = CliRunner().invoke(
        app, ["calibrate", str(tmp_path / "run" / "results.json"), "--out", str(tmp_path / "gain.json")]
    )
    assert result.exit_code == 0, result.output
    model = GainModel.load(tmp_path / "gain.json")
    assert model.slope == pytest.approx(0.4, rel=1e-3) and model.power == pytest.approx(0.8, abs=1e-3)
    assert loaded.summary()["correlation"]["spearman"] > 0.9


def test_calibrating_on_runs_with_trajectories_fits_the_step_plan_too():
    report = synthetic_report()
    assert fit_gain_model([report], keep=0.95).gain_fraction is None  # no trajectories: threshold only
    for d in report.documents:
        reductions = {c.budget: c.reduction for c in d.runs["sift"]}
        # σ_n² falling linearly to the recorded reductions at 8 and 16 picks
        d.variances["sift"] = list(
            1.0 - np.interp(np.arange(17), [0, 8, 16], [0.0, reductions[8], reductions[16]])
        )
    model = fit_gain_model([report], keep=0.95)
    assert model.gain_fraction is not None and model.min_gain_bpb is not None
    assert len(report.calibration_prompts()) == len(report.documents)
    loaded_back = EvalReport(config=report.config, documents=report.documents)
    assert loaded_back.summary()["per_document"]["win_rate_vs_base"]["sift"]["16"] == 1.0


def test_fit_gain_model_pools_reports_and_keeps_the_asked_share():
    report = synthetic_report()
    model = fit_gain_model([report], keep=0.95)
    assert model.slope == pytest.approx(0.4, rel=1e-3) and model.power == pytest.approx(0.8, abs=1e-3)
    assert (model.model, model.corpus, model.points) == ("m", "d", 12 * 2 * 2)
    reductions, gains, weights = report.prompt_points()
    realised = gains * weights
    assert realised[model.predict(reductions) >= model.min_gain_bpb].sum() >= 0.95 * realised.sum()
    assert fit_gain_model([report], keep=0.5).min_gain_bpb > model.min_gain_bpb

    other = EvalReport(config={**report.config, "datastore": "e"}, documents=report.documents)
    both = fit_gain_model([report, other], keep=0.95)
    assert (both.points, both.corpus) == (2 * model.points, "d, e")
    assert both.slope == pytest.approx(model.slope) and both.min_gain_bpb == pytest.approx(model.min_gain_bpb)
    with pytest.raises(ValueError, match="no evaluation reports"):
        fit_gain_model([], keep=0.95)


def test_the_bootstrap_interval_brackets_the_policy_share_and_narrows_with_more_documents():
    def report(documents: int) -> EvalReport:
        # Every document gains 1 bit at 16 steps; the policy trains every other one fully and skips the rest.
        results = []
        for i in range(documents):
            full = Checkpoint(budget=16, steps=16, loglik=-99.0, reduction=0.5)
            results.append(
                DocumentResult(
                    id=f"d{i}", bytes=100, tokens=40, excluded=0, base_loglik=-100.0,
                    runs={"sift": [full]}, adaptive=full if i % 2 else None,
                )
            )  # fmt: skip
        return EvalReport(config={"steps": [16], "strategies": ["sift"]}, documents=results)

    small, large = report(20).summary()["adaptive"], report(320).summary()["adaptive"]
    assert small["gain_fraction_of_full"] == 0.5 and small["steps"] / small["full_steps"] == 0.5
    low, high = small["bootstrap_5_95"]["gain_fraction"]
    assert low < 0.5 < high and small["bootstrap_5_95"]["steps_fraction"] == [low, high]  # equal gains
    large_low, large_high = large["bootstrap_5_95"]["gain_fraction"]
    assert low < large_low < 0.5 < large_high < high
    # 16 times the documents, a quarter of the width (binomial: the width falls as 1/sqrt(n))
    assert (large_high - large_low) == pytest.approx((high - low) / 4, rel=0.35)
    assert report(20).adaptive_interval() == report(20).adaptive_interval()  # seeded

    everything = report(20)
    for d in everything.documents:
        d.adaptive = d.runs["sift"][0]
    assert everything.adaptive_interval()["gain_fraction"] == [1.0, 1.0]


def test_merging_runs_pools_documents_and_can_keep_only_some_strategies():
    from benchmarks.merge_results import merge

    both, sift_only = synthetic_report(), synthetic_report()
    for d in sift_only.documents:
        d.id, d.runs = f"other-{d.id}", {"sift": d.runs["sift"]}
    sift_only.config = {**sift_only.config, "strategies": ["sift"]}
    with pytest.raises(SystemExit, match="not every document has every strategy"):
        merge([synthetic_report(), sift_only])
    pooled = merge([both, sift_only], only={"sift"})
    assert len(pooled.documents) == 24 and pooled.config["strategies"] == ["sift"]
    assert pooled.summary()["adaptive"]["full_steps"] == 24 * 16
    with pytest.raises(SystemExit, match="the same strategy in two runs"):
        merge([synthetic_report(), synthetic_report()])


def report_with_trajectories(documents: int, gain_follows_uncertainty: bool, seed: int = 0) -> EvalReport:
    """SIFT runs at 4/8/16 steps whose σ² falls by a random amount per document; the realised gain is a
    power of that reduction, or (otherwise) drawn independently of it."""
    rng = np.random.default_rng(seed)
    results = []
    for i in range(documents):
        variances = 1.0 - np.sqrt(np.arange(17) / 16) * rng.uniform(0.05, 0.9)
        checkpoints = []
        for n in (4, 8, 16):
            reduction = float(variances[0] - variances[n])
            gain_bpb = 0.5 * reduction**1.2 if gain_follows_uncertainty else rng.exponential(0.1) * n / 16
            loglik = -300.0 + gain_bpb * 100 * math.log(2)  # 100 bytes
            checkpoints.append(Checkpoint(budget=n, steps=n, loglik=loglik, reduction=reduction))
        results.append(
            DocumentResult(
                id=f"d{i}", bytes=100, tokens=40, excluded=0, base_loglik=-300.0,
                runs={"sift": checkpoints}, variances={"sift": list(variances)},
            )
        )  # fmt: skip
    config = {"steps": [4, 8, 16], "strategies": ["sift"], "model": "m", "datastore": "d"}
    return EvalReport(config=config, documents=results)


def test_cross_validation_sees_the_fit_keep_less_on_unseen_prompts_when_the_predictor_is_noise():
    keep = 0.9
    noise = report_with_trajectories(40, gain_follows_uncertainty=False)
    fitted = fit_gain_model([noise], keep)
    in_sample = replay(fitted, noise.calibration_prompts(), 16)
    assert in_sample.gain_share >= keep  # what the fit guarantees on its own prompts
    unseen = cross_validate_policy([noise], keep, folds=5, repeats=5)
    assert unseen.gain_share < keep - 0.02  # a fit that saw the held-out fold would keep `keep`
    assert unseen.full_steps == 5 * 40 * 16  # every document held out once per repeat
    assert cross_validate_policy([noise], keep, folds=5, repeats=5) == unseen  # seeded

    # Where the uncertainty predicts the gain, the fit carries over: unseen prompts keep about as much.
    signal = report_with_trajectories(40, gain_follows_uncertainty=True)
    in_sample = replay(fit_gain_model([signal], keep), signal.calibration_prompts(), 16)
    unseen = cross_validate_policy([signal], keep, folds=5, repeats=5)
    assert unseen.gain_share >= keep - 0.02 and abs(unseen.steps_share - in_sample.steps_share) < 0.1


def test_cross_validation_needs_trajectories_and_enough_documents():
    with pytest.raises(ValueError, match="trajectories"):
        cross_validate_policy([synthetic_report()], 0.9)
    with pytest.raises(ValueError, match="folds"):
        cross_validate_policy([report_with_trajectories(4, True)], 0.9, folds=5)


def test_calibrate_records_the_cross_validated_estimate(tmp_path):
    report_with_trajectories(30, gain_follows_uncertainty=True).write(tmp_path / "run")
    command = ["calibrate", str(tmp_path / "run" / "results.json"), "--out", str(tmp_path / "gain.json")]
    result = CliRunner().invoke(app, [*command, "--repeats", "2"])
    assert result.exit_code == 0, result.output
    assert "on unseen ones (5-fold cross-validation, 2 repeats)" in result.output
    model = GainModel.load(tmp_path / "gain.json")
    assert 0 < model.cross_validated_gain_share <= 1.05 and 0 < model.cross_validated_steps_share <= 1
    result = CliRunner().invoke(app, [*command, "--folds", "0"])
    assert result.exit_code == 0 and GainModel.load(tmp_path / "gain.json").cross_validated_gain_share is None


def test_eval_command(code_datastore, tiny_model_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model:\n  name_or_path: {tiny_model_dir}\n  device: cpu\ndatastore:\n  path: {code_datastore}\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--sample-datastore",
            "2",
            "--steps",
            "1,2",
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["summary"]["documents"] == 2 and payload["config"]["steps"] == [1, 2]
    assert (
        payload["config"]["lam"] == CALIBRATED_LAMBDA["sentence-transformers/all-MiniLM-L6-v2"]
    )  # the λ used
    bad = CliRunner().invoke(
        app, ["eval", "--steps", "a,b", "--sample-datastore", "1", "--config", str(config)]
    )
    assert bad.exit_code == 2 and "comma-separated integers" in bad.stderr
