"""Trainer overhead against a bare PEFT training loop, and per-request setup time.

    .venv/bin/python benchmarks/bench_trainer.py                 # the embedded default model, 32 steps
    .venv/bin/python benchmarks/bench_trainer.py --model DIR --steps 8

Both sides train the same LoRA (same rank, targets, optimizer and clipping) on the same sequences. The
sequences are the first ones of the embedded default datastore, which is built if missing. A request
through `TestTimeTrainer.train` includes resetting the adapter, building a fresh optimizer, tokenizing
and chunking. The bare loop is what one would write by hand with PEFT: tokenize, then
forward/backward/clip/step on a model wrapped once, with one optimizer per request. The two run
alternately, R times each, and medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model

from ttserve.config import ModelConfig, Settings, TrainingConfig
from ttserve.datastore import Datastore
from ttserve.datastore.local_corpus import ensure_datastore
from ttserve.lm import load_model
from ttserve.lora import lora_config
from ttserve.training import TestTimeTrainer


def bare_request(model, tokenizer, parameters, texts: list[str], config: TrainingConfig) -> None:
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, eps=config.adam_eps)
    model.train()
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        ids = torch.tensor([ids[: config.max_length]])
        with torch.autocast("cpu", torch.bfloat16, enabled=bool(config.autocast_bf16)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model directory or hub id (default: the embedded default)"
    )
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument(
        "--autocast-bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train under bf16 autocast or not (training.autocast_bf16; default: where bf16 is native)",
    )
    parser.add_argument(
        "--lora-layers", type=int, default=None, help="LoRA in the last N blocks only (training.lora_layers)"
    )
    args = parser.parse_args()

    settings = Settings(
        model=ModelConfig(name_or_path=args.model, device="cpu"),
        training=TrainingConfig(autocast_bf16=args.autocast_bf16, lora_layers=args.lora_layers),
    )
    ensure_datastore(settings)
    store = Datastore(settings.datastore.path)
    texts = [s.text for s in store.sequences(range(args.steps))]
    config = settings.training

    trainer = TestTimeTrainer(load_model(settings.model), config)
    bare = load_model(settings.model)
    torch.manual_seed(config.seed)
    bare_model = get_peft_model(bare.model, lora_config(config, bare.model.config, bare.name))
    bare_parameters = [p for p in bare_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in bare_parameters) == sum(p.numel() for p in trainer.trainable_parameters)

    trainer_seconds, bare_seconds, setup_ms = [], [], []
    trainer.train(texts[:2], 2)  # warm-up both
    bare_request(bare_model, bare.tokenizer, bare_parameters, texts[:2], config)
    for i in range(args.requests):
        for side in ("trainer", "bare") if i % 2 == 0 else ("bare", "trainer"):
            started = time.perf_counter()
            if side == "trainer":
                run = trainer.train(texts, args.steps)
                assert run.steps == args.steps
                setup_ms.append(run.setup_ms)
                trainer_seconds.append(time.perf_counter() - started)
            else:
                bare_request(bare_model, bare.tokenizer, bare_parameters, texts, config)
                bare_seconds.append(time.perf_counter() - started)

    t, b = statistics.median(trainer_seconds), statistics.median(bare_seconds)
    trainable = sum(p.numel() for p in bare_parameters)
    total = sum(p.numel() for p in bare_model.parameters())
    tokens = sum(len(trainer.tokenizer(x, add_special_tokens=False)["input_ids"]) + 1 for x in texts)
    print(
        f"model {trainer.base_name} ({total / 1e6:.2f}M parameters, {trainable / 1e3:.0f}k LoRA), {args.steps} steps, {tokens} tokens, {args.requests} requests each"
    )
    print("| measurement | median |")
    print("|---|---:|")
    print(f"| bare PEFT loop, per request | {b * 1e3:.1f} ms |")
    print(f"| TestTimeTrainer.train, per request | {t * 1e3:.1f} ms |")
    print(f"| trainer overhead | {100 * (t - b) / b:+.1f}% |")
    print(f"| per-request setup (adapter reset + fresh optimizer) | {statistics.median(setup_ms):.2f} ms |")
    print(f"| per training step (trainer) | {t / args.steps * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
