"""Timings on a GPU host, prepared to run in one go where nothing can be downloaded (issue 10's GPU check).

Here, once: the default model's tokenizer (a few MB; weights never travel) and the wheels ttserve needs that
the GPU image lacks (pydantic and pydantic-settings; the image is Python 3.12, see the device tool's README):

    mkdir -p results/gpu-tokenizer && cp ~/.cache/ttserve/models/SmolLM2-135M-Instruct-*/{tokenizer.json,tokenizer_config.json,chat_template.jinja} results/gpu-tokenizer/
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
        annotated-types==0.8.0 typing-inspection==0.4.5

On the GPU machine (carry `.whl` and `results/gpu-tokenizer`; about 4 minutes on one H200):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 && \
        python3 benchmarks/gpu_timings.py --tokenizer results/gpu-tokenizer --json $OUT/gpu.json

A smoke run on a CPU (tiny shapes, seconds):

    .venv/bin/python benchmarks/gpu_timings.py --tokenizer results/gpu-tokenizer --device cpu --shapes tiny \
        --steps 2 --lengths 64,128 --tokens 8

Models are random-initialised Llamas of real shapes, built in bf16 on the device (`--shapes`):
SmolLM2-135M's and Llama-3.2-1B's configurations. Speed depends on shapes, not on the weights' values.

For each shape, through ttserve's own classes:
1. Training: `TestTimeTrainer` steps (fresh LoRA rank 16 on every projection, AdamW, bf16 autocast) on
   sequences of exactly L tokens, L in `--lengths`: median ms per step after a warm-up.
2. The transformers engine (`TransformersEngine` over the trainer's `SharedModel`): greedy tokens/s, 1 and 4
   streams, base model and with a trained adapter, and `add_adapter` ms.
And once: SIFT selection (`ttserve.selection.sift`) on CUDA tensors, K=200 candidates, N=50 picks,
d=1024 and 384, against the same call on numpy arrays on the host CPU.

Imports nothing the GPU image lacks (no Faiss, no vLLM, no Ray).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct's config.json
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_theta=100000.0,
    ),
    # meta-llama/Llama-3.2-1B's config.json (rope scaling left out: it does not change the cost)
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_theta=500000.0,
    ),
    # for a smoke run on a CPU
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
    ),
}  # fmt: skip


def random_model(shape: str, tokenizer, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ttserve.lm import LoadedModel

    config = LlamaConfig(
        **SHAPES[shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    parameters = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, tokenizer, f"random-{shape}", device, max_length=4096), parameters


def source_text(tokens: int, tokenizer) -> str:
    """Standard-library source, at least `tokens` tokens of it (any Python install has it)."""
    text = ""
    for module in (json, inspect, argparse, asyncio, statistics, tempfile):
        text += inspect.getsource(module)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > tokens:
            return text
    return text * (1 + tokens // max(1, len(tokenizer(text)["input_ids"])))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_ms(trainer, text: str, length: int, steps: int, device) -> float:
    """Median ms per step on pieces of exactly `length` tokens (the trainer cuts at max_length)."""
    trainer.max_length = length
    trainer.train([text], 2)  # warm-up: kernels, allocator, the optimizer's first state
    times = []
    for _ in range(3):
        sync(device)
        started = time.perf_counter()
        run = trainer.train([text], steps)
        sync(device)
        assert run.steps == steps and run.tokens == steps * length, (run.steps, run.tokens)
        times.append((time.perf_counter() - started) / steps * 1e3)
    return statistics.median(times)


async def engine_rows(engine, prompt_ids, adapter_dir: Path, tokens: int, device) -> dict:
    from ttserve.engines import SamplingParams, collect

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def rate(streams: int, adapter) -> float:
        await collect(engine.generate(prompt_ids, params, adapter))  # warm-up
        sync(device)
        started = time.perf_counter()
        results = await asyncio.gather(
            *(collect(engine.generate(prompt_ids, params, adapter)) for _ in range(streams))
        )
        sync(device)
        assert all(r.usage.completion_tokens == tokens for r in results)
        return streams * tokens / (time.perf_counter() - started)

    adds = []
    for _ in range(4):
        started = time.perf_counter()
        adapter = await engine.add_adapter(adapter_dir)
        adds.append((time.perf_counter() - started) * 1e3)
        await engine.remove_adapter(adapter)
    adapter = await engine.add_adapter(adapter_dir)
    rows = {
        "base_1": await rate(1, None),
        "base_4": await rate(4, None),
        "adapted_1": await rate(1, adapter),
        "adapted_4": await rate(4, adapter),
        "add_adapter_ms_median": statistics.median(adds[1:]),
    }
    await engine.remove_adapter(adapter)
    return rows


def sift_rows(device: torch.device, repeats: int) -> list[dict]:
    from ttserve.selection import sift

    rows = []
    rng = np.random.default_rng(0)
    for d in (1024, 384):
        candidates = rng.standard_normal((200, d)).astype(np.float32)
        candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
        query = candidates[:3].mean(0, keepdims=True) + 0.1 * rng.standard_normal((1, d)).astype(np.float32)
        on_device = (torch.tensor(candidates, device=device), torch.tensor(query, device=device))
        timings = {}
        for name, args in (("host numpy", (candidates, query)), (f"{device.type} torch", on_device)):
            sift(*args, 50, 0.01)  # warm-up
            times = []
            for _ in range(repeats):
                sync(device)
                started = time.perf_counter()
                picks = sift(*args, 50, 0.01)
                sync(device)
                times.append((time.perf_counter() - started) * 1e3)
            timings[name] = (statistics.median(times), picks.indices.tolist())
        (host_ms, host_picks), (device_ms, device_picks) = timings.values()
        rows.append(
            {"d": d, "host_ms": host_ms, "device_ms": device_ms, "same_picks": host_picks == device_picks}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory (the default model's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--shapes", default="smollm2-135m,llama-1b", help=f"comma-separated: {', '.join(SHAPES)}"
    )
    parser.add_argument("--lengths", default="256,512,1024", help="training tokens per step")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per repeat")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per stream")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from ttserve.config import TrainingConfig
    from ttserve.engines.transformers import TransformersEngine
    from ttserve.training import TestTimeTrainer

    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    lengths = [int(n) for n in args.lengths.split(",")]
    text = source_text(max(lengths) * (args.steps + 2), tokenizer)
    prompt_ids = tokenizer("def read_lines(path):\n", add_special_tokens=False)["input_ids"]
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": {},
    }
    for shape in args.shapes.split(","):
        loaded, parameters = random_model(shape, tokenizer, device)
        trainer = TestTimeTrainer(loaded, TrainingConfig(autocast_bf16=True))
        row: dict = {"parameters": parameters, "training_ms_per_step": {}}
        for length in lengths:
            row["training_ms_per_step"][length] = training_ms(trainer, text, length, args.steps, device)
            print(
                f"{shape}: training {length} tokens/step {row['training_ms_per_step'][length]:.1f} ms",
                flush=True,
            )
        adapter_dir = Path(tempfile.mkdtemp(prefix="gpu-timings-")) / "adapter"
        trainer.train([text], 2, output_dir=adapter_dir)
        engine = TransformersEngine(trainer.shared)
        row["engine_tokens_per_s"] = asyncio.run(
            engine_rows(engine, prompt_ids, adapter_dir, args.tokens, device)
        )
        asyncio.run(engine.close())
        print(f"{shape}: engine {row['engine_tokens_per_s']}", flush=True)
        results["shapes"][shape] = row
        del trainer, engine, loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["sift"] = sift_rows(device, repeats=20)
    print(f"sift: {results['sift']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
