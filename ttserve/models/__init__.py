"""Language models ttserve can build for itself; the embedded default is `tiny` (see tiny.py)."""

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
    "TinyModelConfig",
    "build_tiny_model",
    "default_model_dir",
    "ensure_tiny_model",
    "read_model_info",
]
