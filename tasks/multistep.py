"""Multi-step arithmetic: ``12+5-3=`` answered one step per line, ``12+5=17`` then ``17-3=14``.

A problem is a chain of ``operands`` numbers joined by operators drawn uniformly from
``operators``, evaluated LEFT TO RIGHT as a chain (no precedence: ``2+3*4=`` is ``(2+3)*4 =
20``), so that each step takes the running result and one more operand. The expected
completion writes one step per line, ``a op b = c``, the first step's ``a`` being the first
operand and every later ``a`` the previous step's ``c``; the last line's result is the answer.

Rewards:

- ``reward`` (outcome): 1 if the final answer is right (read by the task's extractor, by default
  the last number of the completion, so ``The answer is 14.`` after the steps also counts);
  ``format_reward`` if it is wrong but every non-blank line has the ``a op b = c`` shape; else 0.
- ``step_rewards`` (process supervision): one ``(end, reward)`` per non-blank line, ``end`` just
  past the line's last character (its newline excluded). Lines of the ``a op b = c`` shape are
  the completion's steps: the j-th of them earns 1 if it is exactly the expected step j (numbers
  compared as numbers, spaces ignored, but nothing else on the line: ``12+5=17.`` is prose),
  else 0. Any other line (prose such as ``Let's
  compute:``) earns 0 and is not counted as a step, so a chatty preamble does not shift the
  steps after it. Step-shaped lines beyond the expected number of steps earn 0: they add
  nothing to the answer, and crediting them would let a policy farm process reward by
  repeating steps. Blank lines get no entry. A completion that stops before the last expected
  step gets one more entry of reward 0 at its end (``end = STEPS_NOT_WRITTEN``, placed on its EOS token):
  otherwise stopping after a right first step would collect only positive step rewards, and
  a policy learns to stop early.

Splits are those of ``tasks.arithmetic`` (``rlbench.splits``): the eval split is the first
``eval_size`` distinct problems drawn by ``random.Random(split_seed)``, the train split every
other problem, and ``eval_size`` may be at most half of all distinct problems.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

from rlbench.answers import NUMBER, parse_number
from rlbench.errors import RLBenchError, require
from rlbench.registry import TASKS
from rlbench.splits import DrawnSplits
from rlbench.task import STEPS_NOT_WRITTEN, Prompt, Split, Task, TaskOptions
from tasks.arithmetic import check_eval_size, checked_operators

# A problem: (operands, operators between them).
Problem = tuple[tuple[int, ...], tuple[str, ...]]

# One written step, ``a op b = c`` with any spaces; real models may write the minus and times
# signs as the Unicode characters, which count as their ASCII forms.
STEP_LINE = re.compile(
    rf"\s*(?P<left>{NUMBER.pattern})\s*(?P<op>[-+*−×])\s*(?P<right>{NUMBER.pattern})"
    rf"\s*=\s*(?P<result>{NUMBER.pattern})\s*"
)
OPERATOR_SPELLINGS = {"−": "-", "×": "*"}
PROMPT_TEXT = re.compile(r"\d+(?:[-+*]\d+)+=")
# A step as the completion wrote it: (left, operator, right, result).
WrittenStep = tuple[Fraction, str, Fraction, Fraction]


class Step(NamedTuple):
    """One expected step of the chain: ``left op right = result``."""

    left: int
    op: str
    right: int
    result: int

    def __str__(self) -> str:
        return f"{self.left}{self.op}{self.right}={self.result}"


@dataclass
class MultiStepConfig(TaskOptions):
    operands: int = 3
    """Numbers in each chain; a chain of n operands is answered in n - 1 steps."""
    digits: int = 1
    """Digits of every operand (1 digit means 0-9; d > 1 digits means 10^(d-1) to 10^d - 1)."""
    operators: tuple[str, ...] = ("+", "-")
    """Operators to draw from, one uniformly per gap; a non-empty subset of '+', '-', '*'. The
    chain is evaluated left to right (``2+3*4=`` is 20)."""
    eval_size: int = 200
    """Distinct problems in the fixed eval split (at most half of all distinct problems)."""
    split_seed: int = 1234
    """Seed that picks which problems form the eval split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            isinstance(self.operands, int) and self.operands >= 2,
            "operands",
            self.operands,
            "an integer >= 2",
        )
        require(
            isinstance(self.digits, int) and 1 <= self.digits <= 9,
            "digits",
            self.digits,
            "an integer from 1 to 9",
        )
        self.operators = checked_operators(self.operators)
        check_eval_size(self.eval_size, self.problem_count())
        require(isinstance(self.split_seed, int), "split_seed", self.split_seed, "an integer")

    def operand_range(self) -> tuple[int, int]:
        """Inclusive (low, high) of every operand: 0-9 for one digit, else exactly d digits."""
        return (0 if self.digits == 1 else 10 ** (self.digits - 1), 10**self.digits - 1)

    def problem_count(self) -> int:
        """Number of distinct problems (operand values times operator choices)."""
        low, high = self.operand_range()
        return (high - low + 1) ** self.operands * len(self.operators) ** (self.operands - 1)


def chain_steps(operands: tuple[int, ...], operators: tuple[str, ...]) -> tuple[Step, ...]:
    """The steps of the chain evaluated left to right; the last step's result is the answer."""
    steps, total = [], operands[0]
    for op, x in zip(operators, operands[1:], strict=True):
        result = total + x if op == "+" else total - x if op == "-" else total * x
        steps.append(Step(total, op, x, result))
        total = result
    return tuple(steps)


def parse_step(line: str) -> WrittenStep | None:
    """``line`` as a written step ``a op b = c`` (spaces allowed), or None if it is not one.

    Numbers are read as exact numbers, so ``17.0`` equals the expected 17 (a ``Step`` compares
    equal to the written tuple with the same values)."""
    match = STEP_LINE.fullmatch(line)
    if match is None:
        return None
    left, right, result = (parse_number(match[name]) for name in ("left", "right", "result"))
    if left is None or right is None or result is None:
        return None
    return left, OPERATOR_SPELLINGS.get(match["op"], match["op"]), right, result


def completion_lines(completion: str) -> list[tuple[int, str]]:
    """``(end, line)`` for every non-blank line, ``end`` the offset just past its last character
    (its newline excluded)."""
    lines, start = [], 0
    for line in completion.split("\n"):
        end = start + len(line)
        if line.strip():
            lines.append((end, line))
        start = end + 1  # past the newline
    return lines


@TASKS.register("multistep")
class MultiStep(Task):
    """Multi-step arithmetic (12+5-3=) written one step per line, with a reward for each step."""

    Config = MultiStepConfig
    alphabet = "0123456789+-*=\n"
    has_steps = True

    def __init__(self, config: MultiStepConfig) -> None:
        super().__init__(config)
        self.config: MultiStepConfig = config
        low, high = config.operand_range()
        self._low, self._count = low, high - low + 1
        self.splits = DrawnSplits(self._draw, config.eval_size, config.split_seed)

    def _draw(self, rng: random.Random) -> Problem:
        uniform, ops = rng.random, self.config.operators
        operands = tuple(self._low + int(uniform() * self._count) for _ in range(self.config.operands))
        operators = tuple(ops[int(uniform() * len(ops))] for _ in range(self.config.operands - 1))
        return operands, operators

    @staticmethod
    def to_prompt(problem: Problem) -> Prompt:
        operands, operators = problem
        text = str(operands[0]) + "".join(op + str(x) for op, x in zip(operators, operands[1:], strict=True))
        steps = chain_steps(operands, operators)
        return Prompt(text=text + "=", answer=str(steps[-1].result), data=steps)

    def prompts(self, split: Split, n: int, seed: int) -> list[Prompt]:
        """Train: a seeded stream with replacement. Eval: ``n`` distinct problems of the fixed split."""
        return self.splits.prompts(split, n, seed, self.to_prompt)

    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        """Train prompts with their full expected steps, one per line."""
        return [(p.text, "\n".join(map(str, p.data))) for p in self.prompts("train", n, seed)]

    @staticmethod
    def expected_steps(prompt: Prompt) -> tuple[Step, ...]:
        """The prompt's expected steps: its ``data``, or worked out from its text when a prompt
        was built without them (a hand-written or file prompt)."""
        if prompt.data is not None:
            return tuple(prompt.data)
        if not PROMPT_TEXT.fullmatch(prompt.text):
            raise RLBenchError(
                f"multistep prompt {prompt.text!r} carries no expected steps (Prompt.data is None) "
                "and is not a chain such as '12+5-3='"
            )
        tokens = re.findall(r"\d+|[-+*]", prompt.text[:-1])
        return chain_steps(tuple(map(int, tokens[::2])), tuple(tokens[1::2]))

    def step_rewards(self, prompt: Prompt, completion: str) -> list[tuple[int, float]]:
        """``(end, reward)`` per non-blank line: 1 for the j-th step-shaped line when it is the
        expected step j, 0 for any other line (see the module docstring)."""
        expected = self.expected_steps(prompt)
        rewards: list[tuple[int, float]] = []
        j = 0  # index of the expected step the next step-shaped line is compared with
        for end, line in completion_lines(completion):
            step = parse_step(line)
            if step is None:  # prose: no credit, and not one of the steps
                rewards.append((end, 0.0))
                continue
            rewards.append((end, 1.0 if j < len(expected) and step == expected[j] else 0.0))
            j += 1
        if j < len(expected):  # steps never written: one step of reward 0 at the end
            rewards.append((STEPS_NOT_WRITTEN, 0.0))
        return rewards

    def reward(self, prompt: Prompt, completion: str) -> float:
        """1 if the final answer is right, ``format_reward`` if wrong but every non-blank line is
        a step ``a op b = c``, else 0."""
        if self.is_correct(prompt, completion):
            return 1.0
        lines = completion_lines(completion)
        well_formed = bool(lines) and all(parse_step(line) is not None for _, line in lines)
        return float(self.config.format_reward) if well_formed else 0.0
