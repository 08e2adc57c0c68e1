"""The task contract: prompts, a verifier, and demonstrations for a warm start.

A task is deterministic given a seed: the same ``(split, n, seed)`` always yields the same
prompts, and the train and eval splits never share a prompt.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class Prompt:
    """One problem: ``text`` is what the policy sees; ``answer`` is what the verifier expects."""

    text: str
    answer: str


class Task(abc.ABC):
    """Base class of tasks with verifiable rewards. Subclasses set ``Config`` and ``alphabet``."""

    #: Dataclass of the task's options (the ``task:`` section of a run config, less ``name``).
    Config: ClassVar[type]
    #: Every character prompts and answers use; tiny presets build a char tokenizer from it.
    alphabet: ClassVar[str]
    #: Whether ``reward`` verifies a completion (false: a task that only supplies prompts, so
    #: preference pairs cannot be built from it and must come from a file).
    verifiable: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        self.config = config

    @abc.abstractmethod
    def prompts(self, split: Split, n: int, seed: int) -> list[Prompt]:
        """``n`` prompts of ``split``, a pure function of ``(split, n, seed)``."""

    @abc.abstractmethod
    def reward(self, prompt: Prompt, completion: str) -> float:
        """The verifier's reward for one completion (decoded text, special tokens removed)."""

    @abc.abstractmethod
    def is_correct(self, prompt: Prompt, completion: str) -> bool:
        """Whether the completion solves the prompt (what ``eval/accuracy`` counts)."""

    def rewards(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        """Batched form of ``reward``; override when scoring a batch at once is cheaper."""
        return [self.reward(p, c) for p, c in zip(prompts, completions, strict=True)]

    @abc.abstractmethod
    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        """``n`` (prompt text, correct completion) pairs from the train split, for warm starts."""
