"""The algorithm contract: what the Lightning module asks of every RL algorithm.

The module samples ``group_size`` completions per prompt, scores them, and hands the step's
``RolloutBatch`` to the algorithm twice: ``prepare`` once (advantages), then ``loss`` once per
micro-batch and optimisation pass. The module never tests an algorithm's name: everything
that differs between algorithms is a property or a method here.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """The ``B = P * G`` completions of one step; rows ``g*G .. g*G+G-1`` share prompt ``g``.

    Token tensors are ``[B, T]`` over completion positions; ``completion_mask`` is 1 for every
    generated token up to and including EOS, 0 after it.
    """

    prompt_ids: Tensor  # [B, Tp], left padded
    prompt_mask: Tensor  # [B, Tp]
    completion_ids: Tensor  # [B, T]
    completion_mask: Tensor  # [B, T], float
    behaviour_logprobs: Tensor  # [B, T], log-probs under the sampling policy
    rewards: Tensor  # [B]
    group_size: int
    old_logprobs: Tensor | None = None  # [B, T], pi_old when mu > 1 (else the detached current)
    ref_logprobs: Tensor | None = None  # [B, T], pi_ref, when the algorithm needs a reference
    advantages: Tensor | None = None  # [B] (one per completion) or [B, T] (per token)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def rows(self, index: slice | Tensor) -> RolloutBatch:
        """The rows ``index`` (a slice or index tensor); per-step scalars are unchanged."""
        sliced = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **sliced)


@dataclass(frozen=True)
class LossScale:
    """Step-wide denominators, so a loss summed over micro-batches equals the whole-batch loss.

    ``num_sequences`` and ``num_tokens`` count the whole step (all micro-batches);
    ``max_len`` is the generation budget (Dr. GRPO's constant normaliser).
    """

    num_sequences: int
    num_tokens: int
    max_len: int


class Algorithm(abc.ABC):
    """Base class of on-policy RL algorithms. Subclasses set ``Config`` and implement the loss."""

    #: Dataclass of the algorithm's options (the ``algorithm:`` section less ``name``).
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    @abc.abstractmethod
    def group_size(self) -> int:
        """Completions sampled per prompt."""

    @property
    def needs_reference(self) -> bool:
        """Whether ``prepare``/``loss`` read ``ref_logprobs`` (a frozen reference is loaded)."""
        return False

    @property
    def passes_per_batch(self) -> int:
        """Optimisation passes over each batch of rollouts (GRPO's ``mu``)."""
        return 1

    @property
    def max_resample_rounds(self) -> int:
        """How many times the module may sample fresh prompts to replace rejected groups."""
        return 0

    def keep_groups(self, rewards: Tensor) -> Tensor:
        """Which groups (rows of ``rewards [P, G]``) to train on; all by default."""
        return torch.ones(rewards.shape[0], dtype=torch.bool)

    @abc.abstractmethod
    def prepare(self, batch: RolloutBatch) -> RolloutBatch:
        """Adds what the loss needs that is fixed for the step (advantages)."""

    @abc.abstractmethod
    def loss(
        self, logprobs: Tensor, batch: RolloutBatch, scale: LossScale
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of the micro-batch ``batch`` given the current policy's ``logprobs [b, T]``.

        Returns ``(loss, metrics)``; the losses of a step's micro-batches add up to the step's
        loss (``scale`` holds the step-wide denominators). Metric names ending in ``_min`` or
        ``_max`` are reduced by min/max across micro-batches, the rest by a token-weighted mean.
        """
