"""The served model, wrapped once with PEFT, shared by the trainer and the transformers engine.

One copy of the base weights serves inference and test-time training. What makes that safe is kept here,
in one class, rather than spread over its users:

- **One lock.** Every touch of the model holds `SharedModel.lock`: an inference forward pass (`routed`), a
  training step (`training_step`), loading or unloading an adapter, reading or saving the adapter being
  trained. Inference and training therefore interleave pass by pass and never overlap.
- **Routing.** The trainer's adapter lives under `TRAINING_ADAPTER`; served adapters are loaded beside it
  under their own names. `routed(name)` points every LoRA layer at one adapter (or switches them all off for
  the base model) for the length of one forward pass and points them back at the training adapter before
  the lock is released, so a request only ever runs with the adapter it asked for and never with the one
  being trained.
- **PEFT internals.** Routing writes two private attributes of PEFT's `BaseTunerLayer`
  (`_active_adapter`, `_disable_adapters`); this is the only module that does, and pyproject.toml pins PEFT
  to the versions it was checked on. The public alternatives were measured and rejected: per-call
  `adapter_names` walks every module on every forward pass, so latency grows with the number of cached
  adapters, and `set_adapter` also flips `requires_grad` on the parameters the trainer optimises.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from ttserve.config import TrainingConfig
from ttserve.lm import LoadedModel, native_bf16
from ttserve.lora import lora_config

# The adapter being trained. PEFT saves a non-default adapter into a sub-directory, so the trainer's own
# adapter keeps PEFT's default name and saves as a standard adapter directory.
TRAINING_ADAPTER = "default"


class SharedModel:
    def __init__(self, loaded: LoadedModel, training: TrainingConfig):
        self.loaded = loaded
        self.name = loaded.name  # what adapters' base_model_name_or_path names
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.max_length = loaded.max_length
        autocast = training.autocast_bf16
        self.autocast_bf16 = native_bf16(self.device) if autocast is None else autocast
        for parameter in loaded.model.parameters():
            parameter.requires_grad_(False)
        # Seeded so that the adapter's initial lora_A (PEFT draws it at random) is the same in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(training.seed)
            self.peft = get_peft_model(
                loaded.model,
                lora_config(training, loaded.model.config, loaded.name),
                adapter_name=TRAINING_ADAPTER,
            )
        self.peft.eval()  # train mode only inside training_step: inference never sees dropout
        self.trainable_parameters = [p for p in self.peft.parameters() if p.requires_grad]
        self._initial = [p.detach().clone() for p in self.trainable_parameters]
        self.lock = threading.Lock()
        # The LoRA layers, found once: loading an adapter adds entries inside these same layers.
        self._lora_layers = [m for m in self.peft.modules() if isinstance(m, BaseTunerLayer)]
        self._training_route = [
            (layer._active_adapter, layer._disable_adapters) for layer in self._lora_layers
        ]

    # --- inference ----------------------------------------------------------------------------------------
    @contextmanager
    def routed(self, adapter: str | None) -> Iterator[torch.nn.Module]:
        """The model for one inference pass, locked, every LoRA layer routed to `adapter` (None: the base
        model, all LoRA off; TRAINING_ADAPTER: the adapter being trained, for evaluation)."""
        with self.lock, torch.inference_mode():
            for layer in self._lora_layers:
                layer._disable_adapters = adapter is None
                if adapter is not None:
                    layer._active_adapter = [adapter]
            try:
                yield self.peft.get_base_model()
            finally:
                for layer, (active, disabled) in zip(self._lora_layers, self._training_route, strict=True):
                    layer._active_adapter, layer._disable_adapters = active, disabled

    def load_adapter(self, path: str | Path, name: str) -> None:
        with self.lock:
            self.peft.load_adapter(str(path), adapter_name=name, is_trainable=False)

    def delete_adapter(self, name: str) -> None:
        with self.lock:
            self.peft.delete_adapter(name)

    # --- training -----------------------------------------------------------------------------------------
    def reset_training_adapter(self) -> None:
        """Back to the fresh adapter's initial values (lora_A's seeded draw, lora_B's zeros).

        No lock: inference is never routed to the training adapter, so nothing else reads these tensors.
        """
        with torch.no_grad():
            for parameter, initial in zip(self.trainable_parameters, self._initial, strict=True):
                parameter.copy_(initial)

    @contextmanager
    def training_step(self) -> Iterator[torch.nn.Module]:
        """The PEFT model in train mode for one forward + backward + optimizer step, locked."""
        with self.lock, torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast_bf16):
            self.peft.train()
            try:
                yield self.peft
            finally:
                self.peft.eval()

    def training_adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter being trained, in PEFT's saved format (CPU copies)."""
        with self.lock:
            state = get_peft_model_state_dict(self.peft, adapter_name=TRAINING_ADAPTER)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def save_training_adapter(self, directory: str | Path) -> Path:
        """Write the adapter being trained in standard PEFT format (adapter_model.safetensors + config)."""
        with self.lock:
            self.peft.save_pretrained(str(directory), selected_adapters=[TRAINING_ADAPTER])
        return Path(directory)
