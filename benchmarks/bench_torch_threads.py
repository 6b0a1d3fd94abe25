"""Why a replica gives torch's threads to the training thread and one to every other thread (threads.py).

    .venv/bin/python benchmarks/bench_torch_threads.py --other-threads 2   # what the replica did before
    .venv/bin/python benchmarks/bench_torch_threads.py --other-threads 1   # the replica's split (default)

On the default model and datastore, in one process laid out like a replica: a training thread (torch's
default thread count) and an inference thread with `--other-threads` threads.

1. Training steps on the training thread, before the inference thread has run anything (`alone`).
2. One greedy decode of `--tokens` tokens on the inference thread, with the base model and with an adapter
   (ms per token), as generation runs on a replica; and one prefill of a `--prompt-tokens` prompt, where a
   second thread does help.
3. Training steps again (`after inference`): with two threads there, the inference thread now holds an
   OpenMP team of its own, and the process more OpenMP workers than CPUs.

Steps train on the same sequences each time (`--steps` steps, `--repeats` times, median per step).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ttserve.config import Settings
from ttserve.datastore import Datastore
from ttserve.datastore.local_corpus import ensure_datastore
from ttserve.lm import load_model
from ttserve.threads import default_torch_threads, set_torch_threads
from ttserve.training import TestTimeTrainer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--other-threads", type=int, default=1, help="torch threads of the inference thread")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for the prefill row")
    args = parser.parse_args()

    settings = Settings()
    ensure_datastore(settings)
    texts = [s.text for s in Datastore(settings.datastore.path).sequences(range(100, 100 + args.steps))]
    training_threads = default_torch_threads()
    training, inference = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    # The replica's order (threads.py): the training thread first, then the count every other thread gets.
    training.submit(set_torch_threads, training_threads).result()
    set_torch_threads(args.other_threads)
    trainer = TestTimeTrainer(load_model(settings.model), settings.training)
    shared = trainer.shared

    def seconds_per_step() -> float:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run = trainer.train(texts, args.steps)
            times.append((time.perf_counter() - started) / run.steps)
        return statistics.median(times)

    def ms_per_token(adapter: str | None) -> float:
        ids, past = torch.tensor([trainer.tokenizer("def read_lines(path):")["input_ids"]]), None
        started = time.perf_counter()
        for _ in range(args.tokens):
            with shared.routed(adapter) as model:
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - started) / args.tokens * 1e3

    def prefill_ms() -> float:
        ids = torch.tensor([trainer.tokenizer(" ".join(texts))["input_ids"][: args.prompt_tokens]])
        started = time.perf_counter()
        with shared.routed(None) as model:
            model(input_ids=ids, use_cache=True)
        return (time.perf_counter() - started) * 1e3

    training.submit(trainer.train, texts[:2], 2).result()  # warm-up
    alone = training.submit(seconds_per_step).result()
    directory = tempfile.mkdtemp()
    training.submit(trainer.train, texts, 2, directory).result()
    shared.load_adapter(directory, "bench")
    inference.submit(ms_per_token, None).result()  # warm-up
    base = statistics.median(inference.submit(ms_per_token, None).result() for _ in range(3))
    adapted = statistics.median(inference.submit(ms_per_token, "bench").result() for _ in range(3))
    inference.submit(prefill_ms).result()  # warm-up
    prefill = statistics.median(inference.submit(prefill_ms).result() for _ in range(3))
    after = training.submit(seconds_per_step).result()
    tokens = sum(len(trainer.tokenizer(t)["input_ids"]) for t in texts) / len(texts)
    print(f"training thread: {training_threads} threads; inference thread: {args.other_threads}")
    print(f"| measurement ({args.other_threads} inference thread(s)) | median |")
    print("|---|---:|")
    print(f"| training step, alone ({tokens:.0f} tokens) | {alone * 1e3:.0f} ms |")
    print(f"| decode, base model | {base:.1f} ms/token |")
    print(f"| decode, with an adapter | {adapted:.1f} ms/token |")
    print(f"| prefill, {args.prompt_tokens}-token prompt, base model | {prefill:.0f} ms |")
    print(f"| training step, after inference ran | {after * 1e3:.0f} ms ({after / alone:.2f}× alone) |")


if __name__ == "__main__":
    main()
