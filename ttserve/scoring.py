"""Scoring text under a causal LM: per-token log-likelihoods and bits per byte (spec §5).

    BPB = − Σ_docs loglik(doc) / (ln 2 · Σ_docs utf8_bytes(doc))

Every token of a document is predicted exactly once. The document is prefixed with the tokenizer's BOS
token (EOS when it has none), so the first real token is scored too. Documents longer than the model's
context are scored in consecutive windows (the rolling scheme of lm-evaluation-harness): window w
predicts tokens [s_w, e_w) from the tokens before them inside the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def bits_per_byte(loglik: float, n_bytes: int) -> float:
    """−loglik / (ln 2 · n_bytes): a natural-log likelihood as bits per UTF-8 byte (0.0 for no bytes).

    The one place the conversion is written. Over several documents, pass the summed log-likelihood and
    the summed bytes: that is the byte-weighted aggregate of spec §5.
    """
    return -loglik / (math.log(2) * n_bytes) if n_bytes else 0.0


@dataclass(frozen=True)
class TextScore:
    loglik: float  # natural-log likelihood of every token
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.loglik, self.bytes)


def prefix_token_id(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to predict the first token from")
    return int(token)


@torch.no_grad()
def token_logprobs(model, input_ids: list[int], max_length: int) -> torch.Tensor:
    """log p(input_ids[i] | input_ids[:i]) for i = 1 .. len-1, in windows of at most `max_length` tokens.

    Window w feeds tokens [start, end) and scores the predictions of tokens start+1 .. end-1 that no earlier
    window scored; consecutive windows overlap by one token, so every token after the first is predicted
    once, from at least one token of context.
    """
    if len(input_ids) < 2:
        return torch.zeros(0)
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    device = next(model.parameters()).device
    pieces = []
    start = 0
    while start < len(input_ids) - 1:
        end = min(start + max_length, len(input_ids))
        window = torch.tensor(input_ids[start:end], device=device)[None]
        logits = model(input_ids=window).logits[0, :-1].float()
        targets = window[0, 1:]
        pieces.append(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0].cpu())
        start = end - 1
    return torch.cat(pieces)


def score_text(model, tokenizer, text: str, max_length: int) -> TextScore:
    """The log-likelihood of every token of `text` and its size in UTF-8 bytes."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    logprobs = token_logprobs(model, [prefix_token_id(tokenizer), *ids], max_length)
    return TextScore(loglik=float(logprobs.double().sum()), tokens=len(ids), bytes=len(text.encode("utf-8")))
