"""Train and eval splits of a task that generates its problems from a seeded random generator.

A generated task (``arithmetic``, ``countdown``, ``sort``/``reverse``, ``multistep``) has no
data set: a problem is whatever its ``draw(rng)`` returns. ``DrawnSplits`` turns such a draw
into the two splits every task needs:

- eval: a fixed set of exactly ``eval_size`` distinct problems, the first ones drawn by
  ``random.Random(split_seed)``, kept in draw order; ``eval(n, seed)`` is a
  ``random.Random(seed)`` sample of ``n`` of them, and asking for more than ``eval_size`` is
  an error rather than a sample with repeats;
- train: every other problem; ``train(n, seed)`` draws ``n`` with replacement from a
  ``random.Random(seed)`` stream, rejecting eval problems.

Why the eval split is a fixed, explicit set (and not, say, whatever another seed draws): it
depends only on ``eval_size`` and ``split_seed``, never on the run's seed, so every run and
every algorithm is scored on the same problems; it holds exactly ``eval_size`` distinct
problems, so none counts twice; train draws are checked against it, so train and eval never
share a problem (two seeds' streams over a finite space would); and growing ``eval_size``
extends it, keeping the earlier problems.

A problem's identity is ``key(drawn)``, the drawn value itself unless a task says otherwise
(countdown keys its numbers as a multiset, so order does not matter). A task whose problem
needs more randomness once its identity is known (countdown's target) passes
``complete(drawn, rng)``: it is called only for kept draws, with the same generator, right
after the draw; otherwise the drawn value is the problem. Keys must be hashable, and
``eval_size`` must not exceed the number of distinct keys (the tasks' configs cap it at half),
or building the eval split never ends.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from functools import cached_property
from typing import Any, Generic, TypeVar, cast, overload

from rlbench.task import Prompt, Split

D = TypeVar("D")  # what ``draw`` returns
P = TypeVar("P")  # a problem: the drawn value itself, or what ``complete`` makes of it


def _itself(drawn: Any) -> Hashable:
    return cast(Hashable, drawn)


class DrawnSplits(Generic[D, P]):
    """The fixed eval split and the seeded train stream of the problems ``draw`` generates."""

    @overload
    def __init__(
        self: DrawnSplits[D, D],
        draw: Callable[[random.Random], D],
        eval_size: int,
        split_seed: int,
        *,
        key: Callable[[D], Hashable] | None = None,
        noun: str = "problems",
    ) -> None: ...

    @overload
    def __init__(
        self,
        draw: Callable[[random.Random], D],
        eval_size: int,
        split_seed: int,
        *,
        key: Callable[[D], Hashable] | None = None,
        complete: Callable[[D, random.Random], P],
        noun: str = "problems",
    ) -> None: ...

    def __init__(
        self,
        draw: Callable[[random.Random], D],
        eval_size: int,
        split_seed: int,
        *,
        key: Callable[[D], Hashable] | None = None,
        complete: Callable[[D, random.Random], P] | None = None,
        noun: str = "problems",
    ) -> None:
        """``noun`` names the problems in the error for too many eval prompts ("lists")."""
        self.draw = draw
        self.eval_size = eval_size
        self.split_seed = split_seed
        self.key: Callable[[D], Hashable] = key if key is not None else _itself
        self.complete = complete
        self.noun = noun

    def _problem(self, drawn: D, rng: random.Random) -> P:
        return cast(P, drawn) if self.complete is None else self.complete(drawn, rng)

    @cached_property
    def _eval_split(self) -> dict[Hashable, P]:
        """Key -> problem for the eval split, in draw order (a dict keeps insertion order)."""
        rng, split = random.Random(self.split_seed), {}
        while len(split) < self.eval_size:
            drawn = self.draw(rng)
            key = self.key(drawn)
            if key not in split:
                split[key] = self._problem(drawn, rng)
        return split

    @cached_property
    def eval_problems(self) -> list[P]:
        """The eval split in draw order: the first ``eval_size`` distinct draws of ``split_seed``."""
        return list(self._eval_split.values())

    def is_eval(self, drawn: D) -> bool:
        """Whether the drawn value (the problem itself unless ``complete`` is given) belongs to
        the eval split; every other problem is train."""
        return self.key(drawn) in self._eval_split

    def train(self, n: int, seed: int) -> list[P]:
        """``n`` train problems drawn with replacement by ``random.Random(seed)``, eval ones rejected."""
        # Local names: this loop runs once per train prompt (and per rejected draw).
        rng, draw, key, eval_split, problems = random.Random(seed), self.draw, self.key, self._eval_split, []
        while len(problems) < n:
            drawn = draw(rng)
            if key(drawn) not in eval_split:
                problems.append(self._problem(drawn, rng))
        return problems

    def eval(self, n: int, seed: int) -> list[P]:
        """A ``random.Random(seed)`` sample of ``n`` distinct eval problems; more than
        ``eval_size`` raises ``ValueError``."""
        if n > self.eval_size:
            raise ValueError(
                f"asked for {n} eval prompts but the eval split has task.eval_size="
                f"{self.eval_size} {self.noun}; raise eval_size or ask for fewer"
            )
        return random.Random(seed).sample(self.eval_problems, n)

    def problems(self, split: Split, n: int, seed: int) -> list[P]:
        """``train(n, seed)`` or ``eval(n, seed)``; any other split raises ``ValueError``."""
        if split == "train":
            return self.train(n, seed)
        if split == "eval":
            return self.eval(n, seed)
        raise ValueError(f"unknown split {split!r}; valid splits: 'train', 'eval'")

    def prompts(self, split: Split, n: int, seed: int, to_prompt: Callable[[P], Prompt]) -> list[Prompt]:
        """The prompts of ``problems(split, n, seed)``: what a task's ``prompts`` returns."""
        return [to_prompt(problem) for problem in self.problems(split, n, seed)]
