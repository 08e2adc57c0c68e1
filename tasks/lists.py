"""What the list tasks (``sort``, ``reverse``) share: problems, splits, list parsing, rewards.

A problem is a short tuple of integers; the prompt names the operation and the list, and the
answer is the transformed list, comma-separated with no spaces::

    sort 5,2,9:      ->  2,5,9
    reverse 5,2,9:   ->  9,2,5

Reading an answer: the task's extractor (default ``exact``: the whole completion, trimmed;
``answer_tag`` or ``boxed`` for models that reason first) yields a text, which is then read
as a list leniently: integers separated by commas and/or blanks, optionally inside one pair of
``[ ]`` or ``( )``, with an optional final full stop (``[2, 5, 9].`` reads as ``2,5,9``).
Anything else (words, empty items as in ``2,,5``, decimals) is malformed. ``last_number``
is refused: it reads one number, never a list.

Reward: 1 when the list equals the expected one; otherwise 0, or with ``dense: true`` the
fraction of positions right (position i counts when both lists have it and the values agree,
over the longer of the two lengths, so missing and extra items both cost). A well-formed wrong
list earns at least ``format_reward``; a malformed answer earns 0.

Splits: as in ``arithmetic`` (``rlbench.splits``), the eval split is a fixed set of exactly
``eval_size`` distinct lists, the first ones drawn by ``random.Random(split_seed)``; train draws
reject them. Lengths are drawn uniformly from ``min_length..max_length``, then every value
uniformly from ``min_value..max_value``. ``eval_size`` may be at most half of all distinct
lists.
"""

from __future__ import annotations

import abc
import random
import re
from dataclasses import dataclass

from rlbench.errors import require
from rlbench.splits import DrawnSplits
from rlbench.task import Prompt, Split, Task, TaskOptions

Values = tuple[int, ...]
# One item: an optional sign (ASCII or unicode minus) touching its digits.
ITEM = re.compile(r"[-+−]?\d+")
# Items are separated by a comma with optional blanks around it, or by blanks alone.
SEPARATOR = re.compile(r"\s*,\s*|\s+")
BRACKETS = {"[": "]", "(": ")"}


class ListFormatError(ValueError):
    """A completion's answer that cannot be read as a list of integers."""


def parse_list(text: str) -> Values:
    """The integers ``text`` lists (``"[2, 5, 9]."`` -> ``(2, 5, 9)``); raises ``ListFormatError``.

    See the module docstring for what is accepted; ``"[]"`` is the empty list.
    """
    body = text.strip().removesuffix(".").strip()
    bracketed = body[:1] in BRACKETS
    if bracketed:
        if len(body) < 2 or not body.endswith(BRACKETS[body[0]]):
            raise ListFormatError(f"unclosed {body[0]!r} in {text!r}")
        body = body[1:-1].strip()
    if not body:
        if bracketed:
            return ()
        raise ListFormatError("empty answer")
    values = []
    for item in SEPARATOR.split(body):
        if not ITEM.fullmatch(item):
            raise ListFormatError(f"{item!r} is not an integer (in {text!r})")
        values.append(int(item.replace("−", "-")))
    return tuple(values)


def format_list(values: Values) -> str:
    """How prompts and expected answers write a list: ``2,5,9``."""
    return ",".join(map(str, values))


def positions_right(expected: Values, given: Values) -> float:
    """Fraction of positions where ``given`` agrees with ``expected``, over the longer length
    (so a missing or an extra item counts as a wrong position); 1 only for equal lists."""
    longest = max(len(expected), len(given))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(expected, given)) / longest


@dataclass
class ListConfig(TaskOptions):
    """Options of the list tasks (``sort``, ``reverse``)."""

    min_length: int = 3
    """Fewest items in a list (at least 1)."""
    max_length: int = 5
    """Most items in a list (at least ``min_length``); the length is uniform in between."""
    min_value: int = 0
    """Smallest value an item can take (negative values are allowed)."""
    max_value: int = 9
    """Largest value an item can take (at least ``min_value``)."""
    dense: bool = False
    """Partial credit: a wrong list earns the fraction of positions it gets right (over the
    longer of the two lengths) instead of 0; only a fully right list earns 1."""
    eval_size: int = 200
    """Distinct lists in the fixed eval split (at most half of all distinct lists)."""
    split_seed: int = 1234
    """Seed that picks which lists form the eval split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.extractor != "last_number",
            "extractor",
            self.extractor,
            "null, exact, answer_tag, boxed or hash (last_number reads one number, not a list)",
        )
        require(
            isinstance(self.min_length, int) and self.min_length >= 1,
            "min_length",
            self.min_length,
            "an integer >= 1",
        )
        require(
            isinstance(self.max_length, int) and self.max_length >= self.min_length,
            "max_length",
            self.max_length,
            f"an integer >= min_length ({self.min_length})",
        )
        require(isinstance(self.min_value, int), "min_value", self.min_value, "an integer")
        require(
            isinstance(self.max_value, int) and self.max_value >= self.min_value,
            "max_value",
            self.max_value,
            f"an integer >= min_value ({self.min_value})",
        )
        require(isinstance(self.dense, bool), "dense", self.dense, "true or false")
        total = self.problem_count()
        require(
            isinstance(self.eval_size, int) and 1 <= self.eval_size <= total // 2,
            "eval_size",
            self.eval_size,
            f"an integer from 1 to {total // 2} (half of the {total} distinct lists; "
            "widen the value or length range for a larger eval split)",
        )

    def problem_count(self) -> int:
        """Number of distinct lists: every length, every value at every position."""
        values = self.max_value - self.min_value + 1
        return sum(values**length for length in range(self.min_length, self.max_length + 1))


class ListTask(Task):
    """Base of the list tasks: a subclass names its ``verb`` (the prompt's first word) and
    implements ``transform`` (the expected answer of a list)."""

    Config = ListConfig
    default_extractor = "exact"
    #: The operation's word, first in the prompt (``sort 5,2,9:``).
    verb: str

    def __init__(self, config: ListConfig) -> None:
        super().__init__(config)
        self.config: ListConfig = config
        self.splits = DrawnSplits(self._draw, config.eval_size, config.split_seed, noun="lists")

    @staticmethod
    @abc.abstractmethod
    def transform(values: Values) -> Values:
        """The answer to the list ``values``."""

    def _draw(self, rng: random.Random) -> Values:
        c = self.config
        length = rng.randint(c.min_length, c.max_length)
        return tuple(rng.randint(c.min_value, c.max_value) for _ in range(length))

    def to_prompt(self, values: Values) -> Prompt:
        return Prompt(
            text=f"{self.verb} {format_list(values)}:",
            answer=format_list(self.transform(values)),
            data=values,
        )

    def prompts(self, split: Split, n: int, seed: int) -> list[Prompt]:
        """Train: a ``random.Random(seed)`` stream with replacement, eval lists rejected. Eval:
        a ``random.Random(seed)`` sample of ``n`` distinct lists of the fixed eval split."""
        return self.splits.prompts(split, n, seed, self.to_prompt)

    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        return [(p.text, p.answer) for p in self.prompts("train", n, seed)]

    def read_answer(self, completion: str) -> Values | None:
        """The list the completion states (None: no answer extracted, or not a list)."""
        answer = self.extract(completion)
        if answer is None:
            return None
        try:
            return parse_list(answer)
        except ListFormatError:
            return None

    def answer_key(self, completion: str) -> str | None:
        """The stated list written as ``format_list`` does, so ``[2, 5, 9]`` and ``2,5,9`` vote alike."""
        values = self.read_answer(completion)
        return None if values is None else format_list(values)

    def is_correct(self, prompt: Prompt, completion: str) -> bool:
        return self.read_answer(completion) == parse_list(prompt.answer)

    def reward(self, prompt: Prompt, completion: str) -> float:
        given = self.read_answer(completion)
        if given is None:
            return 0.0
        expected = parse_list(prompt.answer)
        if given == expected:
            return 1.0
        partial = positions_right(expected, given) if self.config.dense else 0.0
        return max(partial, float(self.config.format_reward))
