"""What ttserve's LoRA adapters look like, per architecture: the trained ones and the all-zero one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import LoraConfig

from ttserve.config import TrainingConfig

# Attention and MLP projections by model family: the modules vLLM's LoRA support covers, so an adapter
# trained here can be served by either engine. Unknown families fall back to PEFT's "all-linear"
# (every linear layer except the output head).
TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def lora_config(config: TrainingConfig, model_config: Any, base_model_name: str) -> LoraConfig:
    """`model_config`: the base model's transformers config (its model_type and layer count decide the
    targets)."""
    model_type = getattr(model_config, "model_type", "")
    targets = config.target_modules or TARGET_MODULES.get(model_type, "all-linear")
    layers = None
    if config.lora_layers is not None:
        # The last N blocks only: backpropagation then stops at the lowest adapted block.
        total = model_config.num_hidden_layers
        layers = list(range(max(total - config.lora_layers, 0), total))
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
    )


def write_zero_adapter(model: str, training: TrainingConfig, directory: Path) -> Path:
    """A PEFT adapter with every weight zero, shaped like the adapters the trainer makes for `model`.

    The vLLM engine sends base requests through it on CPU (see engines/vllm.py). The model is built on the
    meta device (no weights read or allocated) just to learn the module shapes.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    lora = lora_config(training, model_config, model)
    peft_model = get_peft_model(skeleton, lora)
    state = {
        key: torch.zeros(value.shape, dtype=torch.float32)
        for key, value in get_peft_model_state_dict(peft_model).items()
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "adapter_model.safetensors"))
    peft_model.peft_config["default"].save_pretrained(str(directory))  # target modules as resolved
    return directory
