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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Split, embed and index a corpus into a new datastore directory."""
    _quiet_libraries()
    from ttserve.datastore import CorpusError, build_datastore

    settings = _settings(
        config,
        index_type=index_type,
        tokenizer=tokenizer,
        chunk_tokens=chunk_tokens,
        embedding_dtype=embedding_dtype,
    )
    try:
        manifest = build_datastore(
            _corpus(corpus, more),
            out,
            settings,
            overwrite=overwrite,
            skip_invalid_utf8=skip_invalid_utf8,
            progress=not quiet,
        )
    except (CorpusError, FileExistsError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(f"built {out}: {_summary(manifest)}")


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
    """Print a datastore's manifest (JSON)."""
    from ttserve.datastore import Manifest

    try:
        manifest = Manifest.read(path)
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
    from ttserve.datastore import EmbedderMismatchError
    from ttserve.retrieval import Retriever

    if strategy not in ("sift", "knn"):
        raise _fail(f"unknown strategy {strategy!r}: use sift or knn")
    settings = _settings(config)
    try:
        retriever = Retriever.from_settings(settings, path)
        result = retriever.retrieve(prompt, n=n, k=k, strategy=strategy, lam=lam, alpha=alpha)  # type: ignore[arg-type]
    except (FileNotFoundError, EmbedderMismatchError, ValueError) as error:
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
    """The main job on the embedded default: make sure the local datastore exists, then select data per prompt.

    The first run builds the datastore from the Python standard library's sources (offline, about a
    minute on 2 cores). Prompts come from --prompt or, one per line, from standard input.
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
    typer.echo(f"  sigma^2_0 = {result.variances[0]:.4f}")
    for i, sequence in enumerate(result.sequences, start=1):
        snippet = " ".join(sequence.text.split())[:90]
        typer.echo(
            f"{i:3d}. sigma^2 = {result.variances[i]:.4f}  [{sequence.id}] {sequence.doc_id}#{sequence.chunk}  {snippet}"
        )
    timings = ", ".join(f"{name} {ms:.1f}" for name, ms in result.timings_ms.items())
    typer.echo(f"timings (ms): {timings}")


def _retrieval_json(result) -> dict:
    return {
        "strategy": result.strategy,
        "lambda": result.lam,
        "num_targets": result.num_targets,
        "candidates": result.candidates,
        "truncated_from": result.truncated_from,
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
