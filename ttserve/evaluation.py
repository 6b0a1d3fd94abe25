"""The paper's evaluation protocol (spec §4-§6): bits per byte before and after test-time training.

For every test document:
1. retrieve with its own text (or, in the split protocol, its first half) from the datastore;
2. score its bits per byte under the base model;
3. for each strategy (knn, sift), train one fresh adapter on the picks in order and score the document
   after 8, 16, 32 ... steps. The checkpoints come from a single run, since the first 8 steps of a
   32-step run are exactly an 8-step run;
4. for SIFT, also score after the number of steps the adaptive policy chooses for a budget equal to
   the largest step count.

A test document never retrieves itself: every stored sequence whose text equals the test text, and
every sequence of a stored document whose full text equals it, is excluded from its candidates. Near-duplicates (boilerplate, licence
headers, forked files) stay. The Pile is full of them, the paper's protocol keeps them, and they are
exactly the redundancy SIFT is meant to handle. `near_duplicate_share` in the results reports how many
picks are near-copies of the test text.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ttserve.config import PolicyConfig
from ttserve.contract import STRATEGIES, Strategy
from ttserve.datastore import Datastore, Document
from ttserve.policy import CalibrationPrompt, GainModel, Replay, fit_policy, plan, replay
from ttserve.retrieval import Retriever
from ttserve.scoring import TextScore, bits_per_byte, score_text
from ttserve.training import TestTimeTrainer

NEAR_DUPLICATE_RATIO = 0.9  # difflib similarity above which a pick counts as a near-copy of the test text


@dataclass
class Checkpoint:
    budget: int  # training steps asked for
    steps: int  # training steps actually taken (fewer when the picks run out)
    loglik: float
    reduction: float  # σ_0² − σ_n² of the picks trained on


@dataclass
class DocumentResult:
    id: str
    bytes: int
    tokens: int
    excluded: int  # datastore sequences excluded as exact copies of this document
    base_loglik: float
    runs: dict[str, list[Checkpoint]] = field(default_factory=dict)
    adaptive: Checkpoint | None = None
    adaptive_reason: str = ""
    near_duplicates: dict[str, int] = field(default_factory=dict)  # picks that are near-copies of the text
    picks: dict[str, list[int]] = field(default_factory=dict)  # datastore sequence ids, in selection order
    # σ_0², σ_1², ... of those picks: what the policy plans from (`ttserve calibrate` replays it)
    variances: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class EvalReport:
    config: dict
    documents: list[DocumentResult]

    def bpb(self, strategy: str | None = None, steps: int | None = None) -> float:
        """Byte-weighted BPB: of the base model (no strategy), a strategy at a step count, or 'adaptive'."""
        total_bytes = sum(d.bytes for d in self.documents)
        if strategy is None:
            loglik = sum(d.base_loglik for d in self.documents)
        elif strategy == "adaptive":
            loglik = sum(d.adaptive.loglik if d.adaptive else d.base_loglik for d in self.documents)
        else:
            loglik = sum(_at(d.runs[strategy], steps).loglik for d in self.documents)
        return bits_per_byte(loglik, total_bytes)

    def summary(self) -> dict:
        steps = self.config["steps"]
        table = {"base": self.bpb()}
        for strategy in self.config["strategies"]:
            table[strategy] = {str(n): self.bpb(strategy, n) for n in steps}
        summary: dict = {
            "documents": len(self.documents),
            "bytes": sum(d.bytes for d in self.documents),
            "bpb": table,
        }
        if "sift" in self.config["strategies"]:
            adaptive_gain, full_gain, adaptive_steps, full_steps = (
                self._adaptive_columns().sum(axis=0).tolist()
            )
            summary["adaptive"] = {
                "bpb": self.bpb("adaptive"),
                "gain_fraction_of_full": adaptive_gain / full_gain if full_gain else float("nan"),
                "steps": int(adaptive_steps),
                "full_steps": int(full_steps),
                "compute_saved": 1 - adaptive_steps / full_steps if full_steps else float("nan"),
                "trained_documents": sum(1 for d in self.documents if d.adaptive and d.adaptive.steps),
                "bootstrap_5_95": self.adaptive_interval(),
            }
        summary["per_document"] = self.per_document()
        reductions, gains, _ = self.calibration_points()
        if len(reductions) > 2:
            summary["correlation"] = {
                "pearson": float(np.corrcoef(reductions, gains)[0, 1]),
                "spearman": float(_spearman(reductions, gains)),
                "points": len(reductions),
            }
        reductions, gains, _ = self.prompt_points()
        if len(reductions) > 2:
            # Across prompts at one budget: does SIFT's uncertainty say which prompts training helps?
            summary["correlation"]["spearman_prompts"] = float(_spearman(reductions, gains))
        return summary

    def _adaptive_columns(self) -> np.ndarray:
        """Per document: the adaptive policy's and the full budget's gain (log-likelihood), and their steps.
        Bytes cancel in a ratio of byte-weighted BPB gains, so the shares are ratios of these columns' sums."""
        budget = max(self.config["steps"])
        rows = []
        for d in self.documents:
            full, adaptive = _at(d.runs["sift"], budget), d.adaptive
            gain = adaptive.loglik - d.base_loglik if adaptive else 0.0
            rows.append((gain, full.loglik - d.base_loglik, adaptive.steps if adaptive else 0, full.steps))
        return np.asarray(rows, dtype=float).reshape(-1, 4)

    def adaptive_interval(self, resamples: int = 2000, seed: int = 0) -> dict:
        """The adaptive policy's share of the full gain and of the steps, 5th and 95th percentiles over
        resamples of the documents with replacement: how far the shares could move on another sample of
        documents like these. Seeded, so a report always prints the same interval."""
        table = self._adaptive_columns()
        draws = np.random.default_rng(seed).integers(0, len(table), size=(resamples, len(table)))
        sums = table[draws].sum(axis=1)  # resamples × the four columns summed
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = {"gain_fraction": sums[:, 0] / sums[:, 1], "steps_fraction": sums[:, 2] / sums[:, 3]}
        return {
            name: [float(np.nanpercentile(values, 5)), float(np.nanpercentile(values, 95))]
            for name, values in shares.items()
        } | {"resamples": resamples}

    def per_document(self) -> dict:
        """How often training won, document by document: each strategy and step count against the base
        model, SIFT against kNN at equal steps, and the documents where SIFT at the most steps hurt."""
        steps, documents = self.config["steps"], self.documents

        def bpb(d: DocumentResult, strategy: str | None = None, n: int = 0) -> float:
            loglik = d.base_loglik if strategy is None else _at(d.runs[strategy], n).loglik
            return bits_per_byte(loglik, d.bytes)

        def share(wins: list[bool]) -> float:
            return sum(wins) / len(wins) if wins else float("nan")

        table: dict = {"win_rate_vs_base": {}}
        for strategy in self.config["strategies"]:
            table["win_rate_vs_base"][strategy] = {
                str(n): share([bpb(d, strategy, n) < bpb(d) for d in documents]) for n in steps
            }
        if {"knn", "sift"} <= set(self.config["strategies"]):
            table["sift_win_rate_vs_knn"] = {
                str(n): share([bpb(d, "sift", n) < bpb(d, "knn", n) for d in documents]) for n in steps
            }
        if "sift" in self.config["strategies"]:
            rows = [(d.id, bpb(d), bpb(d, "sift", steps[-1])) for d in documents]
            table["sift_hurt"] = [
                {"id": i, "base_bpb": round(b, 4), "sift_bpb": round(a, 4)}
                for i, b, a in sorted(rows, key=lambda row: row[1] - row[2])
                if a > b
            ]
        return table

    def calibration_points(
        self, strategies: Sequence[Strategy] = STRATEGIES
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uncertainty reduction, realised BPB gain, steps) for every document, strategy and checkpoint."""
        reductions, gains, steps = [], [], []
        for d in self.documents:
            base_bpb = bits_per_byte(d.base_loglik, d.bytes)
            for strategy in strategies:
                for c in d.runs.get(strategy, []):
                    reductions.append(c.reduction)
                    gains.append(base_bpb - bits_per_byte(c.loglik, d.bytes))
                    steps.append(c.steps)
        return np.asarray(reductions), np.asarray(gains), np.asarray(steps)

    def calibration_prompts(self) -> list[CalibrationPrompt]:
        """Every document's SIFT trajectory with its realised gains, for `fit_policy` (needs `variances`)."""
        prompts = []
        for d in self.documents:
            if "sift" in d.runs and d.variances.get("sift"):
                checkpoints = sorted(d.runs["sift"], key=lambda c: c.budget)
                prompts.append(
                    CalibrationPrompt(
                        variances=np.asarray(d.variances["sift"], dtype=float),
                        steps=np.array([c.budget for c in checkpoints]),
                        gains=np.array(
                            [bits_per_byte(d.base_loglik - c.loglik, d.bytes) for c in checkpoints]
                        ),
                        weight=float(d.bytes),
                    )
                )
        return prompts

    def prompt_points(self, strategy: Strategy = "sift") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(reduction, realised BPB gain, bytes) per document at the largest step count."""
        budget = max(self.config["steps"])
        rows = []
        for d in self.documents:
            if strategy in d.runs:
                c = _at(d.runs[strategy], budget)
                # The BPB gain, base minus trained: the bits per byte of the likelihood the training added.
                rows.append((c.reduction, bits_per_byte(d.base_loglik - c.loglik, d.bytes), d.bytes))
        return (
            tuple(np.asarray(column, dtype=float) for column in zip(*rows, strict=True))
            if rows
            else (np.zeros(0),) * 3
        )

    def write(self, out: Path, model_name: str = "") -> None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": self.config,
            "summary": self.summary(),
            "documents": [asdict(d) for d in self.documents],
        }
        (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        with open(out / "results.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["doc_id", "bytes", "strategy", "steps", "bpb", "uncertainty_reduction"])
            for d in self.documents:
                writer.writerow([d.id, d.bytes, "base", 0, bits_per_byte(d.base_loglik, d.bytes), 0.0])
                for strategy, checkpoints in d.runs.items():
                    for c in checkpoints:
                        writer.writerow(
                            [d.id, d.bytes, strategy, c.steps, bits_per_byte(c.loglik, d.bytes), c.reduction]
                        )
                if d.adaptive is not None:
                    a = d.adaptive
                    writer.writerow(
                        [d.id, d.bytes, "adaptive", a.steps, bits_per_byte(a.loglik, d.bytes), a.reduction]
                    )
        self.plot(out / "bpb.png", model_name)

    def plot(self, path: Path, model_name: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = self.config["steps"]
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.axhline(self.bpb(), color="gray", linestyle="--", label="base model")
        for strategy in self.config["strategies"]:
            axes.plot(
                [0, *steps], [self.bpb(), *(self.bpb(strategy, n) for n in steps)], marker="o", label=strategy
            )
        if "sift" in self.config["strategies"]:
            mean_steps = np.mean([d.adaptive.steps if d.adaptive else 0 for d in self.documents])
            axes.scatter(
                [mean_steps],
                [self.bpb("adaptive")],
                marker="*",
                s=150,
                color="black",
                zorder=3,
                label="adaptive SIFT (mean steps)",
            )
        axes.set_xlabel("test-time training steps")
        axes.set_ylabel("bits per byte (lower is better)")
        axes.set_title(
            f"{len(self.documents)} documents" + (f", {Path(model_name).name}" if model_name else "")
        )
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


def evaluate(
    documents: Sequence[Document],
    retriever: Retriever,
    trainer: TestTimeTrainer,
    steps: Sequence[int] = (8, 16, 32),
    strategies: Sequence[Strategy] = ("knn", "sift"),
    split: bool = False,
    policy: PolicyConfig | None = None,
    gain_model: GainModel | None = None,
    progress: bool = True,
) -> EvalReport:
    steps = sorted({int(n) for n in steps})
    if not steps or steps[0] < 1:
        raise ValueError("steps must be positive integers")
    policy = policy or PolicyConfig()
    exact = exact_copies(retriever.datastore)
    tokenizer, max_length = trainer.tokenizer, trainer.max_length
    results = []
    for document in tqdm(documents, unit="doc", desc="evaluating", disable=not progress):
        query, scored = split_halves(document.text) if split else (document.text, document.text)
        excluded = exact.get(_digest(document.text), set())
        with trainer.session() as session:
            with session.model.disable_adapter():
                base = score_text(session.model, tokenizer, scored, max_length)
        result = DocumentResult(
            id=document.id,
            bytes=base.bytes,
            tokens=base.tokens,
            excluded=len(excluded),
            base_loglik=base.loglik,
        )
        targets = retriever.embed(query)  # once for every strategy
        for strategy in strategies:
            retrieval = retriever.retrieve_embeddings(
                targets, n=steps[-1], strategy=strategy, exclude_ids=excluded
            )
            checkpoints = list(steps)
            chosen = None
            if strategy == "sift":
                chosen = plan(retrieval.selection, steps[-1], policy, gain_model)
                result.adaptive_reason = chosen.reason
                checkpoints = sorted(set(checkpoints) | ({chosen.steps} if chosen.steps else set()))
            scores = _train_and_score(trainer, retrieval, checkpoints, scored, max_length)
            result.runs[strategy] = [scores[n] for n in steps]
            result.near_duplicates[strategy] = sum(_near_copy(t, document.text) for t in retrieval.texts)
            result.picks[strategy] = retrieval.ids
            result.variances[strategy] = [float(v) for v in retrieval.variances]
            if chosen is not None:
                result.adaptive = scores[chosen.steps] if chosen.steps else Checkpoint(0, 0, base.loglik, 0.0)
        results.append(result)
    config = {
        "steps": steps,
        "strategies": list(strategies),
        "split": split,
        "lam": retriever.lam,
        "k": retriever.config.k,
        "policy": policy.model_dump(mode="json"),
        "gain_model": asdict(gain_model) if gain_model else None,
        "learning_rate": trainer.config.learning_rate,
        "learning_rate_steps": trainer.config.learning_rate_steps,
        "learning_rate_max_scale": trainer.config.learning_rate_max_scale,
        "lora_rank": trainer.config.lora_rank,
        "lora_alpha": trainer.config.lora_alpha,
        "target_modules": trainer.config.target_modules,
        "lora_layers": trainer.config.lora_layers,
        "max_length": trainer.max_length,
        "autocast_bf16": trainer.shared.autocast_bf16,
        "model": trainer.base_name,
        "datastore": str(retriever.datastore.path),
    }
    return EvalReport(config=config, documents=results)


def _train_and_score(
    trainer: TestTimeTrainer, retrieval, checkpoints: list[int], text: str, max_length: int
) -> dict[int, Checkpoint]:
    """Each checkpoint n scored as an n-step plan would train: one run per learning rate
    (`TrainingConfig.learning_rate_for`), scored at each of its checkpoints on the way."""
    runs: dict[float, list[int]] = defaultdict(list)
    for n in sorted(checkpoints):
        runs[trainer.config.learning_rate_for(n)].append(n)
    scores = {}
    for ns in runs.values():
        with trainer.session(planned_steps=ns[-1]) as session:
            session.train(retrieval.texts, 0)
            for n in ns:
                session.resume(n - session.run.steps)
                picks = min(n, len(retrieval.ids))
                score: TextScore = score_text(session.model, trainer.tokenizer, text, max_length)
                reduction = float(retrieval.variances[0] - retrieval.variances[picks])
                scores[n] = Checkpoint(
                    budget=n, steps=session.run.steps, loglik=score.loglik, reduction=reduction
                )
    return scores


def sample_documents(datastore: Datastore, n: int, seed: int) -> list[Document]:
    """`n` stored sequences drawn without replacement (every one when there are fewer), as test documents.

    `ttserve eval --sample-datastore`. They come in sequence-id order and are named `doc_id#chunk`;
    `evaluate` excludes each from its own candidates, while other chunks of the same document stay
    retrievable. The same seed draws the same sequences.
    """
    rows = np.random.default_rng(seed).choice(len(datastore), size=min(n, len(datastore)), replace=False)
    return [
        Document(id=f"{s.doc_id}#{s.chunk}", text=s.text, source=s.source)
        for s in datastore.sequences(sorted(rows))
    ]


def fit_gain_model(reports: Sequence[EvalReport], keep: float) -> GainModel:
    """The gain model with its skip threshold and gain fraction, fitted to evaluation runs (`ttserve calibrate`).

    The curve gain = a · reduction^b · steps^c is fitted to every (uncertainty reduction, steps, realised
    BPB gain) checkpoint of every report. Then `fit_policy` replays the policy on each report's SIFT
    trajectories at its largest step count and keeps the cheapest (threshold, fraction) that retains
    `keep` of the realised gain, bytes-weighted. Reports without trajectories (written before they were
    recorded) fit the threshold alone. The model and corpora the runs used are recorded with it.
    """
    if not reports:
        raise ValueError("no evaluation reports to fit the gain model to")
    points = [report.calibration_points() for report in reports]
    reductions, gains, steps = (np.concatenate([p[i] for p in points]) for i in range(3))
    corpora = ", ".join(sorted({report.config.get("datastore", "") for report in reports}))
    model = GainModel.fit(reductions, gains, steps, model=reports[0].config.get("model", ""), corpus=corpora)
    prompts = [prompt for report in reports for prompt in report.calibration_prompts()]
    every_sift_run_has_its_trajectory = all(
        d.variances.get("sift") for r in reports for d in r.documents if "sift" in d.runs
    )
    if prompts and every_sift_run_has_its_trajectory:
        return fit_policy(model, prompts, budget=calibration_budget(reports), keep=keep)
    rows = [report.prompt_points() for report in reports]
    return model.with_threshold(*(np.concatenate([p[i] for p in rows]) for i in range(3)), keep=keep)


def calibration_budget(reports: Sequence[EvalReport]) -> int:
    """The budget a policy is fitted for on these runs: their largest step count."""
    return max(max(report.config["steps"]) for report in reports)


def cross_validate_policy(
    reports: Sequence[EvalReport], keep: float, folds: int = 5, repeats: int = 20, seed: int = 0
) -> Replay:
    """What the policy `fit_gain_model` fits would spend and keep on prompts it was not fitted on.

    The fit picks the cheapest policy that keeps `keep` of the gain *on its own prompts*, so it is
    optimistic there: on held-out documents it keeps less (BENCHMARKS.md, "Learning rate per plan
    length"). Repeated k-fold cross-validation over the reports' documents estimates by how much before
    anyone evaluates on held-out data: each fold is planned by a gain model and policy fitted on the
    other folds alone, and the shares are pooled over every fold and repeat.
    """
    documents = [(i, d) for i, report in enumerate(reports) for d in report.documents]
    if any(not d.variances.get("sift") for _, d in documents):
        raise ValueError(
            "cross-validation needs SIFT trajectories in every document (runs with --strategies sift)"
        )
    if not 2 <= folds <= len(documents):
        raise ValueError(f"need 2 to {len(documents)} folds for {len(documents)} documents, got {folds}")
    budget = calibration_budget(reports)
    prompts = [EvalReport(reports[i].config, [d]).calibration_prompts()[0] for i, d in documents]
    rng = np.random.default_rng(seed)
    total = Replay(0.0, 0.0, 0.0, 0.0)
    for _ in range(repeats):
        for fold in np.array_split(rng.permutation(len(documents)), folds):
            held_out = set(fold.tolist())
            fitted_on = [  # each report keeps its config (its datastore and step counts) for the fit
                EvalReport(
                    report.config, [d for j, (i, d) in enumerate(documents) if i == r and j not in held_out]
                )
                for r, report in enumerate(reports)
            ]
            model = fit_gain_model([r for r in fitted_on if r.documents], keep)
            total = total + replay(model, [prompts[j] for j in fold], budget)
    return total


def exact_copies(datastore: Datastore) -> dict[str, set[int]]:
    """Digest of a text → the ids of the stored sequences that reproduce it exactly.

    A text is covered two ways: a stored sequence equal to it (a test document that is itself one
    stored chunk), and a stored document whose chunks concatenate to it (a test document that was split
    on ingestion). Both must be excluded, or the "retrieved" data would contain the answer.
    """
    copies: dict[str, set[int]] = defaultdict(set)
    chunks: dict[str, list] = defaultdict(list)
    for sequence in datastore.sequences(range(len(datastore))):
        copies[_digest(sequence.text)].add(sequence.id)
        chunks[sequence.doc_id].append(sequence)
    for parts in chunks.values():
        # Documents sharing an id (duplicated records) are told apart by their chunk-0 boundaries.
        current: list = []
        for part in sorted(parts, key=lambda s: s.id):
            if part.chunk == 0 and current:
                copies[_digest("".join(p.text for p in current))].update(p.id for p in current)
                current = []
            current.append(part)
        if current:
            copies[_digest("".join(p.text for p in current))].update(p.id for p in current)
    return dict(copies)


def split_halves(text: str) -> tuple[str, str]:
    """The split protocol: the first half retrieves and trains, the second half is scored."""
    middle = len(text) // 2
    cut = text.find(" ", middle)
    cut = middle if cut == -1 or cut - middle > 200 else cut
    return text[:cut], text[cut:]


def _near_copy(pick: str, text: str) -> bool:
    # A pick is a near-copy when most of it appears in the test document.
    matcher = SequenceMatcher(None, pick, text, autojunk=False)
    return matcher.find_longest_match(0, len(pick), 0, len(text)).size >= NEAR_DUPLICATE_RATIO * len(pick)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _at(checkpoints: list[Checkpoint], budget: int) -> Checkpoint:
    return next(c for c in checkpoints if c.budget == budget)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def load_report(path: str | Path) -> EvalReport:
    """An EvalReport back from the results.json that `EvalReport.write` produced."""
    payload = json.loads(Path(path).read_text())
    documents = []
    for d in payload["documents"]:
        runs = {
            strategy: [Checkpoint(**c) for c in checkpoints]
            for strategy, checkpoints in d.pop("runs").items()
        }
        adaptive = d.pop("adaptive")
        documents.append(
            DocumentResult(**d, runs=runs, adaptive=Checkpoint(**adaptive) if adaptive else None)
        )
    return EvalReport(config=payload["config"], documents=documents)
