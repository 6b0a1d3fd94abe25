"""Deciding how much test-time training a request gets (spec §3), before any GPU work.

Every "do not train" decision is made here, each with the reason the response carries: the request's own
settings (mode off, budget 0), what there is to retrieve for (no datastore, no text), and, once SIFT has
selected, the adaptive stop and the predicted gain. The pipeline asks `Policy.skip_before_retrieval` first,
then `Policy.plan`; what can go wrong after that (a full queue, a deadline, a fault) is a fallback, not a
policy decision.

The paper finds that SIFT's uncertainty reduction σ_0² − σ_n² predicts the realised gain of fine-tuning
on the first n picks. `GainModel` is that relation, fitted offline (`ttserve calibrate`) as bits per byte
gained against uncertainty reduced. A plan only ever shortens: it never exceeds the request's budget,
never trains past the adaptive-SIFT stop, and trains not at all when the predicted gain is too small to
pay for the compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ttserve.config import DEFAULT_MODEL, TINY_MODEL, PolicyConfig
from ttserve.contract import Mode
from ttserve.selection import Selection


@dataclass(frozen=True)
class GainModel:
    """Predicted BPB gain = slope · r^power for uncertainty reduction r = σ_0² − σ_n² (0 at r = 0).

    A power law through the origin: no reduction predicts no gain, and the fit can bend either way
    (diminishing returns for power < 1). Fitted by least squares in log space on runs with positive gain.
    """

    slope: float
    power: float = 1.0
    # Skip training below this predicted gain at the budget. Fitted with the curve (`with_threshold`): on this
    # model realised gains keep growing with steps, so compute is saved by skipping the prompts SIFT
    # predicts little for, not by cutting every prompt's steps short.
    min_gain_bpb: float | None = None
    model: str = ""  # the served model the calibration was measured on
    corpus: str = ""
    points: int = 0
    r2: float = float("nan")

    def predict(self, reduction: float | np.ndarray) -> float | np.ndarray:
        return self.slope * np.power(np.maximum(reduction, 0.0), self.power)

    @classmethod
    def fit(cls, reductions: np.ndarray, gains: np.ndarray, model: str = "", corpus: str = "") -> GainModel:
        reductions, gains = np.asarray(reductions, dtype=float), np.asarray(gains, dtype=float)
        usable = (reductions > 0) & (gains > 0)
        if usable.sum() < 2:
            raise ValueError(
                f"need at least two runs with positive gain and reduction to fit, got {int(usable.sum())}"
            )
        x, y = np.log(reductions[usable]), np.log(gains[usable])
        power, intercept = np.polyfit(x, y, 1)
        residual = y - (power * x + intercept)
        r2 = 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum() or 1.0)
        return cls(
            slope=float(np.exp(intercept)),
            power=float(power),
            model=model,
            corpus=corpus,
            points=int(usable.sum()),
            r2=r2,
        )

    def with_threshold(
        self, reductions: np.ndarray, gains: np.ndarray, weights: np.ndarray, keep: float = 0.9
    ) -> GainModel:
        """The largest threshold on predicted gain that still keeps `keep` of the realised gain.

        reductions/gains/weights: one entry per calibration prompt at the full budget (weights: bytes).
        """
        predicted = self.predict(np.asarray(reductions, dtype=float))
        realised = np.asarray(gains, dtype=float) * np.asarray(weights, dtype=float)
        total = realised.sum()
        best = None
        for threshold in np.sort(predicted):
            if total > 0 and realised[predicted >= threshold].sum() >= keep * total:
                best = float(threshold)
        return replace(self, min_gain_bpb=best)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GainModel:
        return cls(**json.loads(Path(path).read_text()))


# Calibrations shipped for the models ttserve makes itself (fitted with `ttserve calibrate`, BENCHMARKS.md).
CALIBRATIONS = {TINY_MODEL: Path(__file__).parent / "calibration" / "tiny-stdlib.json"}
DEFAULT_CALIBRATION = CALIBRATIONS[TINY_MODEL]


def default_gain_model(model_name: str | None) -> GainModel | None:
    """The shipped gain model for an embedded model (None: the default one); None for any other model."""
    path = CALIBRATIONS.get(model_name or DEFAULT_MODEL)
    return GainModel.load(path) if path is not None and path.is_file() else None


def load_gain_model(
    config: PolicyConfig, model_name: str | None, path: Path | None = None
) -> GainModel | None:
    """The gain model to plan with: `path`, else the configured calibration, else the shipped default's."""
    path = path or config.calibration
    return GainModel.load(path) if path is not None else default_gain_model(model_name)


@dataclass(frozen=True)
class Plan:
    steps: int  # training steps to take (0: serve the base model)
    predicted_gain: float  # predicted BPB gain of those steps
    reason: str
    budget: int  # the budget the plan was made for
    available: int  # picks available after adaptive truncation


def plan(
    selection: Selection,
    budget: int,
    config: PolicyConfig | None = None,
    gain_model: GainModel | None = None,
    mode: Mode | None = None,
) -> Plan:
    """How many of `selection`'s picks to train on, within `budget` steps."""
    config = config or PolicyConfig()
    mode = mode or config.mode
    if isinstance(budget, bool) or int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    budget = int(budget)
    kept = selection.stop_adaptive(config.alpha) if config.alpha is not None else selection
    available = len(kept)

    def gain(n: int) -> float:
        if gain_model is None or n == 0:
            return 0.0
        return float(gain_model.predict(kept.variances[0] - kept.variances[n]))

    def make(steps: int, reason: str) -> Plan:
        return Plan(
            steps=steps, predicted_gain=gain(steps), reason=reason, budget=budget, available=available
        )

    refusal = _refused_by_request(mode, budget)
    if refusal is not None:
        return make(0, refusal)
    if available == 0:
        if len(selection) == 0:
            return make(0, "no training data was selected")
        return make(
            0, f"adaptive SIFT stop (alpha={config.alpha:g}): the data cannot reduce the uncertainty enough"
        )
    most = min(budget, available)
    if mode == "always":
        return make(
            most, f"mode always: spend the budget ({most} of {budget} steps, {available} picks available)"
        )
    if gain_model is None:
        return make(most, f"no gain model calibrated: train on {most} picks within the budget")
    best = gain(most)
    threshold = config.min_gain_bpb if config.min_gain_bpb is not None else gain_model.min_gain_bpb or 0.0
    if best < threshold:
        return make(
            0, f"predicted gain {best:.4f} bpb at {most} steps is below the {threshold:.4g} bpb threshold"
        )
    gains = np.array([gain(n) for n in range(1, most + 1)])
    steps = int(np.argmax(gains >= config.gain_fraction * best)) + 1
    return make(
        steps,
        f"{steps} steps reach {gains[steps - 1] / best:.0%} of the predicted gain at {most} steps ({best:.4f} bpb)",
    )


def _refused_by_request(mode: Mode, budget: int) -> str | None:
    """Why the request's own settings rule training out (None: they allow it)."""
    if mode == "off":
        return "test-time training is off"
    if budget == 0:
        return "compute budget is 0"
    return None


class Policy:
    """The configured policy with its gain model: the one place that decides whether and how much to train."""

    def __init__(self, config: PolicyConfig | None = None, gain_model: GainModel | None = None):
        self.config = config or PolicyConfig()
        self.gain_model = gain_model

    def skip_before_retrieval(
        self, mode: Mode | None, budget: int, query: str, can_retrieve: bool
    ) -> str | None:
        """Why to serve the base model without even retrieving (None: retrieve, then `plan`)."""
        refusal = _refused_by_request(mode or self.config.mode, budget)
        if refusal is not None:
            return refusal
        if not can_retrieve:
            return "no datastore is configured"
        if not query.strip():
            return "the prompt has no text to retrieve for"
        return None

    def plan(self, selection: Selection, budget: int, mode: Mode | None = None) -> Plan:
        return plan(selection, budget, self.config, self.gain_model, mode)
