"""RLOO: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024), THEORY section 9.

Sample ``G >= 2`` completions per prompt; each completion's baseline is the mean reward of the
*other* ``G - 1`` completions of its prompt, an unbiased baseline that needs no critic::

    A_i = r_i - 1/(G-1) * sum_{j != i} r_j                      (given to every token of o_i)

The loss is the clipped surrogate GRPO uses (``rlbench.losses.clipped_policy_loss``). The KL to
the reference goes either in the loss (``kl_in: loss``, as GRPO, k3 by default) or in the
reward (``kl_in: reward``, as PPO and the RLOO paper, k1): then each completion's reward is
``r_i - beta * sum_t KL_{i,t}`` before the leave-one-out baseline.

This file is the whole algorithm: it plugs into the core through the ``Algorithm`` contract
alone, with no change to ``rlbench/``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from rlbench.algorithm import Algorithm, AllReduceSum, LossScale, RolloutBatch, single_process
from rlbench.errors import require
from rlbench.estimators import KL_ESTIMATORS, kl_estimate, kl_shaped_rewards, leave_one_out_advantages
from rlbench.losses import AGGREGATIONS, clipped_policy_loss, masked_mean
from rlbench.registry import ALGORITHMS


@dataclass
class RLOOConfig:
    """Options of RLOO (``algorithm.rloo``)."""

    group_size: int = 8
    """Completions sampled per prompt (>= 2: each one's baseline is the mean of the others)."""
    beta: float = 0.04
    """KL coefficient to the reference; 0 loads no reference model."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL goes: loss (a per-token penalty, as GRPO) or reward (subtracted from each
    completion's reward before the baseline, as PPO)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (k3 suits the loss; use k1 with kl_in: reward, as PPO)."""
    eps_low: float = 0.2
    """Lower clip range of the policy ratio (1 - eps_low)."""
    eps_high: float = 0.2
    """Upper clip range of the policy ratio (1 + eps_high)."""
    mu: int = 1
    """Optimisation passes over each batch of rollouts."""
    loss_aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = (
        "seq_mean_token_mean"
    )
    """Token aggregation of the loss (as GRPO's option)."""

    def __post_init__(self) -> None:
        require(self.group_size >= 2, "group_size", self.group_size, "an integer >= 2 (one to leave out)")
        require(self.beta >= 0 and math.isfinite(self.beta), "beta", self.beta, "a finite number >= 0")
        require(self.kl_in in ("loss", "reward"), "kl_in", self.kl_in, "'loss' or 'reward'")
        require(
            self.kl_estimator in KL_ESTIMATORS,
            "kl_estimator",
            self.kl_estimator,
            f"one of {', '.join(KL_ESTIMATORS)}",
        )
        require(0.0 < self.eps_low < 1.0, "eps_low", self.eps_low, "a number in (0, 1)")
        require(
            0.0 < self.eps_high and math.isfinite(self.eps_high), "eps_high", self.eps_high, "a number > 0"
        )
        require(self.mu >= 1, "mu", self.mu, "an integer >= 1")
        require(
            self.loss_aggregation in AGGREGATIONS,
            "loss_aggregation",
            self.loss_aggregation,
            f"one of {', '.join(AGGREGATIONS)}",
        )


@ALGORITHMS.register("rloo")
class RLOO(Algorithm):
    """REINFORCE Leave-One-Out: the other completions' mean reward as each one's baseline."""

    Config = RLOOConfig
    config: RLOOConfig

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def needs_reference(self) -> bool:
        return self.config.beta > 0.0

    @property
    def needs_scores(self) -> bool:
        # the KL in the reward is pi_old's, fixed before the advantages are computed
        return self.config.beta > 0.0 and self.config.kl_in == "reward"

    @property
    def passes_per_batch(self) -> int:
        return self.config.mu

    def prepare(self, batch: RolloutBatch, all_reduce_sum: AllReduceSum = single_process) -> RolloutBatch:
        """One leave-one-out advantage per completion (a group lives on one process)."""
        cfg = self.config
        rewards = batch.rewards
        if self.needs_scores:
            assert batch.old_logprobs is not None and batch.ref_logprobs is not None
            _, kl = kl_shaped_rewards(
                rewards, batch.old_logprobs, batch.ref_logprobs, batch.completion_mask, 0.0, cfg.kl_estimator
            )
            rewards = rewards - cfg.beta * kl.sum(-1)
        advantages = leave_one_out_advantages(rewards.view(-1, batch.group_size)).reshape(-1)
        return dataclasses.replace(batch, advantages=advantages)

    def loss(
        self, logprobs: Tensor, batch: RolloutBatch, scale: LossScale, hidden: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        beta = cfg.beta if cfg.kl_in == "loss" else 0.0
        loss, metrics = clipped_policy_loss(
            logprobs, batch, scale, cfg.eps_low, cfg.eps_high, cfg.loss_aggregation, beta, cfg.kl_estimator
        )
        if "kl" not in metrics and batch.ref_logprobs is not None:  # KL in the reward: still logged
            kl = kl_estimate(cfg.kl_estimator, logprobs.detach(), batch.ref_logprobs)
            metrics["kl"] = masked_mean(kl, batch.completion_mask)
        return loss, metrics
