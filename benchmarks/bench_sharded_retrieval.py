"""Sharded vs unsharded retrieval latency: 1 (unsharded), 2 and 4 shards, in-process and through Ray Serve.

    .venv/bin/python benchmarks/bench_sharded_retrieval.py --out results/bench_sharded_retrieval.json
    .venv/bin/python benchmarks/bench_sharded_retrieval.py --limit          # smoke run: 4k rows, 8 queries
    .venv/bin/python benchmarks/bench_sharded_retrieval.py --datastore ~/.cache/ttserve/datastores/stdlib-docs

Data: by default a synthetic datastore of `--sequences` clustered unit vectors of `--dim` (100k x 384,
float32, flat index), written through ttserve's own datastore code as tests/test_shards.py writes one
(`build_datastore` embeds a corpus and takes no precomputed vectors; the timings of search and selection
depend only on N, d, K and n, not on where the vectors came from). `--datastore PATH` uses a built one
instead. Either is cut with `shard_datastore` into 1, 2 and 4 shards in a temporary directory, removed at
the end.

Queries: fixed (seeded) embeddings, noisy copies of random stored rows, passed to
`Retriever.retrieve_embeddings` (K=200, n=50, strategy sift), so no embedder runs. Per query: candidates
(the Faiss ±q search and the candidates' rows, merged over the shards: `index_ms`), SIFT (`selection_ms`),
the document fetch (`fetch_ms`), and the whole call (wall). Every configuration retrieves every query; the
order of the configurations rotates from query to query, so that drift in the machine's speed (its cores
are shared) hits all alike. Each configuration's picks are compared with the unsharded store's, query by
query: with a flat index they must be identical (asserted, after the report is written).

Two phases, each with `--warmup` untimed queries and then `--queries` timed ones:
1. in-process: `Retriever` over the unsharded `Datastore`, and over `ShardedDatastore.open(...)` (every
   shard a `LocalShard` in this process, searched in a thread each);
2. Ray Serve (unless `--no-ray`): local Ray (4 logical CPUs, 256 MiB object store), one `ShardDeployment`
   application per shard with the app's own sizing (ttserve/serving/sizing.py, cpu profile), and here in the
   driver a `ShardedDatastore` over `RemoteShard` clients of their handles, as `PlannerDeployment`'s
   `_sharded_retriever` builds it (its fan-out threads call `handle.search.remote(...).result(timeout_s)`).
   Measured: the unsharded in-process retriever again (the baseline, now beside a running Ray), and 1, 2
   and 4 Shard deployments; 1 shard isolates the cost of the handle round trip from that of the fan-out.

The run stops itself: `--time-limit` seconds (default 1200) raise in the main thread, Serve and Ray are shut
down on any error, and a watchdog ends the process if even that hangs for two more minutes.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

# Synthetic data and its datastore as bench_retrieval.py makes them (this directory is on sys.path).
from bench_retrieval import clustered_unit_vectors, write_datastore  # noqa: E402

from ttserve.config import DatastoreConfig, RetrievalConfig  # noqa: E402
from ttserve.datastore import Datastore, ShardedDatastore, shard_datastore  # noqa: E402
from ttserve.datastore.manifest import (  # noqa: E402
    Manifest,
    ShardsManifest,
)
from ttserve.datastore.store import open_embeddings  # noqa: E402
from ttserve.retrieval import Retriever  # noqa: E402

PARTS = {  # reported name: key in Retrieval.timings_ms ("total": the wall time of the call)
    "candidates": "index_ms",
    "sift": "selection_ms",
    "fetch": "fetch_ms",
    "total": "wall_ms",
}
LIMIT = {"sequences": 4000, "queries": 8, "warmup": 2}  # --limit: a smoke run in about a minute


class FixedEmbedder:
    """Only what Retriever checks: its name must be the datastore's embedder; queries arrive as embeddings."""

    def __init__(self, name: str):
        self.name = name


# --- data --------------------------------------------------------------------------------------------------
def noisy_rows(embeddings: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` query embeddings: random stored rows plus noise, normalised."""
    rows = np.asarray(embeddings[np.sort(rng.integers(0, len(embeddings), count))], dtype=np.float32)
    d = rows.shape[1]
    queries = rows + 0.5 * rng.standard_normal((count, d), dtype=np.float32) / np.sqrt(d)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries[rng.permutation(count)]


# --- measurement -------------------------------------------------------------------------------------------
@dataclass
class Measured:
    """One configuration's timings (ms, per part) over the timed queries, and how its picks compared."""

    label: str
    times: dict[str, list[float]] = field(default_factory=lambda: {part: [] for part in PARTS})
    identical: int = 0
    differing: list[int] = field(default_factory=list)  # query numbers whose picks differ from unsharded
    degraded: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "label": self.label,
            **{
                part: {f"p{q}_ms": round(float(np.percentile(values, q)), 3) for q in (50, 90, 99)}
                for part, values in self.times.items()
            },
            "picks_identical_to_unsharded": self.identical,
            "picks_differing": len(self.differing),
            "differing_queries": self.differing[:20],
            "degraded_answers": len(self.degraded),
            "degraded_examples": self.degraded[:3],
        }


def measure(
    retrievers: dict[str, Retriever],
    labels: dict[str, str],
    queries: np.ndarray,
    warmup: int,
    reference: list[list[int]],
) -> dict[str, Measured]:
    """Every query through every retriever, the order rotating per query; the first `warmup` untimed.
    `reference`: the unsharded picks per query (filled here by the "unsharded" retriever when empty)."""
    names = list(retrievers)
    results = {name: Measured(labels[name]) for name in names}
    for number, query in enumerate(queries):
        shift = number % len(names)
        retrievals = {}
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            retrievals[name] = retrievers[name].retrieve_embeddings(query)
            retrievals[name].timings_ms["wall_ms"] = (time.perf_counter() - started) * 1e3
        if len(reference) == number:
            reference.append(retrievals["unsharded"].ids)
        if number < warmup:
            continue
        for name, retrieval in retrievals.items():
            measured = results[name]
            for part, key in PARTS.items():
                measured.times[part].append(retrieval.timings_ms[key])
            if retrieval.degraded:
                measured.degraded.append(retrieval.degraded)
            if retrieval.ids == reference[number]:
                measured.identical += 1
            else:
                measured.differing.append(number - warmup)
    return results


def retrieval_config(args: argparse.Namespace) -> RetrievalConfig:
    return RetrievalConfig(k=args.k, n=args.n, strategy="sift")


def in_process(
    args: argparse.Namespace,
    whole: Path,
    sharded: dict[int, Path],
    model: str,
    queries: np.ndarray,
    reference: list[list[int]],
) -> dict[str, Measured]:
    config = DatastoreConfig(path=whole, use_gpu="never")
    embedder = FixedEmbedder(model)
    retrievers = {"unsharded": Retriever(Datastore(whole, config, model), embedder, retrieval_config(args))}  # type: ignore[arg-type]
    labels = {"unsharded": "unsharded (1)"}
    for count in args.shards:
        store = ShardedDatastore.open(sharded[count], config, model, args.shard_timeout_s)
        retrievers[f"{count} shards"] = Retriever(store, embedder, retrieval_config(args))  # type: ignore[arg-type]
        labels[f"{count} shards"] = f"{count} local shards, thread fan-out"
    return measure(retrievers, labels, queries, args.warmup, reference)


def through_ray(
    args: argparse.Namespace,
    whole: Path,
    sharded: dict[int, Path],
    model: str,
    queries: np.ndarray,
    reference: list[list[int]],
) -> tuple[dict[str, Measured], dict]:
    import ray
    from ray import serve

    from ttserve.serving.app import RemoteShard, ShardDeployment

    embedder = FixedEmbedder(model)
    config = DatastoreConfig(path=whole, use_gpu="never")
    retrievers = {"unsharded": Retriever(Datastore(whole, config, model), embedder, retrieval_config(args))}  # type: ignore[arg-type]
    labels = {"unsharded": "unsharded (1), in-process, Ray running"}
    info: dict = {}
    started = time.perf_counter()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy, no port
        info["ray_start_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        for count in [1, *args.shards]:
            path = sharded[count]
            overrides = {
                "datastore": {"path": str(path), "shards": count, "use_gpu": "never"},
                "embedder": {"model": model},
                "retrieval": {"k": args.k, "n": args.n},
            }
            handles = [
                serve.run(
                    ShardDeployment.options(name=f"Shard{i}").bind(i, None, overrides),
                    name=f"shards{count}-{i}",
                    route_prefix=None,
                )
                for i in range(count)
            ]
            # As PlannerDeployment's _sharded_retriever builds it, with this script's embedder.
            root = ShardsManifest.read(path)
            clients = [RemoteShard(handle, args.shard_timeout_s) for handle in handles]
            store = ShardedDatastore(root, clients, args.shard_timeout_s, path)
            name = f"ray {count}"
            retrievers[name] = Retriever(store, embedder, retrieval_config(args))  # type: ignore[arg-type]
            labels[name] = f"{count} Shard deployment{'s' if count > 1 else ''} via handles"
        info["deploy_s"] = round(time.perf_counter() - started, 1)
        info["replicas"] = sum([1, *args.shards])
        return measure(retrievers, labels, queries, args.warmup, reference), info
    finally:
        serve.shutdown()
        ray.shutdown()


# --- report ------------------------------------------------------------------------------------------------
def table(title: str, results: dict[str, Measured], timed: int) -> list[str]:
    lines = [
        f"{title}",
        "| configuration | candidates p50 | p90 | p99 | SIFT p50 | p90 | p99 | fetch p50 "
        "| total p50 | p90 | p99 | picks = unsharded |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for measured in results.values():
        s = measured.summary()
        cells = [
            s[part][f"p{q}_ms"]
            for part, qs in (
                ("candidates", (50, 90, 99)),
                ("sift", (50, 90, 99)),
                ("fetch", (50,)),
                ("total", (50, 90, 99)),
            )
            for q in qs
        ]
        degraded = f", {len(measured.degraded)} degraded" if measured.degraded else ""
        lines.append(
            f"| {measured.label} | "
            + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {measured.identical}/{timed}{degraded} |"
        )
    return lines


class TimeLimit(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=100_000, help="synthetic datastore rows")
    parser.add_argument("--dim", type=int, default=384, help="synthetic embedding dimension")
    parser.add_argument(
        "--datastore", type=Path, default=None, help="a built (unsharded) datastore instead of synthetic data"
    )
    parser.add_argument("--queries", type=int, default=200, help="timed queries per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="untimed queries first")
    parser.add_argument("--shards", default="2,4", help="shard counts besides 1 (unsharded)")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument(
        "--shard-timeout-s", type=float, default=DatastoreConfig.model_fields["shard_timeout_s"].default
    )
    parser.add_argument("--no-ray", action="store_true", help="in-process only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=int, default=1200, help="seconds before the run gives up")
    parser.add_argument(
        "--limit", action="store_true", help="smoke run: 4000 synthetic rows, 2 warm-up and 8 timed queries"
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench_sharded_retrieval.json"))
    args = parser.parse_args()
    args.shards = sorted({int(s) for s in str(args.shards).split(",") if s.strip()} - {1})
    if args.limit:
        args.sequences, args.queries, args.warmup = LIMIT["sequences"], LIMIT["queries"], LIMIT["warmup"]

    def give_up(*_: object) -> None:
        raise TimeLimit(f"stopped after --time-limit {args.time_limit} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(args.time_limit)
    # If even the cleanup after the time limit hangs, end the process.
    watchdog = threading.Timer(args.time_limit + 120, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    began = time.perf_counter()
    try:
        report, lines, differing = run(args)
    finally:
        signal.alarm(0)
        watchdog.cancel()
    report["elapsed_s"] = round(time.perf_counter() - began, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out} ({report['elapsed_s']} s)")
    assert not differing, f"picks differ from the unsharded store's with a flat index: {differing}"


def run(args: argparse.Namespace) -> tuple[dict, list[str], list[str]]:
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-sharded-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        if args.datastore is None:
            vectors = clustered_unit_vectors(
                args.sequences, args.dim, clusters=max(1, args.sequences // 100), rng=rng
            )
            whole = tmp / "whole"
            write_datastore(whole, vectors)
            del vectors
        else:
            whole = args.datastore.expanduser()
        manifest = Manifest.read(whole)
        model, index_type = manifest.embedder.model, manifest.index.type
        queries = noisy_rows(open_embeddings(whole, manifest), args.warmup + args.queries, rng)
        sharded = {
            count: tmp / f"shards-{count}" for count in sorted({*args.shards, *([] if args.no_ray else [1])})
        }
        for count, path in sharded.items():
            shard_datastore(whole, path, count, progress=False)
        prepare_s = time.perf_counter() - started

        reference: list[list[int]] = []
        results = {"in_process": in_process(args, whole, sharded, model, queries, reference)}
        ray_info = None
        if not args.no_ray:
            results["ray"], ray_info = through_ray(args, whole, sharded, model, queries, reference)

    head = (
        f"N={manifest.counts.sequences} d={manifest.embedder.dimension} index={index_type} "
        f"({'synthetic' if args.datastore is None else args.datastore}) K={args.k} n={args.n} strategy=sift "
        f"queries={args.queries} after {args.warmup} warm-up, {os.cpu_count()} CPUs"
    )
    lines = [head, ""] + table("In-process (ms)", results["in_process"], args.queries)
    if ray_info is not None:
        lines += [""] + table(
            f"Through Ray Serve (ms; Ray start {ray_info['ray_start_s']} s, "
            f"{ray_info['replicas']} Shard replicas deployed in {ray_info['deploy_s']} s)",
            results["ray"],
            args.queries,
        )
    differing = [
        f"{phase}/{m.label}: {len(m.differing)} of {args.queries}"
        for phase, measured in results.items()
        for m in measured.values()
        if m.differing
    ]
    if index_type != "flat":
        lines.append(f"(index {index_type}: sharded picks may differ from unsharded; not asserted)")
        differing = []
    import faiss
    import ray

    report = {
        "config": vars(args),
        "datastore": {
            "source": "synthetic" if args.datastore is None else str(args.datastore),
            "sequences": manifest.counts.sequences,
            "dimension": manifest.embedder.dimension,
            "index": index_type,
            "embedder": model,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "ray": ray.__version__,
            "numpy": np.__version__,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "prepare_s": round(prepare_s, 1),
        "ray": ray_info,
        "results": {
            phase: {name: m.summary() for name, m in measured.items()} for phase, measured in results.items()
        },
    }
    return report, lines, differing


if __name__ == "__main__":
    main()
