"""Writes ``word_problems.jsonl``: 300 short arithmetic word problems in GSM8K's JSONL format.

Run from the repository root to regenerate the shipped file (the output is the same bytes on
every run and platform)::

    python tasks/data/make_word_problems.py            # writes tasks/data/word_problems.jsonl
    python tasks/data/make_word_problems.py out.jsonl  # or anywhere else

The problems are our own, generated from six templates (add, take away, groups of, share
equally with exact division, and two two-step ones) over a small vocabulary of names and
items, with small numbers, so that a tiny char-level model can learn them. Each line is
``{"question": ..., "answer": ...}``, the answer a line or two of arithmetic then ``#### N``.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 2024
COUNT = 300
MAX_QUESTION_CHARS = 70
OUTPUT = Path(__file__).parent / "word_problems.jsonl"

NAMES = (("Ann", "she"), ("Mia", "she"), ("Liz", "she"), ("Ben", "he"), ("Tom", "he"), ("Sam", "he"))
ITEMS = ("pens", "eggs", "cards", "books", "apples", "shells")

# A template draws its numbers and returns (question, solution lines before the #### line, answer).
Template = Callable[[random.Random, str, str, str], tuple[str, list[str], int]]


def add(rng: random.Random, name: str, pronoun: str, item: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 20), rng.randint(2, 10)
    question = f"{name} has {a} {item} and buys {b} more. How many {item} does {pronoun} have?"
    return question, [f"{a}+{b}={a + b}"], a + b


def take_away(rng: random.Random, name: str, pronoun: str, item: str) -> tuple[str, list[str], int]:
    a = rng.randint(5, 20)
    b = rng.randint(1, a - 1)
    question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    return question, [f"{a}-{b}={a - b}"], a - b


def groups_of(rng: random.Random, name: str, pronoun: str, item: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    question = f"{name} buys {a} bags with {b} {item} each. How many {item} is that?"
    return question, [f"{a}*{b}={a * b}"], a * b


def share(rng: random.Random, name: str, pronoun: str, item: str) -> tuple[str, list[str], int]:
    kids, each = rng.randint(2, 6), rng.randint(2, 9)  # drawn so the division is exact
    total = kids * each
    question = f"{name} shares {total} {item} equally among {kids} kids. How many each?"
    return question, [f"{total}/{kids}={each}"], each


def add_then_take(rng: random.Random, name: str, pronoun: str, item: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 15), rng.randint(2, 10)
    c = rng.randint(1, a + b - 1)
    question = f"{name} has {a} {item}, buys {b} more, gives away {c}. How many are left?"
    return question, [f"{a}+{b}={a + b}", f"{a + b}-{c}={a + b - c}"], a + b - c


def groups_then_take(rng: random.Random, name: str, pronoun: str, item: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 6), rng.randint(2, 6)
    c = rng.randint(1, a * b - 1)
    question = f"{name} buys {a} bags of {b} {item} and loses {c}. How many are left?"
    return question, [f"{a}*{b}={a * b}", f"{a * b}-{c}={a * b - c}"], a * b - c


TEMPLATES: tuple[Template, ...] = (add, take_away, groups_of, share, add_then_take, groups_then_take)


def generate(seed: int = SEED, count: int = COUNT) -> list[dict[str, str]]:
    """``count`` distinct problems, the templates taken in turn, numbers drawn by ``seed``."""
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < count:
        template = TEMPLATES[len(problems) % len(TEMPLATES)]
        name, pronoun = rng.choice(NAMES)
        question, lines, answer = template(rng, name, pronoun, rng.choice(ITEMS))
        if question in seen:
            continue  # a repeat would be one problem in the task's splits; draw another
        if len(question) > MAX_QUESTION_CHARS:  # a template edit made it too long for a tiny model
            raise ValueError(f"question over {MAX_QUESTION_CHARS} characters: {question!r}")
        seen.add(question)
        problems.append({"question": question, "answer": "\n".join([*lines, f"#### {answer}"])})
    return problems


def write(path: Path, seed: int = SEED, count: int = COUNT) -> None:
    """Writes the problems as JSONL; bytes, not text, so no platform changes the newlines."""
    text = "".join(json.dumps(problem) + "\n" for problem in generate(seed, count))
    path.write_bytes(text.encode("utf-8"))


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT)
