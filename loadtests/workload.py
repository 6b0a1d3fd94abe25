"""What the load test sends: a compute budget drawn from a mix, a prompt drawn from a list, streamed or not,
abandoned after its first chunk or not; one request body.

No locust here: the locustfile builds a `Workload` from its options and each user draws from it.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Any

DEFAULT_BUDGET = "default"  # in a budget mix: send no compute_budget, so the server's default applies


def parse_budget_mix(text: str) -> dict[str, float]:
    """'0:0.7,8:0.2,32:0.1' -> {'0': 0.7, '8': 0.2, '32': 0.1}; weights need not sum to 1."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        budget, sep, weight = part.partition(":")
        budget = budget.strip()
        if budget != DEFAULT_BUDGET and not budget.isdigit():
            raise ValueError(
                f"bad budget {budget!r} in {part!r}: a non-negative integer or {DEFAULT_BUDGET!r}"
            )
        if budget != DEFAULT_BUDGET:
            budget = str(int(budget))  # '08' and '8' are one budget
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad weight in {part!r}: expected BUDGET:WEIGHT") from None
        if not 0 <= value < float("inf"):
            raise ValueError(f"bad weight in {part!r}: must be a finite number >= 0")
        mix[budget] = mix.get(budget, 0.0) + value
    if sum(mix.values()) <= 0:
        raise ValueError("the budget mix needs at least one budget with a positive weight")
    return mix


def checked_budget_mix(text: str) -> str:
    """An argparse type: reject a bad mix on the command line, but keep the text.

    Locust's web UI writes edited options back with the type of the value it finds, so options stay strings.
    """
    try:
        parse_budget_mix(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


@dataclass(frozen=True)
class Draw:
    """One request's random choices."""

    budget: str
    prompt_index: int
    stream: bool
    cancel: bool  # the client closes the connection after the first piece of content (streams only)


@dataclass(frozen=True)
class Workload:
    endpoint: str  # "chat" or "completions"
    model: str
    budget_mix: dict[str, float]
    prompts: list[str]
    max_tokens: int
    temperature: float
    stream_share: float  # the share of requests streamed; the rest are answered whole
    ttt: dict[str, Any]  # sent as the request's `ttt` object when not empty
    cancel_share: float = 0.0  # the share of streamed requests abandoned after their first piece of content

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def draw(self, rng: random.Random) -> Draw:
        """A budget from the mix, the index of a prompt, whether to stream and whether to abandon it."""
        budget = rng.choices(list(self.budget_mix), list(self.budget_mix.values()))[0]
        prompt_index = rng.randrange(len(self.prompts))
        stream = rng.random() < self.stream_share
        return Draw(budget, prompt_index, stream, cancel=stream and rng.random() < self.cancel_share)

    def body(self, draw: Draw) -> dict[str, Any]:
        prompt = self.prompts[draw.prompt_index]
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if draw.stream:
            # include_usage: the token count and the ttt object come on a final chunk of their own
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        if draw.budget != DEFAULT_BUDGET:
            body["compute_budget"] = int(draw.budget)
        if self.ttt:
            body["ttt"] = self.ttt
        return body
