"""The same questions with and without test-time training, against a running `ttserve serve`.

    make run &                                          # or: ttserve serve
    .venv/bin/python benchmarks/compare_answers.py --budget 16 > answers.jsonl

Each question is asked twice, greedy and at most `--max-tokens` tokens: with compute budget 0 (the base
model) and with `--budget` under the server's policy (`--frequency-penalty` / `--presence-penalty` for
both). One JSON line per answer: the question, the budget, seconds, the ttt decision, steps and reason,
and the answer.
"""

from __future__ import annotations

import argparse
import json
import time

from openai import OpenAI

QUESTIONS = [
    "How do I read a file line by line in Python using pathlib?",
    "What does itertools.accumulate do?",
    "How do I use functools.lru_cache?",
    "What does shutil.copytree do?",
    "How do I get the current time in UTC with datetime?",
    "What does collections.Counter.most_common return?",
    "How do I split a path into directory and file name with os.path?",
    "What does textwrap.dedent do?",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--question", action="append", help="ask this instead (repeatable)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key="unused", timeout=600, max_retries=0)
    for question in args.question or QUESTIONS:
        for budget in (0, args.budget):
            started = time.perf_counter()
            response = client.chat.completions.create(
                model=args.model,
                messages=[{"role": "user", "content": question}],
                max_tokens=args.max_tokens,
                temperature=0,
                frequency_penalty=args.frequency_penalty,
                presence_penalty=args.presence_penalty,
                extra_body={"compute_budget": budget},
            )
            ttt = response.model_extra["ttt"]
            print(
                json.dumps(
                    {
                        "question": question,
                        "budget": budget,
                        "seconds": round(time.perf_counter() - started, 1),
                        "decision": ttt["decision"],
                        "steps": ttt["steps"],
                        "reason": ttt["reason"],
                        "answer": response.choices[0].message.content,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
