"""GRPO: Group Relative Policy Optimization (Shao et al. 2024), with Dr. GRPO and DAPO options.

No critic: for each prompt ``q`` sample a group of ``G`` completions ``o_1..o_G`` from
``pi_old``, score each with the task's reward ``r_i``, and use the group as its own baseline.
Every token of ``o_i`` gets the same advantage::

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)        (scale_rewards, std)

Per token, with ``rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})``
and the KL to the frozen reference ``pi_ref`` estimated by ``k3`` (or ``k2``, ``k1+``, ``k3+``)::

    L_{i,t} = min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) - beta * KL_{i,t}
    KL_{i,t} = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1

In the loss an estimator acts through its gradient: k3's descends the forward KL(pi_ref || pi),
k2's, k1+'s and k3+'s the reverse KL(pi || pi_ref), and k1's is zero in expectation, so k1 is
refused with ``beta > 0`` (docs/kl_estimators.md).

The objective, maximised (loss = -objective), aggregates ``L`` over tokens (loss_aggregation)::

    seq_mean_token_mean      1/G sum_i 1/|o_i| sum_t L_{i,t}       (original GRPO)
    token_mean               sum_i sum_t L_{i,t} / sum_i |o_i|     (DAPO)
    seq_mean_token_sum_norm  1/G sum_i sum_t L_{i,t} / L_max       (Dr. GRPO)

``mu`` optimisation passes are made over each batch of rollouts; with ``mu = 1`` the ratio is 1
but its gradient is not zero.

Process supervision (``advantage=prm``, THEORY.md section 5): with a reward per reasoning
step, each step reward is normalised by the mean and std of all step rewards in the group,
and a token's advantage is the sum of the normalised rewards of the steps ending at or after
it (``rlbench.estimators.process_advantages``).

Variants, as options:
- Dr. GRPO: ``scale_rewards=false``, ``loss_aggregation=seq_mean_token_sum_norm``.
- DAPO: ``eps_high=0.28`` (clip-higher), ``loss_aggregation=token_mean``,
  ``dynamic_sampling=true`` (drop groups whose rewards are all equal and sample more prompts),
  ``beta=0`` (no KL term, no reference model).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlbench.algorithm import Algorithm, AllReduceSum, LossScale, RolloutBatch, single_process
from rlbench.errors import require
from rlbench.estimators import K1_IN_LOSS, KL_ESTIMATORS, group_advantages, process_advantages
from rlbench.losses import AGGREGATIONS, clipped_policy_loss
from rlbench.registry import ALGORITHMS


@dataclass
class GRPOConfig:
    """Options of GRPO (the ``algorithm:`` section of a run config, less ``name``)."""

    group_size: int = 8
    """Completions sampled per prompt (G); the group is its own baseline."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std; false is Dr. GRPO (mean-centred only)."""
    std: Literal["sample", "population"] = "sample"
    """Std used when scale_rewards: sample (divides by G-1, as TRL and verl) or population (by G)."""
    eps_low: float = 0.2
    """Lower clip range: the ratio is clipped below at 1 - eps_low."""
    eps_high: float = 0.2
    """Upper clip range: the ratio is clipped above at 1 + eps_high (DAPO clip-higher uses 0.28)."""
    beta: float = 0.04
    """Coefficient of the per-token KL penalty to the reference; 0 loads no reference model."""
    kl_estimator: Literal["k1", "k2", "k3", "k1+", "k3+"] = "k3"
    """Per-token KL estimator of the penalty: k2 = (log r)^2 / 2, k3 = r - 1 - log r, k1+ and k3+ (k1's,
    k3's value with k2's gradient); k1 = -log r is refused with beta > 0 (its expected gradient is 0)."""
    mu: int = 1
    """Optimisation passes over each batch of rollouts (GRPO's mu)."""
    loss_aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = (
        "seq_mean_token_mean"
    )
    """Token aggregation: seq_mean_token_mean (GRPO), token_mean (DAPO), seq_mean_token_sum_norm (Dr GRPO)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and refill with fresh prompts."""
    max_resample_rounds: int = 3
    """With dynamic_sampling, how many times fresh prompts may be sampled to refill dropped groups."""
    advantage_eps: float = 1e-4
    """Added to the reward std before dividing, so a group of equal rewards gets advantage 0."""
    advantage: Literal["orm", "prm"] = "orm"
    """orm: outcome supervision, one group-normalised reward per completion given to every
    token; prm: process supervision, the task's step rewards normalised over the group, each
    token's advantage the sum over the steps ending at or after it (tasks with steps only:
    multistep)."""

    def __post_init__(self) -> None:
        require(self.group_size >= 1, "group_size", self.group_size, "must be >= 1 (completions per prompt)")
        require(
            self.group_size >= 2 or not self.scale_rewards,
            "group_size",
            self.group_size,
            "the std of one reward is undefined; set scale_rewards false or group_size >= 2",
        )
        require(self.std in ("sample", "population"), "std", self.std, "must be 'sample' or 'population'")
        require(0.0 < self.eps_low < 1.0, "eps_low", self.eps_low, "must be in (0, 1)")
        require(
            0.0 < self.eps_high and math.isfinite(self.eps_high),
            "eps_high",
            self.eps_high,
            "must be a finite number > 0",
        )
        require(self.beta >= 0.0 and math.isfinite(self.beta), "beta", self.beta, "must be finite and >= 0")
        require(
            self.kl_estimator in KL_ESTIMATORS,
            "kl_estimator",
            self.kl_estimator,
            f"must be one of {', '.join(KL_ESTIMATORS)}",
        )
        # the penalty acts through its gradient alone, and k1's is zero in expectation
        require(
            not (self.beta > 0.0 and self.kl_estimator == "k1"), "kl_estimator", self.kl_estimator, K1_IN_LOSS
        )
        require(self.mu >= 1, "mu", self.mu, "must be >= 1 (optimisation passes per batch)")
        require(
            self.loss_aggregation in AGGREGATIONS,
            "loss_aggregation",
            self.loss_aggregation,
            f"must be one of {', '.join(AGGREGATIONS)}",
        )
        rounds = self.max_resample_rounds
        require(rounds >= 0, "max_resample_rounds", rounds, "must be >= 0")
        require(self.advantage_eps > 0.0, "advantage_eps", self.advantage_eps, "must be > 0")
        require(self.advantage in ("orm", "prm"), "advantage", self.advantage, "'orm' or 'prm'")


@ALGORITHMS.register("grpo")
class GRPO(Algorithm):
    """Group Relative Policy Optimization: group-normalised rewards, clipped ratio, KL to ref.

    Dr. GRPO and DAPO are option sets of this class (see the module docstring).
    """

    Config = GRPOConfig
    config: GRPOConfig

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def needs_reference(self) -> bool:
        return self.config.beta > 0.0

    @property
    def passes_per_batch(self) -> int:
        return self.config.mu

    @property
    def needs_step_rewards(self) -> bool:
        return self.config.advantage == "prm"

    @property
    def max_resample_rounds(self) -> int:
        return self.config.max_resample_rounds if self.config.dynamic_sampling else 0

    def keep_groups(self, rewards: Tensor) -> Tensor:
        """With dynamic sampling, the groups whose rewards are not all equal (A = 0 otherwise)."""
        if not self.config.dynamic_sampling:
            return torch.ones(rewards.shape[0], dtype=torch.bool, device=rewards.device)
        return (rewards != rewards[:, :1]).any(dim=-1)

    def prepare(self, batch: RolloutBatch, all_reduce_sum: AllReduceSum = single_process) -> RolloutBatch:
        """Advantages normalised within each prompt's group (a group lives on one process, so no
        collective is needed): one per completion (ORM), or one per token from the step
        rewards (PRM)."""
        cfg = self.config
        if cfg.advantage == "prm":
            if batch.step_rewards is None or batch.step_ends is None:
                raise ValueError("PRM advantages need the batch's step rewards (the task's step_rewards)")
            advantages = process_advantages(
                batch.step_rewards,
                batch.step_ends,
                batch.group_size,
                cfg.scale_rewards,
                cfg.std,
                cfg.advantage_eps,
            )
            return dataclasses.replace(batch, advantages=advantages)
        grouped = batch.rewards.view(-1, batch.group_size)
        advantages = group_advantages(grouped, cfg.scale_rewards, cfg.std, cfg.advantage_eps)
        return dataclasses.replace(batch, advantages=advantages.view(-1))

    def loss(
        self, logprobs: Tensor, batch: RolloutBatch, scale: LossScale, hidden: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Minus the aggregated clipped surrogate (less beta * KL), and the step's metrics."""
        cfg = self.config
        return clipped_policy_loss(
            logprobs,
            batch,
            scale,
            cfg.eps_low,
            cfg.eps_high,
            cfg.loss_aggregation,
            cfg.beta,
            cfg.kl_estimator,
        )
