"""Does serving get slower as the adapter cache fills? transformers engine, embedded default model.

Loads 0, 8, 16, 24 and 32 copies of one trained adapter into the engine (the cache's default bound is 16)
and times a 32-token greedy generation with the base model and with an adapter, median of 5, plus 8
training steps. PEFT's per-call `adapter_names` made generation 2.6x slower at 32 adapters; the engine
now routes its LoRA layers directly (ttserve/engines/transformers.py).

    .venv/bin/python benchmarks/bench_adapter_count.py
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ttserve.engines import SamplingParams, collect
from ttserve.engines.transformers import TransformersEngine
from ttserve.lm import load_model
from ttserve.training import TestTimeTrainer

CODE = "def read_config(path):\n    with open(path) as handle:\n        return handle.read()\n"


async def main() -> None:
    trainer = TestTimeTrainer(load_model())
    engine = TransformersEngine(trainer.shared)
    scratch = Path(tempfile.mkdtemp(prefix="bench-adapter-count-"))
    try:
        trainer.train([CODE * 8] * 4, 4, output_dir=scratch / "trained")
        ids = engine.encode("import os\n")
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        adapters = []
        print("| adapters loaded | base generation ms | adapted generation ms | 8 training steps ms |")
        print("|---:|---:|---:|---:|")
        for count in (0, 8, 16, 24, 32):
            while len(adapters) < count:
                copy = scratch / f"copy-{len(adapters)}"
                shutil.copytree(scratch / "trained", copy)
                adapters.append(await engine.add_adapter(copy))
            timings = {}
            for name, adapter in (("base", None), ("adapted", adapters[0] if adapters else None)):
                runs = []
                for _ in range(5):
                    started = time.perf_counter()
                    await collect(engine.generate(ids, params, adapter))
                    runs.append(time.perf_counter() - started)
                timings[name] = statistics.median(runs) * 1e3
            run = trainer.train([CODE * 4] * 8, 8)
            print(f"| {count} | {timings['base']:.0f} | {timings['adapted']:.0f} | {run.seconds * 1e3:.0f} |")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
