"""The served model, wrapped with PEFT twice over one copy of the base weights: one module tree for the
trainer, one for the transformers engine.

What makes sharing the weights safe is kept here, in one class, rather than spread over its users:

- **Two trees, one set of weights.** The serving tree is a copy of the training tree's modules that holds
  the very same base-weight tensors (frozen: nothing writes them), and LoRA layers of its own. A training
  step and an inference pass can therefore run at the same time, on different threads, each in its own
  tree: a base-model request never waits for someone else's fine-tuning step. Each tree has its lock
  (`serving_lock`: inference passes and adapter loads; `training_lock`: training steps, reading and saving
  the trained adapter), and nothing holds both.
- **Routing.** Served adapters are loaded into the serving tree, each in a slot of its own. `routed(name)`
  points every LoRA layer of that tree at the named adapter's slot (or switches them all off for the base
  model) for the length of one forward pass, under the serving lock, so a request only ever runs with the
  adapter it asked for. The adapter being trained lives in the training tree only: no request can be routed
  to it.
- **Slots.** PEFT's `load_adapter` builds new LoRA modules in every targeted layer, which costs far more
  than the weights' copy (BENCHMARKS.md, "Adapter slots"). An unloaded adapter's slot is kept instead, no
  longer reachable by any name, and the next adapter of the same shape is copied into it (PEFT's
  `hotswap_adapter`). The tree holds as many slots as adapters were ever loaded at once: the adapter
  cache's bound, plus adapters in use beyond it.
- **PEFT internals.** Routing writes two private attributes of PEFT's `BaseTunerLayer`
  (`_active_adapter`, `_disable_adapters`); this is the only module that does, and pyproject.toml pins PEFT
  to the versions it was checked on. The public alternatives were measured and rejected: per-call
  `adapter_names` walks every module on every forward pass, so latency grows with the number of cached
  adapters, and `set_adapter` also flips `requires_grad` on the parameters the trainer optimises.

The CPU the two trees compete for is shared out by threads.py (the training thread runs at a lower
scheduling priority, so inference passes come first).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.hotswap import hotswap_adapter

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
        self.training_lock = threading.Lock()
        self.serving_lock = threading.Lock()
        # A loaded adapter's name -> its slot (the serving tree's name for the LoRA modules it is in).
        self._slots: dict[str, str] = {}
        self._free_slots: list[str] = []  # slots of unloaded adapters, reachable by no name
        self._slots_made = 0

    @cached_property
    def serving(self) -> torch.nn.Module:
        """The serving tree, built on first use (the transformers engine builds it when it starts; a trainer
        beside vLLM never needs one): new modules, the same frozen base tensors (deepcopy's memo maps each
        to itself), and a copy of the training adapter that is never routed to."""
        frozen = {id(p): p for p in self.peft.parameters() if not p.requires_grad}
        with self.training_lock:
            tree = copy.deepcopy(self.peft, memo=frozen)
        for parameter in tree.parameters():
            parameter.requires_grad_(False)
        # Its LoRA layers, found once: loading an adapter adds entries inside these same layers.
        self._lora_layers = [m for m in tree.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self._lora_layers:  # between passes: the base model
            layer._disable_adapters = True
        return tree

    # --- inference ----------------------------------------------------------------------------------------
    @contextmanager
    def routed(self, adapter: str | None) -> Iterator[torch.nn.Module]:
        """The serving tree for one inference pass, locked, every LoRA layer routed to `adapter` (None: the
        base model, all LoRA off). The adapter being trained is not in this tree."""
        if adapter == TRAINING_ADAPTER:
            raise ValueError("the adapter being trained cannot serve requests; save and load it first")
        serving = self.serving
        with self.serving_lock, torch.inference_mode():
            slot = None if adapter is None else self._slot_of(adapter)
            for layer in self._lora_layers:
                layer._disable_adapters = slot is None
                if slot is not None:
                    layer._active_adapter = [slot]
            try:
                yield serving.get_base_model()
            finally:
                for layer in self._lora_layers:
                    layer._disable_adapters = True

    def load_adapter(self, path: str | Path, name: str) -> None:
        """Load the PEFT adapter at `path` for requests to route to as `name`: into a free slot of the same
        shape when there is one, else into a new slot."""
        config = LoraConfig.from_pretrained(str(path))
        with self.serving_lock:
            if name in self._slots or name == TRAINING_ADAPTER:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            slot = next(
                (s for s in self._free_slots if _same_shape(self.serving.peft_config[s], config)), None
            )
            if slot is not None:
                self._free_slots.remove(slot)
                try:
                    hotswap_adapter(self.serving, str(path), adapter_name=slot, torch_device=str(self.device))
                except BaseException:
                    self.serving.delete_adapter(slot)  # it may hold a part of each adapter: never reuse it
                    raise
            else:
                self._slots_made += 1
                # Fixed width: PEFT's hotswap finds a slot's keys by substring, so with "slot-1" and
                # "slot-10" a swap into the first would zero the second.
                slot = f"slot_{self._slots_made:06d}"
                self.serving.load_adapter(str(path), adapter_name=slot, is_trainable=False)
            self._slots[name] = slot

    def delete_adapter(self, name: str) -> None:
        """Unload `name`: no request can route to it any more, and its slot waits for the next adapter."""
        with self.serving_lock:
            self._free_slots.append(self._slot_of(name))
            del self._slots[name]

    @property
    def slots(self) -> tuple[int, int]:
        """(slots holding a loaded adapter, free slots) in the serving tree."""
        return len(self._slots), len(self._free_slots)

    def _slot_of(self, name: str) -> str:
        try:
            return self._slots[name]
        except KeyError:
            raise KeyError(f"adapter {name!r} is not loaded") from None

    # --- training -----------------------------------------------------------------------------------------
    def reset_training_adapter(self) -> None:
        """Back to the fresh adapter's initial values (lora_A's seeded draw, lora_B's zeros).

        No lock: only the training thread uses the training tree's adapter.
        """
        with torch.no_grad():
            for parameter, initial in zip(self.trainable_parameters, self._initial, strict=True):
                parameter.copy_(initial)

    @contextmanager
    def training_step(self) -> Iterator[torch.nn.Module]:
        """The training tree in train mode for one forward + backward + optimizer step, locked."""
        with self.training_lock, torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast_bf16):
            self.peft.train()
            try:
                yield self.peft
            finally:
                self.peft.eval()

    def training_adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter being trained, in PEFT's saved format (CPU copies)."""
        with self.training_lock:
            state = get_peft_model_state_dict(self.peft, adapter_name=TRAINING_ADAPTER)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def save_training_adapter(self, directory: str | Path) -> Path:
        """Write the adapter being trained in standard PEFT format (adapter_model.safetensors + config)."""
        with self.training_lock:
            self.peft.save_pretrained(str(directory), selected_adapters=[TRAINING_ADAPTER])
        return Path(directory)


# What decides the LoRA modules' shapes and scaling: adapters equal in these fit the same slot.
_SLOT_SHAPE = (
    "r",
    "lora_alpha",
    "target_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "bias",
    "modules_to_save",
    "lora_dropout",
    "fan_in_fan_out",
)


def _same_shape(a: LoraConfig, b: LoraConfig) -> bool:
    if not isinstance(a, LoraConfig) or not isinstance(b, LoraConfig):
        return False
    first, second = a.to_dict(), b.to_dict()
    return all(_comparable(first.get(key)) == _comparable(second.get(key)) for key in _SLOT_SHAPE)


def _comparable(value):
    return sorted(value) if isinstance(value, set | list | tuple) else value
