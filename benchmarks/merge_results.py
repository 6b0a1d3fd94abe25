"""Pool `ttserve eval` runs into one report: more documents (a split evaluated in parts), other strategies
on the same documents (kNN and SIFT run separately), or both.

    .venv/bin/python benchmarks/merge_results.py results/heldout-pile-rule/results.json \
        results/heldout-pile-rule-knn/results.json results/heldout-pile-rule-71-90/results.json \
        results/heldout-pile-rule-knn-71-90/results.json --out results/heldout-pile-rule-60

Documents are matched by id; the runs must share their step counts, and no document may have the same
strategy (or the adaptive policy) from two runs. `--strategies sift` pools only those strategies, for runs
that evaluated different sets (SIFT alone here, SIFT and kNN there). It writes results.json, results.csv
and bpb.png as `ttserve eval` does and prints the summary (byte-weighted BPB, the adaptive policy with its
bootstrap interval, per-document wins).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ttserve.contract import STRATEGIES
from ttserve.evaluation import DocumentResult, EvalReport, load_report


def merge(reports: list[EvalReport], only: set[str] | None = None) -> EvalReport:
    steps = reports[0].config["steps"]
    if any(r.config["steps"] != steps for r in reports):
        raise SystemExit(f"the runs have different step counts: {[r.config['steps'] for r in reports]}")
    documents: dict[str, DocumentResult] = {}
    for report in reports:
        for d in report.documents:
            if only is not None:
                d = replace(d, runs={s: c for s, c in d.runs.items() if s in only})
            kept = documents.setdefault(d.id, d)
            if kept is d:
                continue
            if kept.bytes != d.bytes or kept.base_loglik != d.base_loglik:
                raise SystemExit(f"{d.id}: two runs scored different texts or base models")
            if set(kept.runs) & set(d.runs) or (kept.adaptive and d.adaptive):
                raise SystemExit(f"{d.id}: the same strategy in two runs")
            kept.runs.update(d.runs)
            kept.picks.update(d.picks)
            kept.variances.update(d.variances)
            kept.near_duplicates.update(d.near_duplicates)
            if d.adaptive is not None:
                kept.adaptive, kept.adaptive_reason = d.adaptive, d.adaptive_reason
    present = {s for d in documents.values() for s in d.runs}
    strategies = [s for s in STRATEGIES if s in present]
    if any(set(d.runs) != present for d in documents.values()):
        raise SystemExit(f"not every document has every strategy ({', '.join(strategies)})")
    return EvalReport(
        config={**reports[0].config, "strategies": strategies}, documents=list(documents.values())
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of `ttserve eval`")
    parser.add_argument("--out", type=Path, required=True, help="directory for the pooled report")
    parser.add_argument("--strategies", help="pool only these, comma-separated (default: every one)")
    args = parser.parse_args()
    only = set(args.strategies.split(",")) if args.strategies else None
    if only is not None and not only <= set(STRATEGIES):
        parser.error(f"--strategies takes {', '.join(STRATEGIES)}, not {args.strategies}")
    report = merge([load_report(path) for path in args.results], only)
    report.write(args.out, report.config.get("model", ""))
    print(json.dumps(report.summary(), indent=1))


if __name__ == "__main__":
    main()
