"""Prompt batches over a task, addressed by step so that a resumed run sees the same data.

The prompts of rollout step ``s`` are a pure function of ``(seed, s)``, and completion ``j`` of
the prompt at position ``i`` of that step draws from a seed derived from ``(seed, s, i, j)``.
A resumed run therefore needs only the step counter that Lightning already restores, and a
completion is the same however the step's prompts are split into micro-batches or processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from rlbench.errors import ConfigError
from rlbench.rollout import derive_seed
from rlbench.task import Prompt, Task

# Salts keep the streams of different purposes independent under one run seed.
_TRAIN_PROMPTS, _RESAMPLE, _COMPLETIONS, _MINIBATCHES = 1, 2, 3, 4


def minibatch_seed(seed: int, step: int, epoch: int) -> int:
    """The seed of the minibatch split of ``epoch`` of rollout step ``step``: each epoch reshuffles,
    and a resumed run reshuffles alike."""
    return derive_seed(seed, _MINIBATCHES, step, epoch)


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one rollout step (or one refill round of it) and their positions in it."""

    step: int
    resample_round: int
    prompts: list[Prompt]
    positions: list[int]


class PromptSource:
    """Train prompts for any step, eval prompts, and per-completion seeds."""

    def __init__(self, task: Task, prompts_per_step: int, seed: int) -> None:
        self.task = task
        self.prompts_per_step = prompts_per_step
        self.seed = seed

    def batch(self, step: int, resample_round: int = 0, rank: int = 0, world_size: int = 1) -> PromptBatch:
        """This process's share of the prompts of ``step``: a contiguous slice, so every group
        stays on one process. ``resample_round > 0`` gives fresh prompts for refills."""
        salt = _TRAIN_PROMPTS if resample_round == 0 else _RESAMPLE
        prompts = self.task.prompts(
            "train", self.prompts_per_step, derive_seed(self.seed, salt, step, resample_round)
        )
        share = len(prompts) // world_size
        positions = list(range(rank * share, (rank + 1) * share))
        return PromptBatch(step, resample_round, [prompts[i] for i in positions], positions)

    def eval_prompts(self, n: int) -> list[Prompt]:
        try:
            return self.task.prompts("eval", n, self.seed)
        except ValueError as err:  # e.g. more prompts than the task's eval split holds
            raise ConfigError("eval.num_prompts", n, str(err)) from None

    def completion_seeds(self, batch: PromptBatch, group_size: int) -> list[int]:
        """One seed per completion, in row order: prompt ``i``'s sample ``j`` is row ``i * G + j``."""
        return [
            derive_seed(self.seed, _COMPLETIONS, batch.step, batch.resample_round, position, j)
            for position in batch.positions
            for j in range(group_size)
        ]


class StepTicks:
    """The train "dataloader": an endless stream of ticks; the module maps steps to prompts."""

    def __iter__(self) -> Iterator[int]:
        tick = 0
        while True:
            yield tick
            tick += 1
