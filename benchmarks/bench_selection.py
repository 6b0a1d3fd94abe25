"""Per-query SIFT selection time: ttserve.selection.sift versus the reference library activeft (exact VTL).

Target (from the project's issue): at K=200 candidates, N=50 picks, d=1024 and d=384, ttserve makes the
same picks as activeft's exact VTL (up to ties between identical duplicates) and is at least 40x faster.

Environment. activeft is NOT a dependency of ttserve; it lives only in a separate benchmark venv:

    python3.11 -m venv .venv-bench
    .venv-bench/bin/pip install -c constraints/cpu.txt -e ".[cpu]" -r benchmarks/requirements.txt

(constraints/cpu.txt pins torch==2.13.0, the CPU build; never install an unpinned torch.)

Run (about 20 s on an idle 2-core VM; the last output line says how much CPU other processes took
during the run: on a shared machine, only trust timings when that is about 0%):

    .venv-bench/bin/python benchmarks/bench_selection.py --json results/bench_selection.json

What is measured.
- Inputs: R synthetic query problems per d (fixed seeds). Each has one L2-normalised query q and K
  L2-normalised candidates: normalise(a*q + noise) with a drawn from [-0.5, 2] (cosine with q from about
  -0.45 to 0.9; negative ones model pre-selection by |inner product|), near-duplicates of relevant
  candidates (small perturbations, cosine ~0.98-0.999 with their parent) and exact float32 copies of
  relevant candidates (documents duplicated 2-4 times). Rows are shuffled. Both selectors get the very
  same float32 arrays.
- ttserve: sift(candidates, query, n=N, lam=lam) on numpy float32 inputs (float64 bookkeeping inside).
- activeft: exactly the per-query call of activeft.sift.Retriever.batch_search's `engine` with the
  acquisition function Retriever.__init__ builds for exact SIFT (fast=False):
      VTL(target=torch.Tensor(), num_workers=1, subsample=False, force_nonsequential=False,
          noise_std=np.sqrt(lam))
  set_target(torch.tensor(query[None])) and
  ActiveDataLoader(dataset=Dataset(torch.tensor(candidates)), batch_size=N, acquisition_function=...,
                   device=cpu).next()
  The acquisition function object is built once and re-targeted per query, as the Retriever does. The
  loader shuffles the candidates (torch DataLoader, shuffle=True) but returns original positions; torch
  is seeded per problem so runs are reproducible. The timed region includes the tensor conversions,
  as in `engine`; it excludes Faiss pre-selection (not part of either selector).
- Schedule: per d, warm-up calls, then --repeats rounds; in each round every selector runs over all
  problems back to back (blocked). Each reported time is one call; median and p90 are over all
  problems x repeats. Blocked rather than interleaved because activeft forks a DataLoader worker
  per call: a ttserve call made right after it in the same process pays ~300 copy-on-write page
  faults (+0.5-0.7 ms at d=1024), a cost of sharing the process with activeft, not of ttserve.
  --interleave measures that mode instead.
- Threads: torch.set_num_threads(T) and threadpoolctl limits every BLAS/OpenMP pool (numpy's OpenBLAS
  included) to T, T = --threads, default os.cpu_count().
- Agreement: a problem agrees when the two pick sequences select the same EMBEDDINGS at every step
  (np.allclose(candidates[picks_ttserve], candidates[picks_activeft])), so that choosing a different
  copy of an exact duplicate is not a disagreement. Both select WITH replacement.
- Values: activeft returns, per pick, the acquisition value of the picked point, which for VTL is
  -(summed posterior variance of the targets after adding that pick), computed in float32. That is
  -variances[1:] of ttserve's trajectory (ttserve also reports variances[0] = prior variance, which
  activeft has no counterpart for). We report max |variances[1:] + values| over agreeing problems.
- Exact reference: the same greedy rule run by ttserve on float64 copies of the inputs (Gram matrix and
  all updates in float64). We report how often each library's picks match it and the largest error of
  each library's σ² trajectory against the float64 trajectory of its own picks. For a disagreement we
  report the first differing step and the exact (float64) σ² after each library's pick on the common
  prefix: a gap far below both libraries' float32 error is a near-tie, not an algorithmic difference.
- Supplementary timings (skip with --no-supplementary): activeft with VTL(num_workers=0), i.e. without
  the per-query DataLoader worker process (not how its Retriever calls it; same picks), and ttserve on
  float64 inputs (the cost of a float64 Gram matrix).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from activeft import ActiveDataLoader
from activeft.acquisition_functions.vtl import VTL
from activeft.sift import Dataset as ActiveftDataset  # the Dataset class Retriever.batch_search uses
from threadpoolctl import threadpool_limits

from ttserve.selection import posterior_variances, sift

# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_problem(d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One query problem: (candidates [k, d] float32, query [d] float32), both L2-normalised."""
    rng = np.random.default_rng(seed)
    query = _normalise(rng.standard_normal(d))
    n_exact = k // 10  # exact copies (bit-identical rows)
    n_near = k // 5  # near-duplicates
    n_base = k - n_exact - n_near

    a = rng.uniform(-0.5, 2.0, n_base)  # relevance to the query
    base = _normalise(a[:, None] * query + rng.standard_normal((n_base, d)) / np.sqrt(d))

    # Near-duplicates of the more relevant half of the base set: perturbation of norm 0.05-0.2.
    relevant = np.argsort(-np.abs(base @ query))[: n_base // 2]
    parents = rng.choice(relevant, n_near)
    eps = rng.uniform(0.05, 0.2, n_near)[:, None]
    near = _normalise(base[parents] + eps * rng.standard_normal((n_near, d)) / np.sqrt(d))

    unique = np.concatenate([base, near]).astype(np.float32)
    # Exact copies: a few relevant documents duplicated 2-4 times (copies of float32 rows, so identical).
    top = np.argsort(-np.abs(unique.astype(np.float64) @ query))[:20]
    copies: list[int] = []
    while len(copies) < n_exact:
        copies += [int(rng.choice(top))] * int(rng.integers(1, 4))
    candidates = np.concatenate([unique, unique[copies[:n_exact]]])
    candidates = np.ascontiguousarray(candidates[rng.permutation(k)])
    return candidates, query.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# The two selectors
# --------------------------------------------------------------------------------------------------


def run_ttserve(
    candidates: np.ndarray, query: np.ndarray, n: int, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    selection = sift(candidates, query, n=n, lam=lam)
    return selection.indices, selection.variances


def make_activeft_vtl(lam: float, num_workers: int = 1) -> VTL:
    """The acquisition function activeft.sift.Retriever builds for exact SIFT (fast=False).

    num_workers=1 is the Retriever's setting: every query's torch DataLoader forks one worker process.
    num_workers=0 (loading in-process) is only used for the supplementary "no-fork" measurement.
    """
    return VTL(
        target=torch.Tensor(),
        num_workers=num_workers,
        subsample=False,
        force_nonsequential=False,
        noise_std=np.sqrt(lam),
    )


def run_activeft(
    vtl: VTL, candidates: np.ndarray, query: np.ndarray, n: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror of Retriever.batch_search's `engine` for one query (m = 1, no mean pooling)."""
    dataset = ActiveftDataset(torch.tensor(candidates))
    target = torch.tensor(query.reshape(1, -1))
    vtl.set_target(target)
    sub_indexes, values = ActiveDataLoader(
        dataset=dataset, batch_size=n, acquisition_function=vtl, device=device
    ).next()
    # sub_indexes are positions in `candidates` (the loader maps its shuffle back); engine would then
    # index its Faiss ids with them, here the ids are the positions themselves.
    return np.asarray(sub_indexes, dtype=np.int64), np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------


@dataclass
class ProblemResult:
    seed: int
    ttserve_ms: list[float] = field(default_factory=list)
    activeft_ms: list[float] = field(default_factory=list)
    activeft_nofork_ms: list[float] = field(default_factory=list)
    ttserve_f64_ms: list[float] = field(default_factory=list)
    agree: bool = False  # ttserve and activeft pick the same embeddings at every step
    same_indices: bool = False
    ttserve_exact: bool = False  # ttserve's picks equal the float64 reference's (as embeddings)
    activeft_exact: bool = False
    distinct_ttserve: int = 0
    distinct_activeft: int = 0
    max_abs_value_diff: float | None = None  # max |variances[1:] + values| (only when picks agree)
    ttserve_var_error: float = 0.0  # max |sigma^2 trajectory - float64 trajectory of the same picks|
    activeft_var_error: float = 0.0  # max |-values - float64 trajectory of the same picks|
    first_divergence: int | None = None
    # At the first differing step, after the common prefix: exact (float64) sigma^2 after each pick.
    var_after_ttserve_pick: float | None = None
    var_after_activeft_pick: float | None = None
    final_var_ttserve: float = 0.0  # exact (float64) sigma^2_N of each library's sequence
    final_var_activeft: float = 0.0
    deterministic: bool = True  # same picks (as embeddings) in every repeat, and with num_workers=0


def same_embeddings(candidates: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per step: do picks a[t] and b[t] have the same embedding (ties between exact copies are equal)."""
    return np.array([np.allclose(candidates[i], candidates[j]) for i, j in zip(a, b, strict=True)])


def compare(
    candidates: np.ndarray,
    query: np.ndarray,
    lam: float,
    res: ProblemResult,
    tt: tuple[np.ndarray, np.ndarray],
    aft: tuple[np.ndarray, np.ndarray],
) -> None:
    (tt_idx, tt_var), (aft_idx, aft_val) = tt, aft
    assert len(tt_idx) == len(aft_idx), (len(tt_idx), len(aft_idx))
    # The exact reference: the same greedy rule with the Gram matrix and every update in float64, on
    # float64 copies of the very same float32 inputs.
    c64, q64 = candidates.astype(np.float64), query.astype(np.float64)
    ref_idx = sift(c64, q64, n=len(tt_idx), lam=lam).indices
    same_step = same_embeddings(candidates, tt_idx, aft_idx)
    res.agree = bool(same_step.all())
    res.same_indices = bool(np.array_equal(tt_idx, aft_idx))
    res.ttserve_exact = bool(same_embeddings(candidates, tt_idx, ref_idx).all())
    res.activeft_exact = bool(same_embeddings(candidates, aft_idx, ref_idx).all())
    # Distinct picked EMBEDDINGS: N minus this is the number of repeat picks (selection with replacement).
    res.distinct_ttserve = len(np.unique(candidates[tt_idx], axis=0))
    res.distinct_activeft = len(np.unique(candidates[aft_idx], axis=0))
    tt_exact_var = posterior_variances(c64, q64, tt_idx, lam=lam)
    aft_exact_var = posterior_variances(c64, q64, aft_idx, lam=lam)
    res.ttserve_var_error = float(np.max(np.abs(tt_var - tt_exact_var)))
    res.activeft_var_error = float(np.max(np.abs(-aft_val - aft_exact_var[1:])))
    res.final_var_ttserve = float(tt_exact_var[-1])
    res.final_var_activeft = float(aft_exact_var[-1])
    if res.agree:
        res.max_abs_value_diff = float(np.max(np.abs(tt_var[1:] + aft_val)))
    else:
        t = int(np.flatnonzero(~same_step)[0])
        res.first_divergence = t
        prefix = list(tt_idx[:t])
        res.var_after_ttserve_pick = float(posterior_variances(c64, q64, prefix + [tt_idx[t]], lam=lam)[-1])
        res.var_after_activeft_pick = float(posterior_variances(c64, q64, prefix + [aft_idx[t]], lam=lam)[-1])


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def timed(sink: list[float], fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    sink.append((time.perf_counter() - t0) * 1e3)
    return out


def run_ttserve_f64(
    candidates: np.ndarray, query: np.ndarray, n: int, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Supplementary: ttserve with the Gram matrix in float64 (inputs upcast inside the timed call)."""
    selection = sift(candidates.astype(np.float64), query.astype(np.float64), n=n, lam=lam)
    return selection.indices, selection.variances


def bench_dimension(args: argparse.Namespace, d: int, device: torch.device) -> dict:
    seeds = [args.seed * 100_000 + d * 100 + r for r in range(args.problems)]
    problems = [make_problem(d, args.k, seed=s) for s in seeds]
    vtl = make_activeft_vtl(args.lam)
    vtl_nofork = make_activeft_vtl(args.lam, num_workers=0)

    # Warm-up: first calls pay for lazy initialisation (torch kernels, BLAS buffers, imports).
    for candidates, query in problems[: args.warmup]:
        run_ttserve(candidates, query, args.n, args.lam)
        torch.manual_seed(0)
        run_activeft(vtl, candidates, query, args.n, device)
        if args.supplementary:
            run_activeft(vtl_nofork, candidates, query, args.n, device)
            run_ttserve_f64(candidates, query, args.n, args.lam)

    results = [ProblemResult(seed=s) for s in seeds]

    def call(name: str, p: int):
        """One timed selection; returns (indices, variances or values), appends the time in ms."""
        (candidates, query), res = problems[p], results[p]
        if name == "ttserve":
            return timed(res.ttserve_ms, run_ttserve, candidates, query, args.n, args.lam)
        if name == "ttserve_f64":
            return timed(res.ttserve_f64_ms, run_ttserve_f64, candidates, query, args.n, args.lam)
        torch.manual_seed(res.seed)  # reproducible DataLoader shuffle (outside the timed region)
        if name == "activeft":
            return timed(res.activeft_ms, run_activeft, vtl, candidates, query, args.n, device)
        return timed(res.activeft_nofork_ms, run_activeft, vtl_nofork, candidates, query, args.n, device)

    names = ["ttserve", "activeft"] + (["activeft_nofork", "ttserve_f64"] if args.supplementary else [])
    outputs: dict[tuple[str, int], list] = {(name, p): [] for name in names for p in range(len(seeds))}
    for _ in range(args.repeats):
        # Blocked (default): each selector runs over all problems back to back, so neither inherits the
        # other's state. Interleaved: per problem, one call of each selector in turn.
        schedule = (
            [(name, p) for p in range(len(seeds)) for name in names]
            if args.interleave
            else [(name, p) for name in names for p in range(len(seeds))]
        )
        for name, p in schedule:
            outputs[name, p].append(call(name, p))

    for p, ((candidates, query), res) in enumerate(zip(problems, results, strict=True)):
        tt, aft = outputs["ttserve", p][0], outputs["activeft", p][0]
        compare(candidates, query, args.lam, res, tt, aft)
        # Same picks (as embeddings) in every repeat, and with num_workers=0 as with 1.
        for name, reference in (("ttserve", tt[0]), ("activeft", aft[0]), ("activeft_nofork", aft[0])):
            for out in outputs.get((name, p), []):
                res.deterministic &= bool(same_embeddings(candidates, out[0], reference).all())

    def times(attr: str) -> list[float]:
        return [t for r in results for t in getattr(r, attr)]

    tt_ms, aft_ms = times("ttserve_ms"), times("activeft_ms")
    nofork_ms, f64_ms = times("activeft_nofork_ms"), times("ttserve_f64_ms")
    value_diffs = [r.max_abs_value_diff for r in results if r.agree]
    summary = {
        "d": d,
        "problems": len(results),
        "timed_calls_per_library": len(tt_ms),
        "ttserve_median_ms": percentile(tt_ms, 50),
        "ttserve_p90_ms": percentile(tt_ms, 90),
        "activeft_median_ms": percentile(aft_ms, 50),
        "activeft_p90_ms": percentile(aft_ms, 90),
        "speedup_median": percentile(aft_ms, 50) / percentile(tt_ms, 50),
        "speedup_p90": percentile(aft_ms, 90) / percentile(tt_ms, 90),
        "activeft_nofork_median_ms": percentile(nofork_ms, 50) if nofork_ms else None,
        "activeft_nofork_p90_ms": percentile(nofork_ms, 90) if nofork_ms else None,
        "ttserve_f64_median_ms": percentile(f64_ms, 50) if f64_ms else None,
        "ttserve_f64_p90_ms": percentile(f64_ms, 90) if f64_ms else None,
        "agree": sum(r.agree for r in results),
        "agree_fraction": sum(r.agree for r in results) / len(results),
        "same_indices": sum(r.same_indices for r in results),
        "ttserve_exact": sum(r.ttserve_exact for r in results),
        "activeft_exact": sum(r.activeft_exact for r in results),
        "max_abs_value_diff": max(value_diffs) if value_diffs else None,
        "ttserve_max_var_error": max(r.ttserve_var_error for r in results),
        "activeft_max_var_error": max(r.activeft_var_error for r in results),
        "mean_distinct_picks_ttserve": float(np.mean([r.distinct_ttserve for r in results])),
        "mean_distinct_picks_activeft": float(np.mean([r.distinct_activeft for r in results])),
        "all_deterministic": all(r.deterministic for r in results),
        "disagreements": [
            {
                "seed": r.seed,
                "first_divergence": r.first_divergence,
                "var_after_ttserve_pick": r.var_after_ttserve_pick,
                "var_after_activeft_pick": r.var_after_activeft_pick,
                "ttserve_exact": r.ttserve_exact,
                "activeft_exact": r.activeft_exact,
                "final_var_ttserve": r.final_var_ttserve,
                "final_var_activeft": r.final_var_activeft,
            }
            for r in results
            if not r.agree
        ],
        "per_problem": [asdict(r) for r in results],
    }
    return summary


def _busy_cpu_seconds() -> float | None:
    """CPU-seconds all processes on the machine have been busy (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_description(threads: int) -> dict:
    model = ""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": model or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "activeft": importlib.metadata.version("activeft"),
        "ttserve": importlib.metadata.version("ttserve"),
    }


def markdown_table(summaries: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"K={args.k}, N={args.n}, lam={args.lam}, {args.problems} problems per d, "
        f"{args.repeats} timed calls per problem and library, {args.threads} threads; times are per query.",
        "",
        "| d | ttserve median | ttserve p90 | activeft median | activeft p90 | speedup (median) "
        "| speedup (p90) | same picks (embeddings) | same indices | max \\|σ²ₜ + valueₜ\\| |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        diff = "n/a" if s["max_abs_value_diff"] is None else f"{s['max_abs_value_diff']:.1e}"
        lines.append(
            f"| {s['d']} | {s['ttserve_median_ms']:.2f} ms | {s['ttserve_p90_ms']:.2f} ms "
            f"| {s['activeft_median_ms']:.1f} ms | {s['activeft_p90_ms']:.1f} ms "
            f"| {s['speedup_median']:.0f}x | {s['speedup_p90']:.0f}x "
            f"| {s['agree']}/{s['problems']} | {s['same_indices']}/{s['problems']} | {diff} |"
        )
    lines += [
        "",
        "Against the exact reference (the same greedy rule in float64 on float64 copies of the inputs): "
        "problems whose picks match it, and the largest error of each library's reported σ² trajectory "
        "against the float64 trajectory of its own picks.",
        "",
        "| d | ttserve = reference | activeft = reference | ttserve max σ² error | activeft max σ² error |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['d']} | {s['ttserve_exact']}/{s['problems']} | {s['activeft_exact']}/{s['problems']} "
            f"| {s['ttserve_max_var_error']:.1e} | {s['activeft_max_var_error']:.1e} |"
        )
    if args.supplementary:
        lines += [
            "",
            "Supplementary timings: activeft with its DataLoader loading in-process (VTL num_workers=0 instead "
            "of the Retriever's 1; same picks), and ttserve with float64 inputs (Gram matrix in float64).",
            "",
            "| d | activeft, no fork: median | p90 | ttserve, float64: median | p90 |",
            "|---|---|---|---|---|",
        ]
        for s in summaries:
            lines.append(
                f"| {s['d']} | {s['activeft_nofork_median_ms']:.1f} ms | {s['activeft_nofork_p90_ms']:.1f} ms "
                f"| {s['ttserve_f64_median_ms']:.2f} ms | {s['ttserve_f64_p90_ms']:.2f} ms |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 384])
    parser.add_argument("--k", type=int, default=200, help="candidates per query")
    parser.add_argument("--n", type=int, default=50, help="picks per query")
    parser.add_argument(
        "--lam", type=float, default=0.01, help="observation noise variance (activeft noise_std=sqrt)"
    )
    parser.add_argument("--problems", type=int, default=30, help="query problems per dimension")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per problem and library")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up problems per dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and BLAS threads")
    parser.add_argument(
        "--no-supplementary",
        dest="supplementary",
        action="store_false",
        help="skip the supplementary timings (activeft with num_workers=0, ttserve in float64)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the selectors interleaved per problem instead of in blocks (see the docstring)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write all results (per problem) as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    machine = machine_description(args.threads)
    print(
        f"# machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
        f"(AVX2={machine['avx2']}, AVX-512F={machine['avx512f']}, torch CPU capability "
        f"{machine['torch_cpu_capability']}), {args.threads} threads for torch and BLAS; Python "
        f"{machine['python']}, torch {machine['torch']}, numpy {machine['numpy']}, activeft "
        f"{machine['activeft']}"
    )
    load_before = os.getloadavg()
    busy_before, own_before = _busy_cpu_seconds(), _own_cpu_seconds()
    started = time.perf_counter()
    with threadpool_limits(limits=args.threads):
        summaries = [bench_dimension(args, d, device) for d in args.dims]
    elapsed = time.perf_counter() - started
    busy_after, own_after = _busy_cpu_seconds(), _own_cpu_seconds()
    machine["loadavg_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    # Share of the machine's CPU time that OTHER processes used while the benchmark ran (contention).
    foreign = None
    if busy_before is not None and busy_after is not None:
        other = (busy_after - busy_before) - (own_after - own_before)
        foreign = max(0.0, other) / (elapsed * (os.cpu_count() or 1))
    machine["other_processes_cpu_share"] = None if foreign is None else round(foreign, 3)

    print(markdown_table(summaries, args))
    for s in summaries:
        print(
            f"\nd={s['d']}: distinct embeddings among the {args.n} picks (mean; fewer = repeat picks): "
            f"ttserve {s['mean_distinct_picks_ttserve']:.1f}, activeft {s['mean_distinct_picks_activeft']:.1f}; "
            f"same picks in every repeat (and with num_workers=0): {s['all_deterministic']}"
        )
        for dis in s["disagreements"]:
            gap = dis["var_after_activeft_pick"] - dis["var_after_ttserve_pick"]
            print(
                f"  disagreement, seed {dis['seed']}: first differing pick at step {dis['first_divergence']}; "
                f"exact σ² after ttserve's pick {dis['var_after_ttserve_pick']:.10f}, after activeft's "
                f"{dis['var_after_activeft_pick']:.10f} (activeft - ttserve = {gap:+.1e}); matches the float64 "
                f"reference: ttserve {dis['ttserve_exact']}, activeft {dis['activeft_exact']}; exact final σ²: "
                f"ttserve {dis['final_var_ttserve']:.8f}, activeft {dis['final_var_activeft']:.8f}"
            )
    print(
        f"\n# total benchmark time {elapsed:.0f} s; 1-minute load average before/after: "
        f"{machine['loadavg_1min_before_after'][0]} / {machine['loadavg_1min_before_after'][1]} "
        f"(on {machine['logical_cpus']} CPUs); other processes used "
        f"{'n/a' if foreign is None else f'{100 * foreign:.0f}%'} of the machine's CPU time during the run "
        "(timings are only meaningful when that is near 0%)"
    )

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "machine": machine, "results": summaries}, f, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
