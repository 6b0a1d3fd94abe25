"""Test-time fine-tuning of a fresh LoRA adapter per request (spec §4).

The protocol:
- one gradient step per selected sequence, in selection order, batch size 1;
- a sequence picked twice gets two steps;
- a sequence longer than `max_length` tokens becomes consecutive chunks, one step each;
- AdamW (`training.learning_rate`, eps 1e-8) with gradient clipping at 1.0. LoRA needs a larger step than
  the paper's full fine-tuning at 5e-5; the default and why are in config.py and BENCHMARKS.md. A run
  planned for fewer steps takes a proportionally larger step (`TrainingConfig.learning_rate_for`).

Every request starts from the base weights with a FRESH adapter and a FRESH optimizer. The reference
code (tttlm) carries optimizer state across prompts, which leaks one prompt into the next; here that
is impossible.

The model is wrapped with PEFT once per process (`SharedModel`). A request then only copies the adapter's
initial values back and builds a new optimizer; `TrainingRun.setup_ms` measures that cost. The base weights
are never touched. A trainer holds one adapter, so sessions are serialised by the trainer's session lock;
each step also holds the shared model's lock, which is what lets the transformers engine serve from the
same weights in between (see shared_model.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ttserve.config import TrainingConfig
from ttserve.contract import TrainingRun
from ttserve.lm import LoadedModel
from ttserve.shared_model import SharedModel


class TestTimeTrainer:
    __test__ = False  # not a pytest class, despite the name

    def __init__(
        self,
        loaded: LoadedModel,
        config: TrainingConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config or TrainingConfig()
        self.clock = clock  # what deadlines are measured on
        self.shared = SharedModel(loaded, self.config)
        self.tokenizer = loaded.tokenizer
        self.base_name = loaded.name
        self.device = loaded.device
        self.max_length = min(self.config.max_length, loaded.max_length)
        self._session_lock = threading.Lock()  # one session at a time: the trainer holds one adapter

    @property
    def model(self) -> torch.nn.Module:
        """The PEFT-wrapped model, its training adapter active (shared with the transformers engine)."""
        return self.shared.peft

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.shared.trainable_parameters

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
    def session(self, planned_steps: int | None = None) -> Iterator[TrainingSession]:
        """Exclusive use of the model with a fresh adapter and a fresh optimizer, at the rate of a run
        planned for `planned_steps` steps (None: `training.learning_rate`)."""
        config = self.config
        rate = config.learning_rate if planned_steps is None else config.learning_rate_for(planned_steps)
        with self._session_lock:
            started = time.perf_counter()
            self.shared.reset_training_adapter()
            optimizer = torch.optim.AdamW(
                self.trainable_parameters, lr=rate, eps=config.adam_eps, weight_decay=config.weight_decay
            )
            session = TrainingSession(self, optimizer, setup_ms=(time.perf_counter() - started) * 1e3)
            session.run.learning_rate = rate
            yield session

    def train(
        self,
        texts: Sequence[str],
        max_steps: int,
        output_dir: str | Path | None = None,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> TrainingRun:
        """Train a fresh adapter on `texts` for at most `max_steps` steps, at the rate of a `max_steps`-step
        plan; save it to `output_dir` if given."""
        with self.session(planned_steps=max_steps) as session:
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
        # Token pieces still to train on, in order, each with the index of the text it came from.
        self._queue: deque[tuple[int, list[int]]] = deque()
        self._texts = 0  # texts queued so far in this session

    def train(
        self,
        texts: Sequence[str],
        max_steps: int,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> TrainingRun:
        """Queue `texts` (after anything still queued) and take up to `max_steps` steps."""
        for text in texts:
            self._queue.extend((self._texts, piece) for piece in self.trainer.chunks([text]))
            self._texts += 1
        return self.resume(max_steps, deadline=deadline, cancel=cancel)

    def resume(
        self, max_steps: int, deadline: float | None = None, cancel: threading.Event | None = None
    ) -> TrainingRun:
        """Take up to `max_steps` more steps from the queue, continuing this session's adapter and optimizer.

        `deadline` is a value of the trainer's clock (time.monotonic() by default); it and `cancel` are checked
        between steps, so a step that has started always finishes and the adapter is never half-updated: an
        adapter stopped after k steps is exactly the adapter of the first k steps.
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
                if deadline is not None and self.trainer.clock() >= deadline:
                    self.run.stopped = "deadline"
                    break
                text_index, piece = self._queue.popleft()
                input_ids = torch.tensor([piece], device=self.trainer.device)
                with self.trainer.shared.training_step() as model:
                    loss = model(input_ids=input_ids, labels=input_ids).loss
                    loss.backward()
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(
                            self.trainer.trainable_parameters, config.max_grad_norm
                        )
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.run.losses.append(float(loss.detach()))
                self.run.tokens += len(piece)
                self.run.steps += 1
                self.run.sequences = text_index + 1
                taken += 1
            else:
                self.run.stopped = "completed"
        finally:
            self.run.seconds += time.perf_counter() - started
        return self.run

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in PEFT's saved format (CPU copies)."""
        return self.trainer.shared.training_adapter_state()

    def save(self, output_dir: str | Path) -> Path:
        """Write the adapter in standard PEFT format (adapter_model.safetensors + adapter_config.json)."""
        return self.trainer.shared.save_training_adapter(output_dir)
