"""How close the step-planning policy comes to the best any policy could do, on recorded evaluations.

    .venv/bin/python benchmarks/policy_frontier.py results/heldout-pile/results.json [more results.json ...]
    .venv/bin/python benchmarks/policy_frontier.py --calibration my-calibration.json results/x/results.json
    .venv/bin/python benchmarks/policy_frontier.py --fit results/calib-pile/results.json results/heldout-pile/results.json

For each `ttserve eval` result (run with SIFT at several step counts, so it records each prompt's variance
trajectory and realised gains) it replays, without training anything:

- **policy**: the calibrated policy (`ttserve.policy.plan` with the gain model and its fitted skip threshold
  and gain fraction): its share of the budget's steps and the share of the full-budget gain it keeps;
- **ranking only**: the best the gain model's ranking of prompts allows: train the prompts with the highest
  predicted gain for the whole budget, skipping the rest, just enough of them to keep `--keep`;
- **oracle**: the fewest steps that keep `--keep` of the gain when each prompt's own realised curve is known
  (each prompt gets 0 or one of the recorded step counts; exact, by dynamic programming over total steps);
- **probe** (with `--fit`): a policy that looks at the prompt itself after a few steps. Skip the prompts
  whose predicted gain is below t1; train the others `--probe-steps`, measure the prompt's own BPB gain so
  far (two forward passes over it, counted as `--probe-cost` steps), and train on to the whole budget only
  if that gain is at least t2. With `--tiered`, prompts predicted at t_full or more train the whole budget
  without a probe. The thresholds are fitted on the `--fit` results (the tuning split) to keep `--keep` of
  the gain there with the fewest steps, then replayed on each results file.

The gap between the policy and the oracle is what a better predictor could win; the gap between the policy
and "ranking only" is what planning within a prompt wins or loses.

A plan's realised gain is read off the prompt's checkpoints, linear in between. Under a learning rate per
plan length (`training.learning_rate_steps`) each checkpoint is its own run, so a plan between two
checkpoints is an estimate, and the probe's "train on from the probe" assumes one rate for every length
(the runs it was written for).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence

import numpy as np

from ttserve.evaluation import load_report
from ttserve.policy import DEFAULT_CALIBRATION, CalibrationPrompt, GainModel, full_budget_gain, replay


def predicted_gains(prompts: list[CalibrationPrompt], model: GainModel, budget: int) -> list[float]:
    return [float(model.curve(p.variances, budget)[-1]) for p in prompts]


def ranking_share(
    prompts: list[CalibrationPrompt], scores: Sequence[float], budget: int, keep: float
) -> float:
    """The share of prompts that training the highest-scored ones for the whole budget needs to keep `keep`."""
    order = np.argsort(scores)[::-1]
    target, kept = keep * full_budget_gain(prompts, budget), 0.0
    for trained, i in enumerate(order, start=1):
        kept += prompts[i].weight * prompts[i].realised_at_budget(budget)
        if kept >= target:
            return trained / len(prompts)
    return 1.0


def oracle_share(prompts: list[CalibrationPrompt], budget: int, keep: float) -> float:
    best = {0: 0.0}  # total steps -> most gain
    for p in prompts:
        options = [0, *[int(n) for n in p.steps if n <= budget]]
        merged: dict[int, float] = {}
        for used, gain in best.items():
            for n in options:
                value = gain + p.weight * p.realised(n)
                if merged.get(used + n, -np.inf) < value:
                    merged[used + n] = value
        best = merged
    target = keep * full_budget_gain(prompts, budget)
    return min(used for used, gain in best.items() if gain >= target) / (budget * len(prompts))


def probe_share(
    prompts: list[CalibrationPrompt],
    predicted: Sequence[float],
    budget: int,
    probe: int,
    cost: float,
    thresholds: tuple[float, float, float],
) -> tuple[float, float]:
    """The probe policy's share of the steps and of the gain. `predicted`: each prompt's predicted gain at
    the budget; `thresholds`: (t1, t2, t_full), where a prediction of at least t_full trains the whole
    budget without a probe (infinite: every trained prompt is probed)."""
    t1, t2, t_full = thresholds
    steps = gain = 0.0
    for p, expected in zip(prompts, predicted, strict=True):
        if expected < t1:
            continue
        if expected >= t_full:
            n, spent = budget, budget
        else:
            n = budget if p.realised(probe) >= t2 else probe
            spent = n + cost
        steps += spent
        gain += p.weight * p.realised(n)
    return steps / (budget * len(prompts)), gain / full_budget_gain(prompts, budget)


def fit_probe(
    prompts: list[CalibrationPrompt],
    predicted: Sequence[float],
    budget: int,
    probe: int,
    cost: float,
    keep: float,
    tiered: bool,
) -> tuple[float, float, float]:
    """(t1, t2, t_full) on a grid (0.01 BPB; t_full 0.02, or infinite unless `tiered`): the fewest steps
    that keep `keep` of the gain on `prompts`."""
    grid = np.round(np.arange(0.0, 0.3, 0.01), 2)
    full = [*np.round(np.arange(0.0, 0.5, 0.02), 2), np.inf] if tiered else [np.inf]
    best, chosen = np.inf, (0.0, 0.0, np.inf)
    for thresholds in itertools.product(grid, grid, full):
        if thresholds[2] < thresholds[0]:
            continue
        steps, kept = probe_share(prompts, predicted, budget, probe, cost, thresholds)
        if kept >= keep and steps < best:
            best, chosen = steps, thresholds
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", help="results.json files of `ttserve eval`")
    parser.add_argument("--calibration", default=None, help="gain model JSON (default: the default model's)")
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.9)
    parser.add_argument("--fit", nargs="*", default=[], help="results.json files to fit the probe policy on")
    parser.add_argument("--probe-steps", type=int, default=4)
    parser.add_argument("--probe-cost", type=float, default=2 / 3, help="the probe's cost, in training steps")
    parser.add_argument(
        "--tiered",
        action="store_true",
        help="also fit t_full: prompts predicted above it train fully, unprobed",
    )
    args = parser.parse_args()
    model = GainModel.load(args.calibration or DEFAULT_CALIBRATION)
    probe = None
    if args.fit:
        tuning = [p for path in args.fit for p in load_report(path).calibration_prompts()]
        probe = fit_probe(
            tuning,
            predicted_gains(tuning, model, args.budget),
            args.budget,
            args.probe_steps,
            args.probe_cost,
            args.keep,
            args.tiered,
        )
        t1, t2, t_full = probe
        print(f"probe after {args.probe_steps} steps, fitted on {len(tuning)} prompts:", end=" ")
        print(f"t1 {t1:.2f}, t2 {t2:.2f}, t_full {t_full:.2f}")
    header = f"| results | prompts | policy: steps / gain kept | ranking only: steps for {args.keep:.0%} | oracle: steps for {args.keep:.0%} |"
    print(header + (" probe: steps / gain kept |" if probe else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if probe else ""))
    for path in args.results:
        prompts = load_report(path).calibration_prompts()
        policy = replay(model, prompts, args.budget)
        ranking = ranking_share(prompts, predicted_gains(prompts, model, args.budget), args.budget, args.keep)
        oracle = oracle_share(prompts, args.budget, args.keep)
        row = f"| {path} | {len(prompts)} | {policy.steps_share:.0%} / {policy.gain_share:.1%} | {ranking:.0%} | {oracle:.0%} |"
        if probe:
            predicted = predicted_gains(prompts, model, args.budget)
            steps, kept = probe_share(
                prompts, predicted, args.budget, args.probe_steps, args.probe_cost, probe
            )
            row += f" {steps:.0%} / {kept:.1%} |"
        print(row)


if __name__ == "__main__":
    main()
