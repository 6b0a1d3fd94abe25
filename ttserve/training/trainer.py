"""Test-time fine-tuning of a fresh LoRA adapter per request (spec §4).

The protocol:
- one gradient step per selected sequence, in selection order, batch size 1;
- a sequence picked twice gets two steps;
- a sequence longer than `max_length` tokens becomes consecutive chunks, one step each;
- AdamW (lr 5e-5, eps 1e-8) with gradient clipping at 1.0.

Every request starts from the base weights with a FRESH adapter and a FRESH optimizer. The reference
code (tttlm) carries optimizer state across prompts, which leaks one prompt into the next; here that
is impossible.

The model is wrapped with PEFT once per process. A request then only copies the adapter's initial
values back (lora_A's seeded random init and lora_B's zeros: a few MB at most) and builds a new
optimizer. `TrainingRun.setup_ms` measures that cost. The base weights are never touched. The trainer
serialises requests with a lock: one adapter lives in the wrapped model at a time.

The transformers engine serves from this same wrapped model (no second copy of the base weights). Each
training step holds `forward_lock`, as does each of the engine's forward passes, so inference interleaves
with training step by step; inference never uses the adapter being trained (see engines/transformers.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model, get_peft_model_state_dict

from ttserve.config import TrainingConfig
from ttserve.lm import LoadedModel
from ttserve.training.lora import lora_config

ADAPTER = "default"  # PEFT saves a non-default adapter into a sub-directory; one adapter at a time here


@dataclass
class TrainingRun:
    """What one request's training did."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    setup_ms: float = 0.0
    losses: list[float] = field(default_factory=list)
    stopped: str = "completed"  # completed | budget | deadline | cancelled


class TestTimeTrainer:
    __test__ = False  # not a pytest class, despite the name

    def __init__(self, loaded: LoadedModel, config: TrainingConfig | None = None):
        self.config = config or TrainingConfig()
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.base_name = loaded.name
        self.device = loaded.device
        self.max_length = min(self.config.max_length, loaded.max_length)
        for parameter in loaded.model.parameters():
            parameter.requires_grad_(False)
        # Seeded so that the adapter's initial lora_A (PEFT draws it at random) is the same in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            model_type = getattr(loaded.model.config, "model_type", "")
            self.model = get_peft_model(
                loaded.model, lora_config(self.config, model_type, loaded.name), adapter_name=ADAPTER
            )
        self.model.eval()  # no dropout in the base model; LoRA dropout (if any) is applied by PEFT in train()
        self.trainable_parameters = [p for n, p in self.model.named_parameters() if p.requires_grad]
        self._initial = [p.detach().clone() for p in self.trainable_parameters]
        self._lock = threading.Lock()  # one session at a time
        self.forward_lock = threading.Lock()  # one forward (+ backward) pass on the shared model at a time

    def chunks(self, texts: Sequence[str]) -> Iterator[list[int]]:
        """Training steps in order: each text tokenized (BOS-prefixed) and cut into max_length pieces."""
        bos = self.tokenizer.bos_token_id
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if bos is not None:
                ids = [bos, *ids]
            for start in range(0, len(ids), self.max_length):
                piece = ids[start : start + self.max_length]
                if len(piece) >= 2:  # a single token has nothing to predict
                    yield piece

    @contextmanager
    def session(self) -> Iterator[TrainingSession]:
        """Exclusive use of the model with a fresh adapter and a fresh optimizer."""
        with self._lock:
            started = time.perf_counter()
            with torch.no_grad():
                for parameter, initial in zip(self.trainable_parameters, self._initial, strict=True):
                    parameter.copy_(initial)
            optimizer = torch.optim.AdamW(
                self.trainable_parameters,
                lr=self.config.learning_rate,
                eps=self.config.adam_eps,
                weight_decay=self.config.weight_decay,
            )
            yield TrainingSession(self, optimizer, setup_ms=(time.perf_counter() - started) * 1e3)

    def train(
        self,
        texts: Sequence[str],
        max_steps: int,
        output_dir: str | Path | None = None,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> TrainingRun:
        """Train a fresh adapter on `texts` for at most `max_steps` steps; save it to `output_dir` if given."""
        with self.session() as session:
            run = session.train(texts, max_steps, deadline=deadline, cancel=cancel)
            if output_dir is not None:
                session.save(output_dir)
        return run


class TrainingSession:
    """One request's adapter while it is being trained; valid inside `TestTimeTrainer.session()` only."""

    def __init__(self, trainer: TestTimeTrainer, optimizer: torch.optim.Optimizer, setup_ms: float):
        self.trainer = trainer
        self.model = trainer.model
        self.optimizer = optimizer
        self.run = TrainingRun(setup_ms=setup_ms)
        self._queue: deque[list[int]] = deque()  # token pieces still to train on, in order

    def train(
        self,
        texts: Sequence[str],
        max_steps: int,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> TrainingRun:
        """Queue `texts` (after anything still queued) and take up to `max_steps` steps."""
        self._queue.extend(self.trainer.chunks(texts))
        return self.resume(max_steps, deadline=deadline, cancel=cancel)

    def resume(
        self, max_steps: int, deadline: float | None = None, cancel: threading.Event | None = None
    ) -> TrainingRun:
        """Take up to `max_steps` more steps from the queue, continuing this session's adapter and optimizer.

        `deadline` is a time.monotonic() value; it and `cancel` are checked between steps, so a step that
        has started always finishes and the adapter is never half-updated.
        """
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        config = self.trainer.config
        started = time.perf_counter()
        taken = 0
        try:
            while self._queue:
                if taken >= max_steps:
                    self.run.stopped = "budget"
                    break
                if cancel is not None and cancel.is_set():
                    self.run.stopped = "cancelled"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    self.run.stopped = "deadline"
                    break
                piece = self._queue.popleft()
                input_ids = torch.tensor([piece], device=self.trainer.device)
                with self.trainer.forward_lock:
                    self.model.train()  # train mode only while the lock is held: inference sees eval mode
                    try:
                        loss = self.model(input_ids=input_ids, labels=input_ids).loss
                        loss.backward()
                        if config.max_grad_norm is not None:
                            torch.nn.utils.clip_grad_norm_(
                                self.trainer.trainable_parameters, config.max_grad_norm
                            )
                        self.optimizer.step()
                    finally:
                        self.model.eval()
                self.optimizer.zero_grad(set_to_none=True)
                self.run.losses.append(float(loss.detach()))
                self.run.tokens += len(piece)
                self.run.steps += 1
                taken += 1
            else:
                self.run.stopped = "completed"
        finally:
            self.run.seconds += time.perf_counter() - started
        return self.run

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in PEFT's saved format (CPU copies)."""
        with self.trainer.forward_lock:  # the engine may be adding or removing adapters in another thread
            state = get_peft_model_state_dict(self.model, adapter_name=ADAPTER)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def save(self, output_dir: str | Path) -> Path:
        """Write the adapter in standard PEFT format (adapter_model.safetensors + adapter_config.json)."""
        output_dir = Path(output_dir)
        with self.trainer.forward_lock:
            self.model.save_pretrained(str(output_dir), selected_adapters=[ADAPTER])
        return output_dir
