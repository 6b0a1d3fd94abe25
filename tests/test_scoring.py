"""Bits per byte: every token predicted exactly once, in windows when the text outgrows the context."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttserve.evaluation import DocumentResult, EvalReport
from ttserve.scoring import TextScore, bits_per_byte, prefix_token_id, score_text, token_logprobs


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


def test_single_window_matches_a_direct_forward_pass(lm):
    model, tokenizer = lm
    text = "import os\nprint(os.getcwd())  # héllo ✓\n"
    ids = [prefix_token_id(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    direct = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).sum()
    score = score_text(model, tokenizer, text, max_length=512)
    assert score.loglik == pytest.approx(float(direct), rel=1e-5)
    assert score.tokens == len(ids) - 1 and score.bytes == len(text.encode())
    assert score.bits_per_byte == pytest.approx(-float(direct) / (math.log(2) * score.bytes), rel=1e-5)


@pytest.mark.parametrize("window", [2, 5, 17, 64])
def test_windows_predict_every_token_once(lm, window):
    model, tokenizer = lm
    ids = [
        prefix_token_id(tokenizer),
        *tokenizer("def f(x):\n    return x * 2\n" * 6, add_special_tokens=False)["input_ids"],
    ]
    logprobs = token_logprobs(model, ids, window)
    assert logprobs.shape == (len(ids) - 1,)
    # Windows start at 0, w-1, 2(w-1), ...: token j is predicted from the tokens of its window before it.
    for j in (1, window - 1, window, min(2 * window, len(ids) - 1), len(ids) - 1):
        start = ((j - 1) // (window - 1)) * (window - 1)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[start:j]])).logits[0, -1]
        assert float(logprobs[j - 1]) == pytest.approx(
            float(torch.log_softmax(logits, -1)[ids[j]]), rel=1e-4, abs=1e-5
        )


def test_byte_weighted_aggregate():
    # Over documents BPB is the summed log-likelihood over the summed bytes, not a mean of per-document BPBs.
    scores = [TextScore(loglik=-10.0, tokens=5, bytes=10), TextScore(loglik=-30.0, tokens=9, bytes=20)]
    total = bits_per_byte(sum(s.loglik for s in scores), sum(s.bytes for s in scores))
    assert total == pytest.approx(40 / (math.log(2) * 30))
    assert total != pytest.approx(sum(s.bits_per_byte for s in scores) / len(scores))
    # The evaluation report aggregates its documents the same way.
    documents = [
        DocumentResult(id=f"d{i}", bytes=s.bytes, tokens=s.tokens, excluded=0, base_loglik=s.loglik)
        for i, s in enumerate(scores)
    ]
    assert EvalReport(config={}, documents=documents).bpb() == pytest.approx(40 / (math.log(2) * 30))
    assert bits_per_byte(0.0, 0) == 0.0 and EvalReport(config={}, documents=[]).bpb() == 0.0


def test_tiny_inputs(lm):
    model, tokenizer = lm
    assert token_logprobs(model, [1], 16).numel() == 0
    with pytest.raises(ValueError):
        token_logprobs(model, [1, 2, 3], 1)
    assert score_text(model, tokenizer, "a", 16).tokens == 1
