"""What the load test sends: a compute budget drawn from a mix, a prompt drawn from a list, one request body.

No locust here: the locustfile builds a `Workload` from its options and each user draws from it.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_BUDGET = "default"  # in a budget mix: send no compute_budget, so the server's default applies

DEFAULT_PROMPTS = [
    "What does functools.lru_cache do, and when should I use it?",
    "Write a Python function that parses command line options with getopt.",
    "How do I read a CSV file with the csv module and skip the header row?",
    "Explain the difference between a list and a tuple in Python.",
    "Show how to use contextlib.contextmanager to time a block of code.",
    "How does asyncio.gather differ from asyncio.wait?",
    "Write a regular expression that matches an ISO 8601 date.",
    "What is the purpose of __slots__ in a Python class?",
    "How do I walk a directory tree with pathlib and list every .py file?",
    "Explain what a dataclass is and show a small example.",
    "How can I serialize a datetime object to JSON?",
    "Write a generator that yields the Fibonacci numbers.",
    "What does the GIL mean for multithreaded Python programs?",
    "How do I make an HTTP GET request with urllib.request?",
    "Summarise what the itertools.groupby function does.",
    "Write a function that merges two sorted lists into one sorted list.",
    "How do I use the logging module to write messages to a file?",
    "Explain how heapq can be used as a priority queue.",
    "Give a short explanation of how hash tables handle collisions.",
    "Write a haiku about a program that learns while it answers.",
]


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


def load_prompts(path: Path) -> list[str]:
    """One prompt per line: a JSON string (for prompts with newlines) or plain text. Blank lines skipped."""
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith('"'):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, str):
                if value.strip():
                    prompts.append(value)
                continue
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


@dataclass(frozen=True)
class Workload:
    endpoint: str  # "chat" or "completions"
    model: str
    budget_mix: dict[str, float]
    prompts: list[str]
    max_tokens: int
    temperature: float
    stream: bool
    ttt: dict[str, Any]  # sent as the request's `ttt` object when not empty

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def draw(self, rng: random.Random) -> tuple[str, int]:
        """A budget from the mix and the index of a prompt, both at random."""
        budget = rng.choices(list(self.budget_mix), list(self.budget_mix.values()))[0]
        return budget, rng.randrange(len(self.prompts))

    def body(self, budget: str, prompt_index: int) -> dict[str, Any]:
        prompt = self.prompts[prompt_index]
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.stream:
            # include_usage: the token count and the ttt object come on a final chunk of their own
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        if budget != DEFAULT_BUDGET:
            body["compute_budget"] = int(budget)
        if self.ttt:
            body["ttt"] = self.ttt
        return body
