"""How close the step-planning policy comes to the best any policy could do, on recorded evaluations.

    .venv/bin/python benchmarks/policy_frontier.py results/heldout-pile/results.json [more results.json ...]
    .venv/bin/python benchmarks/policy_frontier.py --calibration my-calibration.json results/x/results.json

For each `ttserve eval` result (run with SIFT at several step counts, so it records each prompt's variance
trajectory and realised gains) it replays, without training anything:

- **policy**: the calibrated policy (`ttserve.policy.plan` with the gain model and its fitted skip threshold
  and gain fraction): its share of the budget's steps and the share of the full-budget gain it keeps;
- **ranking only**: the best the gain model's ranking of prompts allows: train the prompts with the highest
  predicted gain for the whole budget, skipping the rest, just enough of them to keep `--keep`;
- **oracle**: the fewest steps that keep `--keep` of the gain when each prompt's own realised curve is known
  (each prompt gets 0 or one of the recorded step counts; exact, by dynamic programming over total steps).

The gap between the policy and the oracle is what a better predictor could win; the gap between the policy
and "ranking only" is what planning within a prompt wins or loses.
"""

from __future__ import annotations

import argparse

import numpy as np

from ttserve.config import PolicyConfig
from ttserve.evaluation import load_report
from ttserve.policy import DEFAULT_CALIBRATION, CalibrationPrompt, GainModel, full_budget_gain, plan
from ttserve.selection import Selection


def policy_share(prompts: list[CalibrationPrompt], model: GainModel, budget: int) -> tuple[float, float]:
    steps = gain = 0.0
    for p in prompts:
        selection = Selection(np.arange(len(p.variances) - 1), p.variances, 1.0, "sift")
        n = plan(selection, budget, PolicyConfig(), model).steps
        steps += n
        gain += p.weight * p.realised(n)
    return steps / (budget * len(prompts)), gain / full_budget_gain(prompts, budget)


def ranking_share(prompts: list[CalibrationPrompt], model: GainModel, budget: int, keep: float) -> float:
    predicted = [model.curve(p.variances, budget)[-1] for p in prompts]
    order = np.argsort(predicted)[::-1]
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", help="results.json files of `ttserve eval`")
    parser.add_argument("--calibration", default=None, help="gain model JSON (default: the default model's)")
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.9)
    args = parser.parse_args()
    model = GainModel.load(args.calibration or DEFAULT_CALIBRATION)
    print(
        f"| results | prompts | policy: steps / gain kept | ranking only: steps for {args.keep:.0%} | oracle: steps for {args.keep:.0%} |"
    )
    print("|---|---:|---:|---:|---:|")
    for path in args.results:
        prompts = load_report(path).calibration_prompts()
        steps, kept = policy_share(prompts, model, args.budget)
        ranking = ranking_share(prompts, model, args.budget, args.keep)
        oracle = oracle_share(prompts, args.budget, args.keep)
        print(f"| {path} | {len(prompts)} | {steps:.0%} / {kept:.1%} | {ranking:.0%} | {oracle:.0%} |")


if __name__ == "__main__":
    main()
