"""Would a plan-time feature besides SIFT's uncertainty reduction rank prompts better for the skip decision?

    .venv/bin/python benchmarks/policy_features.py --data results/pile-tuning.jsonl results/calib-pile/results.json
    .venv/bin/python benchmarks/policy_features.py --data results/pile-heldout.jsonl results/heldout-pile-bf16/results.json

For each `ttserve eval` result (SIFT at several step counts) and the JSONL its documents came from, it ranks
the prompts by a score and reports "ranking only" as policy_frontier.py does: the share of the steps that
training the top-ranked prompts for the whole budget needs to keep `--keep` of the byte-weighted gain.
Scores: the shipped gain model's prediction alone and divided or multiplied by a feature a planner (or, for
the base BPB, a generator) could compute before training: the prompt's bytes, the base model's BPB on it
(one forward pass), its zlib bits per byte, and the embedder's tokens per byte (how fragmented MiniLM finds
it). A feature earns a place in the gain model only if it ranks better on held-out results, not only on
the tuning split it was found on.
"""

from __future__ import annotations

import argparse
import json
import zlib

import numpy as np
from policy_frontier import oracle_share, predicted_gains, ranking_share
from scipy.stats import spearmanr
from transformers import AutoTokenizer

from ttserve.config import DEFAULT_EMBEDDER
from ttserve.embedding import resolve_model_path
from ttserve.evaluation import load_report
from ttserve.policy import DEFAULT_CALIBRATION, GainModel
from ttserve.scoring import bits_per_byte


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", help="results.json of `ttserve eval --data DATA --strategies sift ...`")
    parser.add_argument("--data", required=True, help="the JSONL the evaluation read (ids and texts)")
    parser.add_argument("--calibration", default=None, help="gain model JSON (default: the default model's)")
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.9)
    args = parser.parse_args()
    texts = {}
    with open(args.data) as lines:
        for line in lines:
            record = json.loads(line)
            texts[record["id"]] = record["text"]
    report = load_report(args.results)
    documents = [d for d in report.documents if d.variances.get("sift")]
    prompts = report.calibration_prompts()
    model = GainModel.load(args.calibration or DEFAULT_CALIBRATION)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_EMBEDDER))

    predicted = np.array(predicted_gains(prompts, model, args.budget))
    weights = np.array([p.weight for p in prompts])
    gains = np.array([p.realised_at_budget(args.budget) for p in prompts])
    raw = [texts[d.id].encode() for d in documents]
    base = np.array([bits_per_byte(d.base_loglik, d.bytes) for d in documents])
    compressed = np.array([8 * len(zlib.compress(b, 9)) / len(b) for b in raw])
    fragmented = np.array(
        [
            len(tokenizer(texts[d.id], add_special_tokens=False)["input_ids"]) / len(b)
            for d, b in zip(documents, raw, strict=True)
        ]
    )
    scores = {
        "predicted gain (the gain model)": predicted,
        "predicted × bytes": predicted * weights,
        "predicted / base BPB": predicted / base,
        "predicted / zlib bits per byte": predicted / compressed,
        "predicted / embedder tokens per byte": predicted / fragmented,
        "bytes alone": weights,
        "− base BPB alone": -base,
    }
    print(
        f"{args.results}: {len(prompts)} prompts, oracle {oracle_share(prompts, args.budget, args.keep):.0%}"
    )
    print(f"| score | ranking only: steps for {args.keep:.0%} | Spearman with the realised gain |")
    print("|---|---:|---:|")
    for name, score in scores.items():
        share = ranking_share(prompts, score, args.budget, args.keep)
        print(f"| {name} | {share:.0%} | {spearmanr(score, gains)[0]:.2f} |")


if __name__ == "__main__":
    main()
