"""Countdown: reach a target with + - * / and parentheses, using each given number at most once.

Prompt and demonstration (the numbers ascending, then the target)::

    2 3 5 -> 16:     ->  (3+5)*2

Reading an answer: the task's extractor (default ``exact``: the whole completion, trimmed;
``answer_tag``, ``boxed`` or ``hash`` for models that reason first) yields a text, which must
be one arithmetic expression, optionally followed by ``= N`` (a stated result, as in
``(3+5)*2 = 16``) and a final full stop. ``last_number`` is refused: it reads one number, never
an expression. The expression is parsed by ``parse_expression`` (a small recursive-descent
parser, never ``eval``) with exact ``Fraction`` arithmetic:

- integers, ``+ - * /``, parentheses and blanks; ``×``, ``·``, ``\\times`` and ``\\cdot`` read
  as ``*``, ``÷`` and ``\\div`` as ``/``, ``−`` as ``-``;
- usual precedence, left to right (``8-3-2`` is 3, ``8/2/2`` is 2);
- division is exact (``7/2*2`` is 7); dividing by zero makes the answer invalid;
- no unary minus or plus (``-3+5``, ``2*-3``): the game combines the given numbers, it does
  not negate them; no implicit multiplication (``2(3+5)``), no other characters.

Reward: 1 when the expression's value is the target, every number it uses is given (a number
given once may be used once; not every number need be used) and any stated result is the
target; ``format_reward`` when the expression parses and uses only given numbers but misses
(or a stated result is not the target); 0 otherwise.

Problems: ``count`` numbers drawn uniformly from ``min_number..max_number`` (repeats
allowed), then the target is the value of a random expression over all of them, so every
problem is solvable and that expression is its demonstration. The expression combines two
random sub-results at a time with a random operator, keeping every intermediate a positive
integer (``a-b`` only when ``a > b``, ``a/b`` only when exact).

Splits (``rlbench.splits``): a problem's identity is its multiset of numbers, whatever the
target: the eval split is a fixed set of exactly ``eval_size`` distinct multisets (with their
targets), the first ones drawn by ``random.Random(split_seed)``; train draws reject those
multisets, so train never sees eval numbers in any order or with any target. ``eval_size`` may
be at most half of all distinct multisets.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, NamedTuple

from rlbench.answers import parse_number
from rlbench.errors import require
from rlbench.registry import TASKS
from rlbench.splits import DrawnSplits
from rlbench.task import Prompt, Split, Task, TaskOptions

# Longer answers are not worth parsing (a 6-number solution is ~30 characters), and the
# nesting limit keeps the recursive parser far from Python's recursion limit.
MAX_EXPRESSION_CHARS = 200
MAX_NESTING = 32
# Spellings of the operators that real models write, typeset maths especially.
ALIASES = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "·": "*", "÷": "/", "−": "-"}
TOKEN = re.compile(r"[0-9]+|\S")
PROMPT = re.compile(r"([0-9]+(?: [0-9]+)*) -> ([0-9]+):")

Judgement = Literal["correct", "wrong", "invalid"]


class ExpressionError(ValueError):
    """An answer that is not a valid countdown solution: malformed, or using numbers not given."""


class Problem(NamedTuple):
    """A countdown problem: the numbers (ascending), the target and one solution."""

    numbers: tuple[int, ...]
    target: int
    solution: str


# ---------------------------------------------------------------------------------------------
# Parsing and checking answers


class _Parser:
    """Recursive descent over the grammar
    ``expression := term (('+'|'-') term)*``, ``term := factor (('*'|'/') factor)*``,
    ``factor := integer | '(' expression ')'``."""

    def __init__(self, text: str) -> None:
        self.tokens = [(m.group(), m.start()) for m in TOKEN.finditer(text)]
        self.index = 0
        self.depth = 0
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.index][0] if self.index < len(self.tokens) else None

    def position(self) -> int:
        return self.tokens[self.index][1]

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.index][0]
            self.index += 1
            right = self.term()
            value = value + right if op == "+" else value - right
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op, at = self.tokens[self.index]
            self.index += 1
            right = self.factor()
            if op == "*":
                value *= right
            elif right == 0:
                raise ExpressionError(f"division by zero at position {at}")
            else:
                value /= right
        return value

    def factor(self) -> Fraction:
        token = self.peek()
        if token is None:
            raise ExpressionError("the expression ends where a number or '(' was expected")
        at = self.position()
        self.index += 1
        if token.isascii() and token.isdigit():
            self.numbers.append(int(token))
            return Fraction(int(token))
        if token == "(":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise ExpressionError(f"parentheses nested deeper than {MAX_NESTING}")
            value = self.expression()
            if self.peek() != ")":
                found = "the end" if self.peek() is None else repr(self.peek())
                raise ExpressionError(f"expected ')' to close the '(' at position {at}, found {found}")
            self.index += 1
            self.depth -= 1
            return value
        if token in ("+", "-"):
            raise ExpressionError(
                f"unary {token!r} at position {at} is not allowed: combine the given numbers, "
                "do not negate them"
            )
        raise ExpressionError(f"expected a number or '(' at position {at}, found {token!r}")


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """The exact value of the arithmetic expression ``text`` and the numbers it uses, in order
    (``"(3+5)*2"`` -> ``(Fraction(16), [3, 5, 2])``); raises ``ExpressionError`` for anything
    malformed (see the module docstring for the grammar). Nothing is ever evaluated as Python."""
    for alias, op in ALIASES.items():
        text = text.replace(alias, op)
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    parser = _Parser(text)
    if parser.peek() is None:
        raise ExpressionError("empty expression")
    value = parser.expression()
    if parser.peek() is not None:
        raise ExpressionError(
            f"unexpected {parser.peek()!r} at position {parser.position()}: expected an operator"
        )
    return value, parser.numbers


def check_numbers(used: Sequence[int], given: Sequence[int]) -> None:
    """Raise ``ExpressionError`` unless every number in ``used`` is given, each at most as
    often as it is given."""
    available = Counter(given)
    for number, times in sorted(Counter(used).items()):
        if number not in available:
            raise ExpressionError(f"uses {number}, which is not one of the given numbers {list(given)}")
        if times > available[number]:
            raise ExpressionError(f"uses {number} {times} times but it is given {available[number]} time(s)")


def split_claim(text: str) -> tuple[str, Fraction | None]:
    """An answer split into its expression and the result it states after ``=`` (None when it
    states none): ``"(3+5)*2 = 16."`` -> ``("(3+5)*2 ", Fraction(16))``."""
    body = text.strip().removesuffix(".")
    if "=" not in body:
        return body, None
    expression, _, claim = body.partition("=")
    if "=" in claim:
        raise ExpressionError("more than one '=': write one expression, optionally '= result'")
    value = parse_number(claim)
    if value is None:
        raise ExpressionError(f"{claim.strip()!r} after '=' is not a number")
    return expression, value


def judge(answer: str | None, numbers: Sequence[int], target: int) -> Judgement:
    """``correct`` (reaches ``target`` with given numbers, any stated result is the target),
    ``wrong`` (a valid expression over given numbers that misses) or ``invalid``."""
    if answer is None:
        return "invalid"
    try:
        expression, claim = split_claim(answer)
        value, used = parse_expression(expression)
        check_numbers(used, numbers)
    except ExpressionError:
        return "invalid"
    if value == target and (claim is None or claim == target):
        return "correct"
    return "wrong"


# ---------------------------------------------------------------------------------------------
# Generating problems

# Binding strength of what an expression's text ends with: an operator, or a bare number.
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
ATOM = 3
# A sub-result: (value, text, precedence of its outermost operator).
Part = tuple[int, str, int]


def _combine(op: str, left: Part, right: Part) -> Part | None:
    """``left op right`` when its value is a positive integer, written with the parentheses
    precedence needs (the right side also when equal: ``a-(b-c)``, ``a/(b*c)``); else None."""
    a, b = left[0], right[0]
    if op == "+":
        value = a + b
    elif op == "*":
        value = a * b
    elif op == "-":
        if a <= b:
            return None
        value = a - b
    else:
        if a % b:
            return None
        value = a // b
    strength = PRECEDENCE[op]
    left_text = f"({left[1]})" if left[2] < strength else left[1]
    right_text = f"({right[1]})" if right[2] < strength or (right[2] == strength and op in "-/") else right[1]
    return value, left_text + op + right_text, strength


def multiset(numbers: Sequence[int]) -> tuple[int, ...]:
    """A problem's identity: its numbers in ascending order, whatever order they were drawn in."""
    return tuple(sorted(numbers))


def random_solution(numbers: Sequence[int], rng: random.Random) -> tuple[int, str]:
    """The value and text of a random expression using every number once; all intermediates
    are positive integers (``+`` and ``*`` always qualify, so an operator is always found)."""
    parts: list[Part] = [(n, str(n), ATOM) for n in numbers]
    while len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        ops = rng.sample("+-*/", 4)  # a random order; the first that qualifies is used
        combined = next(c for op in ops if (c := _combine(op, parts[i], parts[j])) is not None)
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [combined]
    value, text, _ = parts[0]
    return value, text


# ---------------------------------------------------------------------------------------------
# The task


@dataclass
class CountdownConfig(TaskOptions):
    count: int = 3
    """How many numbers each problem gives (2 to 6; more make long prompts and huge targets)."""
    min_number: int = 1
    """Smallest number that can be given (at least 1)."""
    max_number: int = 20
    """Largest number that can be given (at least ``min_number``)."""
    eval_size: int = 200
    """Distinct problems (multisets of numbers) in the fixed eval split (at most half of all
    distinct multisets)."""
    split_seed: int = 1234
    """Seed that picks which problems form the eval split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.extractor != "last_number",
            "extractor",
            self.extractor,
            "null, exact, answer_tag, boxed or hash (last_number reads one number, not an expression)",
        )
        require(
            isinstance(self.count, int) and 2 <= self.count <= 6,
            "count",
            self.count,
            "an integer from 2 to 6",
        )
        require(
            isinstance(self.min_number, int) and self.min_number >= 1,
            "min_number",
            self.min_number,
            "an integer >= 1",
        )
        require(
            isinstance(self.max_number, int) and self.max_number >= self.min_number,
            "max_number",
            self.max_number,
            f"an integer >= min_number ({self.min_number})",
        )
        total = self.problem_count()
        require(
            isinstance(self.eval_size, int) and 1 <= self.eval_size <= total // 2,
            "eval_size",
            self.eval_size,
            f"an integer from 1 to {total // 2} (half of the {total} distinct multisets of "
            "numbers; widen the number range or raise count for a larger eval split)",
        )

    def problem_count(self) -> int:
        """Number of distinct problems: multisets of ``count`` numbers from the range."""
        values = self.max_number - self.min_number + 1
        return math.comb(values + self.count - 1, self.count)


@TASKS.register("countdown")
class Countdown(Task):
    """Countdown: reach the target with + - * / over the given numbers (2 3 5 -> 16: (3+5)*2)."""

    Config = CountdownConfig
    alphabet = "0123456789 ->:+*/()"
    default_extractor = "exact"

    def __init__(self, config: CountdownConfig) -> None:
        super().__init__(config)
        self.config: CountdownConfig = config
        # A problem is identified by its numbers as a multiset; its target is drawn only once
        # the numbers are kept, by the same generator right after them.
        self.splits = DrawnSplits(
            self._draw_numbers, config.eval_size, config.split_seed, key=multiset, complete=self._problem
        )

    def _draw_numbers(self, rng: random.Random) -> tuple[int, ...]:
        c = self.config
        return tuple(rng.randint(c.min_number, c.max_number) for _ in range(c.count))

    def _problem(self, numbers: tuple[int, ...], rng: random.Random) -> Problem:
        """The problem of the drawn ``numbers``: a random solution over them gives the target."""
        target, solution = random_solution(numbers, rng)
        return Problem(multiset(numbers), target, solution)

    @staticmethod
    def to_prompt(problem: Problem) -> Prompt:
        text = f"{' '.join(map(str, problem.numbers))} -> {problem.target}:"
        return Prompt(text=text, answer=problem.solution, data=problem)

    def prompts(self, split: Split, n: int, seed: int) -> list[Prompt]:
        """Train: a ``random.Random(seed)`` stream with replacement, eval multisets rejected.
        Eval: a ``random.Random(seed)`` sample of ``n`` distinct problems of the fixed split."""
        return self.splits.prompts(split, n, seed, self.to_prompt)

    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        return [(p.text, p.answer) for p in self.prompts("train", n, seed)]

    @staticmethod
    def problem_of(prompt: Prompt) -> tuple[tuple[int, ...], int]:
        """The numbers and target of ``prompt``: from its data, or read back from its text (a
        prompt rebuilt from text alone, say from a file)."""
        if isinstance(prompt.data, Problem):
            return prompt.data.numbers, prompt.data.target
        match = PROMPT.fullmatch(prompt.text.strip())
        if match is None:
            raise ValueError(f"not a countdown prompt: {prompt.text!r} (expected e.g. '2 3 5 -> 16:')")
        return tuple(map(int, match.group(1).split())), int(match.group(2))

    def judge(self, prompt: Prompt, completion: str) -> Judgement:
        """``correct``, ``wrong`` (valid but misses) or ``invalid``: see the module docstring."""
        numbers, target = self.problem_of(prompt)
        return judge(self.extract(completion), numbers, target)

    def is_correct(self, prompt: Prompt, completion: str) -> bool:
        return self.judge(prompt, completion) == "correct"

    def reward(self, prompt: Prompt, completion: str) -> float:
        verdict = self.judge(prompt, completion)
        if verdict == "correct":
            return 1.0
        return float(self.config.format_reward) if verdict == "wrong" else 0.0

    def answer_key(self, completion: str) -> str | None:
        """The stated expression without blanks or a stated result, so ``(3+5)*2`` and
        ``(3 + 5) * 2 = 16`` vote alike; None when it does not parse."""
        answer = self.extract(completion)
        if answer is None:
            return None
        try:
            expression, _ = split_claim(answer)
            parse_expression(expression)
        except ExpressionError:
            return None
        return "".join(expression.split())
