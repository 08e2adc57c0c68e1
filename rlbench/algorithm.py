"""The algorithm contract: what the Lightning module asks of every RL algorithm.

An algorithm declares where its experience comes from (``experience``: fresh on-policy
rollouts each step, or a fixed set of preference pairs), any trainable modules of its own
(PPO's value head), and any state it keeps (an adaptive KL coefficient). A step then runs the
same way for all of them:

1. the experience source hands over a ``RolloutBatch`` (this process's share of the step);
2. the module adds what is fixed for the step: the reference's log-probs
   (``needs_reference``) and, when ``needs_scores`` says so, pi_old's log-probs and the
   algorithm's own per-token quantities (``score``: PPO's old values), from a no-grad pass or,
   when the whole batch is one micro-batch, from pass 0's own forward;
3. ``prepare`` derives what the loss needs (advantages, returns), with collectives over all
   processes where a statistic must be global (whitening);
4. ``loss`` runs once per micro-batch and optimisation pass;
5. ``end_step`` sees the step's global metrics (the adaptive KL controller updates there).

The module never tests an algorithm's name: everything that differs is a property or a
method here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

#: ``all_reduce_sum(t)``: ``t`` summed over every data-parallel process (itself when alone).
AllReduceSum = Callable[[Tensor], Tensor]


def single_process(tensor: Tensor) -> Tensor:
    """The ``AllReduceSum`` of a run with one process: nothing to add."""
    return tensor


@dataclass
class RolloutBatch:
    """The ``B = P * G`` completions of one step; rows ``g*G .. g*G+G-1`` share prompt ``g``.

    Token tensors are ``[B, T]`` over completion positions; ``completion_mask`` is 1 for every
    generated token up to and including EOS, 0 after it. With preference pairs ``G = 2``: row
    ``2p`` is pair ``p``'s chosen completion, row ``2p + 1`` its rejected one.

    Any tensor field with a leading ``B`` dimension travels with its rows: ``rows`` slices it
    and ``concat`` stacks it (per-token ``[B, T]`` fields right-padded with 0, ``prompt_*``
    left-padded), so a new per-token field cannot be lost on the way.
    """

    prompt_ids: Tensor  # [B, Tp], left padded
    prompt_mask: Tensor  # [B, Tp]
    completion_ids: Tensor  # [B, T]
    completion_mask: Tensor  # [B, T], float
    rewards: Tensor  # [B]
    group_size: int
    behaviour_logprobs: Tensor | None = None  # [B, T], under the sampling policy (None: not sampled)
    old_logprobs: Tensor | None = None  # [B, T], pi_old (None: the detached current log-probs)
    ref_logprobs: Tensor | None = None  # [B, T], pi_ref, when the algorithm needs a reference
    ref_sequence_logprobs: Tensor | None = None  # [B], pi_ref summed, cached with the data (DPO)
    old_values: Tensor | None = None  # [B, T], the critic's V(s_t) before the update (PPO)
    returns: Tensor | None = None  # [B, T], the critic's regression targets (PPO)
    advantages: Tensor | None = None  # [B] (one per completion) or [B, T] (per token)
    clean_rewards: Tensor | None = None  # [B], the verifier's rewards before reward noise
    step_rewards: Tensor | None = None  # [B, T], a step's reward at the token that ends it (PRM)
    step_ends: Tensor | None = None  # [B, T], 1.0 at the tokens where a step ends (PRM)

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

    @staticmethod
    def concat(batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
        """Stacks batches row-wise, every tensor field included: prompts left-padded, per-token
        fields right-padded (ids with ``pad_token_id``, the rest with 0) to a common width."""
        if len(batches) == 1:
            return batches[0]
        joined: dict[str, Any] = {}
        for f in fields(RolloutBatch):
            values = [getattr(b, f.name) for b in batches]
            if not isinstance(values[0], Tensor):
                continue
            if any(v is None for v in values):
                raise ValueError(f"cannot concatenate batches where only some have {f.name}")
            pad = pad_token_id if f.name.endswith("_ids") else 0
            joined[f.name] = cat_padded(values, pad, left=f.name.startswith("prompt_"))
        return replace(batches[0], **joined)


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
    """Base class of RL algorithms. Subclasses set ``Config`` and implement ``prepare`` and ``loss``."""

    #: Dataclass of the algorithm's options (its sub-section of the ``algorithm:`` section).
    Config: ClassVar[type]
    #: Where experience comes from: ``rollouts`` (sampled from the policy every step) or
    #: ``pairs`` (preference pairs built once, or refreshed now and then).
    experience: ClassVar[Literal["rollouts", "pairs"]] = "rollouts"

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    @abc.abstractmethod
    def group_size(self) -> int:
        """Rows per prompt in a batch: completions sampled per prompt (2 for a preference pair)."""

    @property
    def seed_varies(self) -> str:
        """What a run's seed varies in this algorithm's experience, as a short phrase for
        reports: an interval over seeds measures that variation and no other. (Besides, the
        seed of every run draws the warm start unless ``warmstart.seed`` is set, the eval
        prompts when ``eval.num_prompts`` is below the eval split, and LoRA's initial adapters.)"""
        return "prompts, samples and reward noise"

    @property
    def needs_reference(self) -> bool:
        """Whether the module must load a frozen reference and fill ``batch.ref_logprobs``."""
        return False

    @property
    def needs_scores(self) -> bool:
        """Whether ``prepare`` needs pi_old's log-probs and ``score``'s quantities.

        When true, they exist before ``prepare`` whatever the number of passes (PPO's
        KL-in-reward and GAE need them): from one no-grad pass, or -- when the whole batch is
        one micro-batch -- from pass 0's own forward, with ``prepare`` run between that
        forward and its backward. When false, pass 0's own log-probs serve as pi_old for later
        passes. Either way no extra forward is made unless micro-batches require it.
        """
        return False

    @property
    def needs_hidden_states(self) -> bool:
        """Whether ``score`` and ``loss`` read the policy's last hidden states (a value head)."""
        return False

    @property
    def needs_step_rewards(self) -> bool:
        """Whether ``prepare`` reads the task's step rewards (``batch.step_rewards``: PRM)."""
        return False

    @property
    def passes_per_batch(self) -> int:
        """Optimisation passes over each batch of experience (GRPO's ``mu``, PPO's epochs)."""
        return 1

    @property
    def minibatches_per_pass(self) -> int:
        """Optimiser steps per pass: the batch is split in this many minibatches (PPO)."""
        return 1

    @property
    def max_resample_rounds(self) -> int:
        """How many times the module may sample fresh prompts to replace rejected groups."""
        return 0

    @property
    def logprob_temperature(self) -> float | None:
        """Temperature the loss scores log-probs at; None: the sampling temperature (on-policy)."""
        return None

    def keep_groups(self, rewards: Tensor) -> Tensor:
        """Which groups (rows of ``rewards [P, G]``) to train on; all by default."""
        return torch.ones(rewards.shape[0], dtype=torch.bool)

    def build_modules(self, policy: nn.Module) -> dict[str, nn.Module]:
        """Trainable modules of the algorithm's own (PPO's value head), built once for ``policy``.

        The module holds them as submodules, so strategies, precision, ``.to(device)`` and
        checkpoints apply; their parameters join the optimiser (``module_lr``), clipping and
        the non-finite-gradient guard.
        """
        return {}

    @property
    def module_lr(self) -> float | None:
        """Learning rate of ``build_modules``' parameters; None: ``optim.lr``."""
        return None

    @property
    def modules_name(self) -> str:
        """What ``build_modules``' parameters are called in metrics: their gradient norm is
        logged as ``train/<name>_grad_norm``, apart from the policy's ``train/grad_norm``, so
        every algorithm's ``train/grad_norm`` is its policy's."""
        return "modules"

    def trains_policy(self, rollout_step: int) -> bool:
        """Whether rollout step ``rollout_step`` updates the policy. False trains only the
        algorithm's own modules (a critic's warm-up): the policy's gradients are dropped, so
        neither the optimiser nor weight decay touches it."""
        return True

    def score(self, batch: RolloutBatch, hidden: Tensor | None) -> RolloutBatch:
        """Adds per-row quantities of the policy before the update, from the no-grad pass of
        ``needs_scores`` (``hidden``: last hidden states ``[B, T, H]`` when asked for)."""
        return batch

    @abc.abstractmethod
    def prepare(self, batch: RolloutBatch, all_reduce_sum: AllReduceSum = single_process) -> RolloutBatch:
        """Adds what the loss needs that is fixed for the step (advantages, returns).

        ``batch`` is this process's share; a statistic over the whole step (a whitening mean)
        must sum its parts with ``all_reduce_sum``, or the result would depend on the number
        of processes.
        """

    @abc.abstractmethod
    def loss(
        self, logprobs: Tensor, batch: RolloutBatch, scale: LossScale, hidden: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of the micro-batch ``batch`` given the current policy's ``logprobs [b, T]``
        (and last hidden states ``[b, T, H]`` when ``needs_hidden_states``).

        Returns ``(loss, metrics)``; the losses of a step's micro-batches add up to the step's
        loss (``scale`` holds the step-wide denominators). Metric names follow
        ``rlbench.metrics``: ``loss`` and names ending in ``_loss`` add up, ``_min`` and
        ``_max`` reduce by min/max, the rest by a token-weighted mean.
        """

    def end_step(self, metrics: dict[str, float], num_samples: int) -> dict[str, float]:
        """Called after each step with its global metrics and sample count; returns metrics of
        the algorithm's state (``train/kl_coef``). All processes see the same figures."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State that is not a parameter and must survive ``--resume`` (a KL coefficient)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict``'s state from a checkpoint."""
        return None


def cat_padded(tensors: list[Tensor], value: float, left: bool = False) -> Tensor:
    """Concatenates ``[rows, width]`` tensors along rows, padding each to the widest first
    (on the left for left-padded prompts, on the right for completions); ``[rows]`` tensors
    are simply concatenated."""
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    return torch.cat(
        [
            torch.nn.functional.pad(
                t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value
            )
            for t in tensors
        ]
    )
