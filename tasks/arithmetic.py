"""Arithmetic: compute ``12+34=`` and answer ``46``; the last number the completion states is checked.

Each problem is a tuple of operands joined by operators drawn uniformly from ``operators``
(one per gap). The expression is evaluated with normal precedence (``*`` before ``+``/``-``),
so ``2+3*4=`` is ``14``; with ``-`` answers may be negative (``3-15=`` is ``-12``).

Splits (``rlbench.splits``): the eval split is a fixed set of exactly ``eval_size`` distinct
problems, the first ones drawn by ``random.Random(split_seed)`` from the whole problem space;
the train split is every other problem. Train and eval therefore never share a problem, and
the eval set depends only on the config (growing ``eval_size`` extends it, keeping the earlier
problems). So that train keeps most of the space, ``eval_size`` may be at most half the number
of distinct problems: a small space (1-digit addition has 100 problems) is a config error, not
a silently tiny or overlapping split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlbench.errors import require
from rlbench.registry import TASKS
from rlbench.splits import DrawnSplits
from rlbench.task import Prompt, Split, Task, TaskOptions

OPERATORS = ("+", "-", "*")
# A problem: (operands, operators between them).
Problem = tuple[tuple[int, ...], tuple[str, ...]]


@dataclass
class ArithmeticConfig(TaskOptions):
    digits: int = 2
    """Digits of the first operand (1 digit means 0-9; d > 1 digits means 10^(d-1) to 10^d - 1)."""
    digits_b: int | None = None
    """Digits of every other operand; None means the same as ``digits``."""
    operands: int = 2
    """Numbers in each expression (2 gives ``a+b=``)."""
    operators: tuple[str, ...] = ("+",)
    """Operators to draw from, one uniformly per gap; a non-empty subset of '+', '-', '*'."""
    eval_size: int = 200
    """Distinct problems in the fixed eval split (at most half of all distinct problems)."""
    split_seed: int = 1234
    """Seed that picks which problems form the eval split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            isinstance(self.digits, int) and 1 <= self.digits <= 9,
            "digits",
            self.digits,
            "an integer from 1 to 9",
        )
        require(
            self.digits_b is None or (isinstance(self.digits_b, int) and 1 <= self.digits_b <= 9),
            "digits_b",
            self.digits_b,
            "null or an integer from 1 to 9",
        )
        require(
            isinstance(self.operands, int) and self.operands >= 2,
            "operands",
            self.operands,
            "an integer >= 2",
        )
        self.operators = checked_operators(self.operators)
        check_eval_size(self.eval_size, self.problem_count())

    def operand_range(self, index: int) -> tuple[int, int]:
        """Inclusive (low, high) of operand ``index``: 0-9 for one digit, else exactly d digits."""
        d = self.digits if index == 0 or self.digits_b is None else self.digits_b
        return (0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def problem_count(self) -> int:
        """Number of distinct problems (operand values times operator choices)."""
        count = len(self.operators) ** (self.operands - 1)
        for i in range(self.operands):
            low, high = self.operand_range(i)
            count *= high - low + 1
        return count


def checked_operators(operators: tuple[str, ...]) -> tuple[str, ...]:
    """``operators`` as a tuple, checked: a non-empty set of distinct '+', '-', '*'."""
    operators = tuple(operators)
    require(
        len(operators) > 0 and set(operators) <= set(OPERATORS) and len(set(operators)) == len(operators),
        "operators",
        operators,
        "a non-empty list of distinct operators from '+', '-', '*'",
    )
    return operators


def check_eval_size(eval_size: int, total: int) -> None:
    """The eval split may hold at most half of the ``total`` distinct problems."""
    require(
        isinstance(eval_size, int) and 1 <= eval_size <= total // 2,
        "eval_size",
        eval_size,
        f"an integer from 1 to {total // 2} (half of the {total} distinct "
        "problems; raise digits or operands for a larger eval split)",
    )


def evaluate(operands: tuple[int, ...], operators: tuple[str, ...]) -> int:
    """Value of the expression with normal precedence: products first, then a signed sum."""
    total, term, sign = 0, operands[0], 1
    for op, x in zip(operators, operands[1:], strict=True):
        if op == "*":
            term *= x
        else:
            total += sign * term
            term, sign = x, (1 if op == "+" else -1)
    return total + sign * term


@TASKS.register("arithmetic")
class Arithmetic(Task):
    """Multi-digit arithmetic (a+b=, optionally - and *): the last number of the answer is checked."""

    Config = ArithmeticConfig
    alphabet = "0123456789+-*="

    def __init__(self, config: ArithmeticConfig) -> None:
        super().__init__(config)
        self.config: ArithmeticConfig = config
        # (low, count) per operand: drawing with rng.random() is several times faster than randint.
        self._ranges = [
            (low, high - low + 1) for low, high in map(config.operand_range, range(config.operands))
        ]
        self.splits = DrawnSplits(self._draw, config.eval_size, config.split_seed)

    def _draw(self, rng: random.Random) -> Problem:
        uniform, ops = rng.random, self.config.operators
        operands = tuple(low + int(uniform() * count) for low, count in self._ranges)
        operators = tuple(ops[int(uniform() * len(ops))] for _ in range(self.config.operands - 1))
        return operands, operators

    def is_eval(self, problem: Problem) -> bool:
        """Whether ``problem`` belongs to the eval split (every other problem is train)."""
        return self.splits.is_eval(problem)

    @staticmethod
    def to_prompt(problem: Problem) -> Prompt:
        operands, operators = problem
        text = str(operands[0]) + "".join(op + str(x) for op, x in zip(operators, operands[1:], strict=True))
        return Prompt(text=text + "=", answer=str(evaluate(operands, operators)))

    def prompts(self, split: Split, n: int, seed: int) -> list[Prompt]:
        """Train: a seeded stream with replacement. Eval: ``n`` distinct problems of the fixed split.

        Eval prompts are a ``random.Random(seed)`` sample of the eval split, so they are fixed
        for a given config, ``n`` and ``seed``; asking for more than ``eval_size`` raises.
        """
        return self.splits.prompts(split, n, seed, self.to_prompt)

    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        return [(p.text, p.answer) for p in self.prompts("train", n, seed)]
