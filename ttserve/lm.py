"""Loading the served causal LM once per process: model, tokenizer and the name adapters refer to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ttserve.config import ModelConfig


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    name: str  # hub id or directory: what adapter_config.json's base_model_name_or_path names
    device: torch.device
    max_length: int  # the model's context in tokens


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The weights' dtype. "auto": bf16 wherever bf16 matrix products run in hardware (`native_bf16`), else
    fp32. On the default model bf16 weights keep the test-time training gain and halve the bytes every decoded
    token reads (BENCHMARKS.md, "bf16 weights"); where bf16 is emulated they would be slower."""
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, dtype)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run in hardware here: any CUDA device, or a CPU with AVX512-BF16 or AMX
    (read from /proc/cpuinfo, so False off Linux). Where they do not, bf16 autocast is emulated and slower."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def load_model(config: ModelConfig | None = None) -> LoadedModel:
    """The configured model (an embedded model is built or imported the first time, see ttserve/models/)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttserve.models import resolve_model

    config = config or ModelConfig()
    name = resolve_model(config.name_or_path)
    device = resolve_device(config.device)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=resolve_dtype(config.dtype, device)).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, device=device, max_length=int(min(context, 1 << 20))
    )
