"""The budget policy: how many steps to train, never more than the budget, zero when not worth it."""

from __future__ import annotations

import numpy as np
import pytest

from ttserve.config import DEFAULT_MODEL, PolicyConfig
from ttserve.policy import (
    CALIBRATIONS,
    DEFAULT_CALIBRATION,
    CalibrationPrompt,
    GainModel,
    default_gain_model,
    fit_policy,
    plan,
)
from ttserve.selection import Selection, sift


def trajectory(variances) -> Selection:
    variances = np.asarray(variances, dtype=float)
    return Selection(np.arange(len(variances) - 1), variances, 0.01, "sift")


DIMINISHING = trajectory([1.0, 0.6, 0.45, 0.38, 0.35, 0.34, 0.335, 0.333, 0.332])
LINEAR = GainModel(slope=0.5, power=1.0)


def test_budget_zero_and_mode_off_never_train():
    assert plan(DIMINISHING, 0, gain_model=LINEAR).steps == 0
    assert "budget is 0" in plan(DIMINISHING, 0, gain_model=LINEAR).reason
    off = plan(DIMINISHING, 8, PolicyConfig(mode="off"), LINEAR)
    assert off.steps == 0 and "off" in off.reason


def test_always_spends_the_budget_but_not_more_than_the_picks():
    assert plan(DIMINISHING, 5, PolicyConfig(mode="always"), LINEAR).steps == 5
    assert plan(DIMINISHING, 100, PolicyConfig(mode="always"), LINEAR).steps == 8


def test_auto_takes_the_fewest_steps_reaching_the_gain_fraction():
    result = plan(DIMINISHING, 8, PolicyConfig(gain_fraction=0.9), LINEAR)
    gains = 0.5 * (1.0 - DIMINISHING.variances[1:])
    expected = int(np.argmax(gains >= 0.9 * gains[-1])) + 1
    assert result.steps == expected == 3
    assert result.predicted_gain == pytest.approx(gains[2])
    assert plan(DIMINISHING, 8, PolicyConfig(gain_fraction=1.0), LINEAR).steps == 8


def test_auto_skips_training_when_the_predicted_gain_is_small():
    flat = trajectory([1.0, 0.999, 0.998, 0.998])
    result = plan(flat, 3, PolicyConfig(min_gain_bpb=0.01), LINEAR)
    assert result.steps == 0 and "below" in result.reason


def test_adaptive_stop_truncates_before_planning():
    # alpha * n * sigma_n <= 1 holds for n = 1, 2 only (sigma_3 = sqrt(0.38) ~ 0.62: 3 * 0.62 * 0.6 > 1).
    result = plan(DIMINISHING, 8, PolicyConfig(alpha=0.6, gain_fraction=1.0), LINEAR)
    assert result.available == 2 and result.steps == 2
    nothing = plan(DIMINISHING, 8, PolicyConfig(alpha=5.0), LINEAR)
    assert nothing.steps == 0 and "adaptive SIFT stop" in nothing.reason


def test_without_a_gain_model_auto_trains_within_the_budget():
    assert plan(DIMINISHING, 4).steps == 4


@pytest.mark.parametrize("seed", range(20))
def test_never_exceeds_the_budget(seed):
    rng = np.random.default_rng(seed)
    candidates = rng.standard_normal((40, 8))
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    selection = sift(candidates, candidates[:2].mean(0), int(rng.integers(0, 30)))
    budget = int(rng.integers(0, 40))
    for mode in ("auto", "always", "off"):
        config = PolicyConfig(mode=mode, alpha=float(rng.uniform(0.2, 3)) if seed % 2 else None)
        result = plan(
            selection,
            budget,
            config,
            GainModel(slope=float(rng.uniform(0.01, 1)), power=float(rng.uniform(0.3, 2))),
        )
        assert 0 <= result.steps <= min(budget, len(selection))
        assert result.reason


@pytest.mark.parametrize("budget", [-1, 2.5, True, "3"])
def test_invalid_budget(budget):
    with pytest.raises((ValueError, TypeError)):
        plan(DIMINISHING, budget)


def test_gain_model_fit_recovers_a_power_law(tmp_path):
    rng = np.random.default_rng(0)
    reductions = rng.uniform(0.01, 0.8, 200)
    gains = 0.3 * reductions**0.7 * np.exp(rng.normal(0, 0.05, 200))
    model = GainModel.fit(
        np.concatenate([reductions, [0.5, 0.0]]), np.concatenate([gains, [-0.1, 0.2]]), model="m"
    )
    assert model.slope == pytest.approx(0.3, rel=0.05) and model.power == pytest.approx(0.7, abs=0.03)
    assert model.points == 200 and model.r2 > 0.9
    model.save(tmp_path / "gain.json")
    assert GainModel.load(tmp_path / "gain.json") == model
    with pytest.raises(ValueError, match="at least two"):
        GainModel.fit(np.array([0.1]), np.array([0.2]))


def test_every_embedded_model_ships_a_calibration_and_no_other_model_gets_one():
    assert default_gain_model("some/other-model") is None
    assert DEFAULT_CALIBRATION == CALIBRATIONS[DEFAULT_MODEL]
    for name, path in CALIBRATIONS.items():
        model = default_gain_model(name)
        assert isinstance(model, GainModel) and model.slope > 0, path
    assert default_gain_model(None) == default_gain_model(DEFAULT_MODEL)


def test_threshold_keeps_the_requested_share_of_the_gain():
    rng = np.random.default_rng(1)
    reductions = rng.uniform(0.05, 0.9, 100)
    gains = 0.3 * reductions * np.exp(rng.normal(0, 0.3, 100))
    weights = rng.integers(100, 2000, 100).astype(float)
    model = GainModel(slope=0.3, power=1.0).with_threshold(reductions, gains, weights, keep=0.9)
    predicted = model.predict(reductions)
    kept = (gains * weights)[predicted >= model.min_gain_bpb].sum() / (gains * weights).sum()
    assert kept >= 0.9
    # The largest such threshold: one notch higher would fall below 90%.
    higher = np.sort(predicted)[np.searchsorted(np.sort(predicted), model.min_gain_bpb) + 1]
    assert (gains * weights)[predicted >= higher].sum() / (gains * weights).sum() < 0.9


def test_policy_uses_the_calibrated_threshold_unless_configured():
    model = GainModel(
        slope=0.5, power=1.0, min_gain_bpb=0.4
    )  # predicted gain at 8 steps: 0.5 * 0.668 = 0.334
    assert plan(DIMINISHING, 8, PolicyConfig(), model).steps == 0
    assert (
        plan(DIMINISHING, 8, PolicyConfig(min_gain_bpb=0.1), model).steps == 8
    )  # gain_fraction 1.0: the budget
    assert plan(DIMINISHING, 8, PolicyConfig(), GainModel(slope=0.5)).steps == 8


def test_fit_recovers_a_gain_that_grows_with_steps_as_well_as_reduction():
    rng = np.random.default_rng(2)
    steps = rng.choice([4, 8, 16], 200).astype(float)
    reductions = rng.uniform(0.05, 0.8, 200)
    gains = 0.2 * reductions**0.5 * steps**0.4 * np.exp(rng.normal(0, 0.05, 200))
    model = GainModel.fit(reductions, gains, steps)
    assert model.slope == pytest.approx(0.2, rel=0.1)
    assert (model.power, model.steps_power) == (pytest.approx(0.5, abs=0.03), pytest.approx(0.4, abs=0.03))
    assert model.r2 > 0.9
    # One step count cannot say anything about steps: the steps term is left out, not made up.
    assert GainModel.fit(reductions, gains, np.full(200, 8.0)).steps_power == 0.0
    # Nor is a negative one (more steps on the same information losing gain): the reduction alone is fitted.
    shrinking = GainModel.fit(reductions, 0.2 * reductions**0.5 * steps**-0.3, steps)
    assert shrinking.steps_power == 0.0 and shrinking.power == pytest.approx(
        GainModel.fit(reductions, 0.2 * reductions**0.5 * steps**-0.3).power
    )


def test_auto_plans_an_intermediate_step_count_when_the_predicted_gain_flattens():
    # σ² saturates after a few picks and the steps term grows slowly: the plan stops in between.
    model = GainModel(slope=0.5, power=1.0, steps_power=0.2, gain_fraction=0.85)
    result = plan(DIMINISHING, 8, PolicyConfig(), model)
    curve = model.curve(DIMINISHING.variances, 8)
    assert 1 < result.steps < 8
    assert curve[result.steps - 1] >= 0.85 * curve[-1] > curve[result.steps - 2]
    assert result.predicted_gain == pytest.approx(curve[result.steps - 1])
    # A prompt whose uncertainty keeps falling gets more of the budget than one that flattens early.
    steady = trajectory(np.linspace(1.0, 0.2, 9))
    assert plan(steady, 8, PolicyConfig(), model).steps > result.steps
    # The request's config overrides the calibrated fraction.
    assert plan(DIMINISHING, 8, PolicyConfig(gain_fraction=1.0), model).steps == 8


def calibration_prompts(rng, n=40):
    """Prompts whose realised gain saturates with steps, in proportion to how much SIFT reduced."""
    prompts = []
    for _ in range(n):
        scale = rng.uniform(0.0, 1.0)
        variances = 1.0 - scale * (1 - np.exp(-np.arange(17) / 3.0))
        steps = np.array([4, 8, 16])
        gains = 0.3 * scale * (1 - np.exp(-steps / 2.0)) + rng.normal(0, 0.005, 3)
        prompts.append(CalibrationPrompt(variances, steps, gains, weight=float(rng.integers(100, 1000))))
    return prompts


def test_fit_policy_finds_the_cheapest_policy_that_keeps_the_gain():
    prompts = calibration_prompts(np.random.default_rng(3))
    model = GainModel(slope=0.3, power=1.0, steps_power=0.0)
    fitted = fit_policy(model, prompts, budget=16, keep=0.9)
    assert 0 < fitted.gain_fraction < 1 and fitted.min_gain_bpb > 0

    def replay(gain_model):
        steps, gain = 0, 0.0
        for p in prompts:
            chosen = plan(Selection(np.arange(16), p.variances, 1.0, "sift"), 16, PolicyConfig(), gain_model)
            steps += chosen.steps
            gain += p.weight * p.realised(chosen.steps)
        return steps, gain

    full_gain = sum(p.weight * p.realised(16) for p in prompts)
    steps, gain = replay(fitted)
    assert gain >= 0.9 * full_gain and steps < 0.6 * 16 * len(prompts)
    # Asking to keep more costs more steps, never fewer.
    assert replay(fit_policy(model, prompts, budget=16, keep=0.99))[0] >= steps
