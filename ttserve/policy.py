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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ttserve.config import DEFAULT_MODEL, PACKAGED_MODEL, TINY_MODEL, PolicyConfig
from ttserve.contract import Mode
from ttserve.selection import Selection


@dataclass(frozen=True)
class GainModel:
    """Predicted BPB gain = slope · r^power · n^steps_power after n steps, where r = σ_0² − σ_n² is the
    uncertainty reduction of the first n picks (0 at r = 0).

    A power law through the origin: no reduction predicts no gain, and the fit can bend either way
    (diminishing returns for power < 1). The steps factor carries what r cannot: SIFT's σ_n² saturates
    within a few picks, while a real model keeps learning from further steps on the same picks' neighbours.
    Fitted by least squares in log space on checkpoints with positive gain; steps_power is 0 when the
    calibration runs have a single step count (or were fitted before it existed).
    """

    slope: float
    power: float = 1.0
    steps_power: float = 0.0
    # Skip training below this predicted gain at the budget, and otherwise take the fewest steps whose
    # predicted gain reaches `gain_fraction` of the gain at the budget. Both are fitted together
    # (`fit_policy`, `ttserve calibrate`): the cheapest pair that keeps a share of the calibration runs'
    # realised gain.
    min_gain_bpb: float | None = None
    gain_fraction: float | None = None
    model: str = ""  # the served model the calibration was measured on
    corpus: str = ""
    points: int = 0
    r2: float = float("nan")
    # The fitted policy's shares of the gain and of the steps on prompts it was not fitted on, estimated by
    # cross-validation over the calibration prompts (`ttserve calibrate --folds`); None: not estimated.
    cross_validated_gain_share: float | None = None
    cross_validated_steps_share: float | None = None

    def predict(self, reduction: float | np.ndarray, steps: float | np.ndarray = 1) -> float | np.ndarray:
        gain = self.slope * np.power(np.maximum(reduction, 0.0), self.power)
        return gain * np.power(np.maximum(steps, 1), self.steps_power) if self.steps_power else gain

    def curve(self, variances: np.ndarray, most: int) -> np.ndarray:
        """Predicted gain after 1..most steps on picks with posterior variances σ_0², σ_1², ... ."""
        steps = np.arange(1, most + 1)
        return np.asarray(self.predict(variances[0] - variances[steps], steps), dtype=float)

    @classmethod
    def fit(
        cls,
        reductions: np.ndarray,
        gains: np.ndarray,
        steps: np.ndarray | None = None,
        model: str = "",
        corpus: str = "",
    ) -> GainModel:
        reductions, gains = np.asarray(reductions, dtype=float), np.asarray(gains, dtype=float)
        steps = np.ones_like(reductions) if steps is None else np.asarray(steps, dtype=float)
        usable = (reductions > 0) & (gains > 0) & (steps > 0)
        if usable.sum() < 2:
            raise ValueError(
                f"need at least two runs with positive gain and reduction to fit, got {int(usable.sum())}"
            )
        y = np.log(gains[usable])
        columns = [np.ones(int(usable.sum())), np.log(reductions[usable])]
        if np.ptp(steps[usable]) > 0:  # one step count says nothing about steps
            columns.append(np.log(steps[usable]))
        x = np.stack(columns, axis=1)
        coefficients = np.linalg.lstsq(x, y, rcond=None)[0]
        if len(coefficients) > 2 and coefficients[2] < 0:
            # Within a prompt, reduction and steps grow together, so a negative steps exponent only trades
            # off against a steeper reduction exponent: it would predict that training longer on the same
            # information loses gain, and plans would shrink as budgets grow. Fit the reduction alone then.
            x = x[:, :2]
            coefficients = np.linalg.lstsq(x, y, rcond=None)[0]
        residual = y - x @ coefficients
        r2 = 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum() or 1.0)
        return cls(
            slope=float(np.exp(coefficients[0])),
            power=float(coefficients[1]),
            steps_power=float(coefficients[2]) if len(coefficients) > 2 else 0.0,
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
        Used when the calibration runs carry no selection trajectories (`fit_policy` needs them).
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


@dataclass(frozen=True)
class CalibrationPrompt:
    """One calibration prompt for `fit_policy`: SIFT's trajectory and the gain realised at checkpoints."""

    variances: np.ndarray  # σ_0², σ_1², ... of its picks in order
    steps: np.ndarray  # checkpoint step counts, increasing
    gains: np.ndarray  # realised BPB gain at each checkpoint
    weight: float  # bytes

    def realised(self, n: int) -> float:
        """Realised gain after n steps, linear between checkpoints (0 at 0 steps)."""
        return float(np.interp(n, [0, *self.steps], [0.0, *self.gains]))

    def realised_at_budget(self, budget: int) -> float:
        """Realised gain of training for the whole budget (or on every pick, if there are fewer)."""
        return self.realised(min(budget, len(self.variances) - 1))


def full_budget_gain(prompts: Sequence[CalibrationPrompt], budget: int) -> float:
    """The byte-weighted gain of training every prompt for the whole budget: what a policy keeps a share of."""
    return float(sum(p.weight * p.realised_at_budget(budget) for p in prompts))


GAIN_FRACTIONS = np.round(np.arange(0.2, 1.0001, 0.05), 2)


def fit_policy(
    model: GainModel, prompts: list[CalibrationPrompt], budget: int, keep: float = 0.9
) -> GainModel:
    """The skip threshold and gain fraction that spend the fewest steps while keeping `keep` of the gain.

    Every pair (threshold, fraction) is replayed as `plan` decides (without an adaptive-SIFT stop) on the
    calibration prompts at `budget`; the realised gain of a planned step count comes from the prompt's
    checkpoints, linear in between. Of the pairs that keep
    `keep` of the gain of training every prompt for the whole budget, the one with the fewest steps wins
    (ties: more gain).
    """
    if not prompts:
        raise ValueError("no calibration prompts")
    weights = np.array([p.weight for p in prompts])
    full = full_budget_gain(prompts, budget)
    curves = [model.curve(p.variances, min(budget, len(p.variances) - 1)) for p in prompts]
    at_budget = np.array([c[-1] if len(c) else 0.0 for c in curves])  # what the threshold is compared to
    best: tuple[float, float, float, float] | None = None  # (steps, -gain, threshold, fraction)
    for fraction in GAIN_FRACTIONS:
        planned = np.array([_fewest_steps(c, fraction) for c in curves])
        realised = np.array([p.realised(n) for p, n in zip(prompts, planned, strict=True)])
        for threshold in np.unique([0.0, *at_budget]):
            trained = at_budget >= threshold
            gain = float((weights * realised)[trained].sum())
            if full > 0 and gain >= keep * full:
                candidate = (float(planned[trained].sum()), -gain, float(threshold), float(fraction))
                best = candidate if best is None or candidate < best else best
    if best is None:  # nothing keeps enough (no gain at all): train everything for the budget
        return replace(model, min_gain_bpb=0.0, gain_fraction=1.0)
    return replace(model, min_gain_bpb=best[2], gain_fraction=best[3])


@dataclass(frozen=True)
class Replay:
    """What a policy spent and kept on recorded prompts (`replay`); replays of disjoint prompts add up."""

    steps: float  # steps planned
    full_steps: float  # steps of training every prompt for the whole budget
    gain: float  # realised gain of the plans, bytes-weighted
    full_gain: float  # realised gain of training every prompt for the whole budget

    @property
    def steps_share(self) -> float:
        return self.steps / self.full_steps if self.full_steps else float("nan")

    @property
    def gain_share(self) -> float:
        return self.gain / self.full_gain if self.full_gain else float("nan")

    def __add__(self, other: Replay) -> Replay:
        return Replay(
            self.steps + other.steps,
            self.full_steps + other.full_steps,
            self.gain + other.gain,
            self.full_gain + other.full_gain,
        )


def replay(model: GainModel, prompts: Sequence[CalibrationPrompt], budget: int) -> Replay:
    """Plan every recorded prompt as a request with `budget` would be (`plan`, default config), and read
    the realised gain of each plan off the prompt's checkpoints."""
    steps = gain = 0.0
    for p in prompts:
        selection = Selection(np.arange(len(p.variances) - 1), p.variances, 1.0, "sift")
        n = plan(selection, budget, PolicyConfig(), model).steps
        steps += n
        gain += p.weight * p.realised(n)
    return Replay(steps, budget * len(prompts), gain, full_budget_gain(prompts, budget))


def _fewest_steps(curve: np.ndarray, fraction: float) -> int:
    if len(curve) == 0:
        return 0
    return int(np.argmax(curve >= fraction * curve[-1])) + 1


# Calibrations shipped for the embedded models, each on its default datastore (`ttserve calibrate`,
# BENCHMARKS.md "Adaptive policy").
CALIBRATIONS = {
    PACKAGED_MODEL: Path(__file__).parent / "calibration" / "smollm2-135m-instruct.json",
    TINY_MODEL: Path(__file__).parent / "calibration" / "tiny-stdlib.json",
}
DEFAULT_CALIBRATION = CALIBRATIONS[DEFAULT_MODEL]


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

    most = min(budget, available)
    # Predicted gain after 1..most steps, one formula for the plan and the number it reports.
    gains = gain_model.curve(kept.variances, most) if gain_model is not None else np.zeros(most)

    def gain(n: int) -> float:
        return float(gains[n - 1]) if n else 0.0

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
    fraction = config.gain_fraction or gain_model.gain_fraction or 1.0
    steps = _fewest_steps(gains, fraction)
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
