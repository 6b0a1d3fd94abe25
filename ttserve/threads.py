"""Who runs where on one generator replica: the concurrency model, in one place.

    thread                     owns / runs                                      talks to the loop by
    -------------------------  -----------------------------------------------  --------------------------
    the event loop (1)         the request pipeline, the adapter cache, the     (it is the loop)
                               training queue's counters, the vLLM LoRA gate,
                               the HTTP layer when in-process
    the training thread (1)    `trainer.train`: one request's training at a     the future of its run
                               time, in arrival order (TrainingThread below)
    inference threads (N)      transformers engine only: one request's decode   chunks put on an asyncio
                               loop each, and adapter loads/unloads             queue; futures
    the default executor       retrieval (embedder, Faiss, SIFT) in-process;    futures
                               in the Ray app, a plan-less request's Planner calls

Shared state between threads is kept to three places, each with its own lock:

- `SharedModel.serving_lock` and `.training_lock` (shared_model.py): the model's two module trees over one
  copy of the base weights. Inference passes and adapter loads hold the first, training steps the second,
  so a base-model request's tokens never wait for someone else's training step.
- `TestTimeTrainer`'s session lock: a trainer holds one adapter, so one session at a time. On a replica
  only the training thread trains, so it is never contended there; it guards direct library use.
- `Embedder`'s lock: Hugging Face fast tokenizers are not thread-safe, and one forward pass already uses
  every core, so embedding is serialised while Faiss and SIFT run in parallel. (SIFT itself pins numpy's
  BLAS to one thread while any selection runs; see selection.py.)

Everything else (the cache's entries and single-flight futures, the queue counters and the per-step
speed estimate, the LoRA gate's counts) is touched only on the event loop, so it needs no lock; the
asyncio primitives there (the cache's lock, the gate's condition) order coroutines, not threads.

vLLM runs its own engine process; the vLLM engine only awaits it from the loop.

**Torch's intra-op threads.** The training thread gets `training.cpu_threads` (default: every CPU torch would
use); every other thread that runs torch (inference passes, embedding, the loop) gets `engine.cpu_threads`
(default 1). The reason is GNU OpenMP, torch's intra-op pool on CPU: each thread that ever runs a parallel
region keeps its own team of worker threads, and once the process holds more of them than it has CPUs, every
worker sleeps at each barrier instead of spinning. A training step is thousands of parallel regions, so it then
pays a wake-up per region: in the server, after one retrieval and one generation had built their own teams, a
step ran about twice as slow as alone. Single-thread inference builds no team. Decoding a small model barely
gains from a second thread (memory and Python bound); prefilling a long prompt does, which is the split's
cost (BENCHMARKS.md, "Torch threads").
`GeneratorReplica.start` assigns the counts, training thread first (see `set_torch_threads`).

**Priority.** The training thread (and the worker threads torch creates for it, which inherit it) runs
`training.cpu_niceness` below the rest (`lower_thread_priority`): when inference and training want the
same core, the next token goes first and training takes what is left (BENCHMARKS.md, "Isolation").
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from ttserve.contract import TrainingRun


class Trainer(Protocol):
    """What the pipeline needs of a trainer (ttserve.training.TestTimeTrainer, or a stand-in in tests)."""

    base_name: str  # the model adapters are trained for

    def train(
        self,
        texts: Sequence[str],
        max_steps: int,
        *,
        output_dir: Path,
        deadline: float,
        cancel: threading.Event,
    ) -> TrainingRun: ...


_process_default: int | None = None


def default_torch_threads() -> int:
    """The count torch chose for this process (OMP_NUM_THREADS, which Ray sets from a replica's num_cpus;
    else the CPUs it may run on), as read the first time this is called: call it before setting any."""
    global _process_default
    if _process_default is None:
        import torch

        _process_default = torch.get_num_threads()
    return _process_default


def set_torch_threads(count: int) -> None:
    """Give the calling thread `count` torch intra-op threads.

    torch keeps one process-wide count, which a thread copies the first time it runs torch, and each thread's
    own (OpenMP's per-thread setting). `torch.set_num_threads` sets both: so set the thread that needs more
    first, then set the rest from another thread; every thread that first runs torch afterwards gets the
    value set last.
    """
    import torch

    torch.get_num_threads()  # this thread's first use: it copies the process-wide count now, not later
    torch.set_num_threads(count)


def lower_thread_priority(niceness: int) -> bool:
    """Add `niceness` to the calling thread's nice value (Linux: per thread). False where unsupported."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except (AttributeError, OSError):
        return False
    return True


class TrainingStopped(Exception):
    """Training was admitted but stopped before its first step (deadline, cancellation); the reason goes
    into the answer, which the base model then gives. (Stopped after k > 0 steps, the run is returned: its
    adapter is the k-step adapter.)"""


class TrainingThread:
    """The replica's one training thread: trainings run one at a time, in arrival order.

    Its counters (`queued`, `queued_steps`) and the speed estimate (`seconds_per_step`) are read and written
    on the event loop only: the thread hands back its run, and the loop updates them from it.
    """

    def __init__(self, trainer: Trainer, clock: Callable[[], float]):
        self.trainer = trainer
        self.clock = clock
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ttserve-train")
        self.queued = 0  # admitted trainings not finished (waiting or running)
        self.queued_steps = 0
        self.seconds_per_step: float | None = None  # a running average, for admission

    async def set_torch_threads(self, count: int) -> None:
        """`set_torch_threads(count)` on the training thread."""
        await asyncio.get_running_loop().run_in_executor(self._executor, set_torch_threads, count)

    async def lower_priority(self, niceness: int) -> None:
        """Run the training thread `niceness` steps below the rest of the process (Linux threads have their
        own nice value). Call before it trains: the worker threads torch starts for it inherit the value
        when they are created. Elsewhere, or without permission, it stays as it is."""
        await asyncio.get_running_loop().run_in_executor(self._executor, lower_thread_priority, niceness)

    def refusal(self, steps: int, deadline: float, max_queued: int) -> str | None:
        """Why a new training of `steps` steps must not start (None: admit it)."""
        if self.queued >= max_queued:
            return f"the training queue is full ({self.queued} requests)"
        if self.seconds_per_step is not None:
            needed = (self.queued_steps + steps) * self.seconds_per_step
            left = deadline - self.clock()
            if needed > left:
                return f"training could not finish within the deadline (about {needed:.1f}s needed, {left:.1f}s left)"
        return None

    async def train(self, texts: Sequence[str], steps: int, directory: Path, deadline: float) -> TrainingRun:
        """Train up to `steps` steps on `texts` into `directory`. A run cut short after k > 0 steps is
        returned (`run.cut_short`); one stopped before its first step raises TrainingStopped.

        If the caller is cancelled (its client went away), the trainer stops at its next step and this
        waits until it has, so the directory is no longer being written when the caller cleans it up.
        """
        self.queued += 1
        self.queued_steps += steps
        cancel = threading.Event()
        work = asyncio.get_running_loop().run_in_executor(
            self._executor, self._run, texts, steps, directory, deadline, cancel
        )
        try:
            run = await asyncio.shield(work)
        except asyncio.CancelledError:
            cancel.set()
            await asyncio.wait([work])
            raise
        finally:
            self.queued -= 1
            self.queued_steps -= steps
            if work.done() and not work.cancelled() and work.exception() is None:
                self._observe(work.result())
        if run.cut_short and run.steps == 0:
            raise TrainingStopped(f"training stopped ({run.stopped}) before its first step")
        return run

    def _run(
        self, texts: Sequence[str], steps: int, directory: Path, deadline: float, cancel: threading.Event
    ) -> TrainingRun:
        if cancel.is_set():
            raise TrainingStopped("the request was cancelled before training started")
        if self.clock() >= deadline:
            raise TrainingStopped("the deadline passed while the request waited for the trainer")
        return self.trainer.train(texts, steps, output_dir=directory, deadline=deadline, cancel=cancel)

    def _observe(self, run: TrainingRun) -> None:
        if run.steps:
            per_step = run.seconds / run.steps
            previous = self.seconds_per_step
            self.seconds_per_step = per_step if previous is None else 0.8 * previous + 0.2 * per_step

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
