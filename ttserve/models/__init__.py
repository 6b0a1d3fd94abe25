"""Language models ttserve makes for itself, offline: the tiny stdlib Llama (tiny.py) and models imported
from GGUF files (gguf_import.py), and `resolve_model`, which turns any `model.name_or_path` into something
transformers, PEFT and vLLM can load."""

from pathlib import Path

from ttserve.config import DEFAULT_MODEL, PACKAGED_MODEL, TINY_MODEL
from ttserve.models.gguf_import import GGUFImportError, import_gguf, packaged_gguf
from ttserve.models.tiny import (
    MODEL_INFO_FILE,
    TinyModelConfig,
    build_tiny_model,
    default_model_dir,
    ensure_tiny_model,
    read_model_info,
)

__all__ = [
    "MODEL_INFO_FILE",
    "GGUFImportError",
    "TinyModelConfig",
    "build_tiny_model",
    "default_model_dir",
    "ensure_tiny_model",
    "import_gguf",
    "packaged_gguf",
    "read_model_info",
    "resolve_model",
]


def resolve_model(name_or_path: str | None) -> str:
    """A hub id or directory for `model.name_or_path`: an embedded model's directory (built or imported the
    first time), a `.gguf` file's imported directory, or the name itself. The embedded names win over a
    directory of the same name in the working directory."""
    name = name_or_path or DEFAULT_MODEL
    if name == TINY_MODEL:
        return str(ensure_tiny_model())
    if name == PACKAGED_MODEL:
        return str(import_gguf(packaged_gguf()))
    if name.endswith(".gguf"):
        return str(import_gguf(Path(name).expanduser()))
    return name
