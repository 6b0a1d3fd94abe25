"""The test-time trainer: fresh adapters, chunking, budgets, deadlines, and PEFT-compatible output."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ttserve.scoring import score_text

TEXTS = [
    "def parse(data):\n    return json.loads(data)\n",
    "class Cache:\n    def __init__(self):\n        self.items = {}\n",
    "for key, value in sorted(items.items()):\n    print(key, value)\n",
]


def adapter_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_adapter_and_optimizer_per_request(make_trainer):
    shared = make_trainer()
    with shared.session() as session:
        initial = session.adapter_state()
    base_weight = next(p for n, p in shared.model.named_parameters() if "lora" not in n).detach().clone()

    shared.train(TEXTS[:2] * 3, max_steps=6)  # request A moves the adapter and fills Adam's moments
    with shared.session() as session:
        assert adapter_equal(session.adapter_state(), initial)  # B starts from the same fresh adapter
        session.train(TEXTS[2:] * 4, max_steps=4)
        after_a_then_b = session.adapter_state()

    alone = make_trainer()
    with alone.session() as session:
        session.train(TEXTS[2:] * 4, max_steps=4)
        b_alone = session.adapter_state()
    assert adapter_equal(after_a_then_b, b_alone)
    assert not adapter_equal(after_a_then_b, initial)
    # Only the adapter trains: the base weights are untouched.
    assert torch.equal(next(p for n, p in shared.model.named_parameters() if "lora" not in n), base_weight)


def test_chunking_one_step_per_piece(make_trainer):
    trainer = make_trainer(max_length=16)
    text = " ".join(f"value_{i} = compute({i})" for i in range(40))
    tokens = len(trainer.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + BOS
    expected_steps = math.ceil(tokens / 16) - (1 if tokens % 16 == 1 else 0)
    pieces = list(trainer.chunks([text]))
    assert len(pieces) == expected_steps and all(2 <= len(p) <= 16 for p in pieces)
    assert sum(len(p) for p in pieces) == tokens - (1 if tokens % 16 == 1 else 0)
    run = trainer.train([text], max_steps=1000)
    assert (
        run.steps == expected_steps
        and run.stopped == "completed"
        and run.tokens == sum(len(p) for p in pieces)
    )
    # A sequence picked twice is trained on twice.
    per_copy = len(list(trainer.chunks([TEXTS[0]])))
    assert trainer.train([TEXTS[0], TEXTS[0]], max_steps=10).steps == 2 * per_copy


@pytest.mark.parametrize("budget", [0, 1, 3, 5])
def test_budget_is_never_exceeded(make_trainer, budget):
    trainer = make_trainer()
    run = trainer.train(TEXTS * 3, max_steps=budget)
    assert run.steps == budget and len(run.losses) == budget
    assert run.stopped == "budget"
    assert run.setup_ms > 0


def test_budget_zero_leaves_the_base_model(make_trainer):
    trainer = make_trainer()
    with trainer.session() as session:
        session.train(TEXTS, 0)
        with_adapter = score_text(session.model, trainer.tokenizer, TEXTS[0], 64)
        with session.model.disable_adapter():
            base = score_text(session.model, trainer.tokenizer, TEXTS[0], 64)
    assert with_adapter.loglik == pytest.approx(base.loglik, abs=1e-6)


def test_deadline_and_cancel_are_checked_between_steps(make_trainer):
    trainer = make_trainer()
    expired = trainer.train(TEXTS * 5, max_steps=15, deadline=time.monotonic() - 1)
    assert expired.steps == 0 and expired.stopped == "deadline"

    cancel = threading.Event()
    calls = []

    def stop_after_two(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            cancel.set()

    hook = trainer.model.register_forward_hook(stop_after_two)
    try:
        cancelled = trainer.train(TEXTS * 5, max_steps=15, cancel=cancel)
    finally:
        hook.remove()
    assert cancelled.steps == 2 and cancelled.stopped == "cancelled"  # the step in flight completes


def test_a_shorter_plan_trains_at_a_proportionally_larger_rate(make_trainer):
    trainer = make_trainer(learning_rate=1e-3, learning_rate_steps=16, learning_rate_max_scale=4)
    rates = [trainer.config.learning_rate_for(n) for n in (1, 2, 4, 8, 16, 32)]
    assert rates == pytest.approx([4e-3, 4e-3, 4e-3, 2e-3, 1e-3, 1e-3])  # capped at 4x below 4 steps
    four_step_plan = trainer.train(TEXTS * 2, max_steps=4)
    assert four_step_plan.learning_rate == pytest.approx(4e-3)
    with trainer.session(planned_steps=4) as session:
        session.train(TEXTS * 2, 4)
        four_steps = session.adapter_state()
    # The rate is the only difference: a trainer set to 4e-3 for every plan trains the same adapter ...
    constant = make_trainer(learning_rate=4e-3, learning_rate_steps=None)
    with constant.session(planned_steps=4) as session:
        session.train(TEXTS * 2, 4)
        assert adapter_equal(session.adapter_state(), four_steps)
    # ... and the first 4 steps of a 16-step plan (cut short by a deadline, say) are another adapter.
    with trainer.session(planned_steps=16) as session:
        session.train(TEXTS * 2, 4)
        assert session.run.learning_rate == pytest.approx(1e-3)
        assert not adapter_equal(session.adapter_state(), four_steps)


def test_training_is_deterministic_and_helps_on_the_trained_text(make_trainer):
    first, second = make_trainer(), make_trainer()
    for trainer in (first, second):
        with trainer.session() as session:
            before = score_text(session.model, trainer.tokenizer, TEXTS[1], 64).bits_per_byte
            session.train([TEXTS[1]] * 8, 8)
            trainer.result = (session.adapter_state(), session.run.losses)
            after = score_text(session.model, trainer.tokenizer, TEXTS[1], 64).bits_per_byte
    assert adapter_equal(first.result[0], second.result[0]) and first.result[1] == second.result[1]
    assert after < before


def test_adapter_is_standard_peft(make_trainer, tiny_model_dir, tmp_path):
    trainer = make_trainer()
    run = trainer.train(TEXTS, max_steps=3, output_dir=tmp_path / "adapter")
    assert run.steps == 3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 16
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter"
    ).eval()
    ids = trainer.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    # A new session resets the adapter; the same 3 steps at a 3-step plan's rate recreate it.
    with trainer.session(planned_steps=3) as session:
        session.train(TEXTS, 3)
        with torch.no_grad():
            actual = session.model(input_ids=ids).logits
            expected = plain(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_requests_are_serialised(make_trainer):
    trainer = make_trainer()
    inside, overlaps = [], []

    def request(texts):
        with trainer.session() as session:
            inside.append(1)
            overlaps.append(len(inside))
            session.train(texts, 3)
            inside.pop()

    threads = [threading.Thread(target=request, args=([TEXTS[i % 3]] * 3,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1] * 6


def test_lora_layers_adapts_only_the_last_blocks(make_trainer, tmp_path):
    """`lora_layers=1`: LoRA in the top block only, and the saved adapter names no other block."""
    full, top = make_trainer(), make_trainer(lora_layers=1)
    layers = top.model.get_base_model().config.num_hidden_layers
    assert layers > 1
    assert len(top.trainable_parameters) * layers == len(full.trainable_parameters)
    top.train(TEXTS, max_steps=2, output_dir=tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [layers - 1]
    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {key.split(".layers.")[1].split(".")[0] for key in state} == {str(layers - 1)}
