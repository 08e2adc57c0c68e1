"""PPO with a critic, KL in the reward and GAE (Schulman et al. 2017; Ouyang et al. 2022), as in
OpenRLHF.

Sample ``G`` completions per prompt (one by default) from ``pi_old``. Per token, with ``T`` the
completion's last token and ``r`` the task's reward, the reward carries the KL to the frozen
reference (``k1`` by default, ``k3`` allowed)::

    R_t = -kl_coef * KL_t                 t < T
    R_T = -kl_coef * KL_T + r

A value model ``V`` (a linear head on the policy's last hidden state by default, or a separate
critic model) scores every state ``s_t`` = prompt + ``o_<t``. Advantages by GAE::

    delta_t = R_t + gamma * V(s_{t+1}) - V(s_t),    V(s_{T+1}) = 0
    A_t     = sum_l (gamma * lam)^l * delta_{t+l},  returns_t = A_t + V(s_t)

optionally whitened over the whole step (all processes). The loss is the clipped surrogate
(the one GRPO uses) plus ``vf_coef`` times the clipped value loss::

    L_V = 0.5 * max((V - ret)^2, (clip(V, V_old - c, V_old + c) - ret)^2)

``ppo_epochs`` passes over each batch, each split into ``minibatches`` optimiser steps, the
minibatches reshuffled every epoch (from the seed, step and epoch). ``critic_warmup_steps``
first rollout steps train the critic alone; ``value_head_detach`` keeps the value loss out of
the shared trunk.
``kl_coef`` is fixed, or adaptive (Ziegler et al. 2019): after a step with measured KL ``k``,
``e = clip(k / target_kl - 1, -0.2, 0.2)`` and ``kl_coef <- kl_coef * (1 + e * n / horizon)``
(``n`` samples in the step); it is run state, checkpointed and restored on ``--resume``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rlbench.algorithm import Algorithm, AllReduceSum, LossScale, RolloutBatch, single_process
from rlbench.errors import require
from rlbench.estimators import KL_ESTIMATORS, gae, kl_estimate, kl_shaped_rewards
from rlbench.forward import batch_forward, hidden_size, output_head
from rlbench.losses import (
    AGGREGATIONS,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    masked_mean,
    whiten,
)
from rlbench.registry import ALGORITHMS


@dataclass
class PPOConfig:
    """Options of PPO (``algorithm.ppo``)."""

    group_size: int = 1
    """Completions sampled per prompt; the critic is the baseline, so one is enough."""
    kl_ctl: float = 0.05
    """KL coefficient in the per-token reward (the initial one when adaptive_kl)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator of the reward penalty (k1 by default: unbiased in value)."""
    adaptive_kl: bool = False
    """Adapt the KL coefficient towards target_kl (Ziegler et al. 2019); false keeps it fixed."""
    target_kl: float = 0.02
    """With adaptive_kl: the per-token KL to the reference the controller aims for."""
    kl_horizon: int = 10000
    """With adaptive_kl: samples over which the coefficient may change by up to 20%."""
    gamma: float = 1.0
    """GAE discount per token."""
    lam: float = 0.95
    """GAE lambda: 1 is the Monte-Carlo return, 0 one-step TD."""
    whiten_advantages: bool = True
    """Whiten advantages over the step's tokens (mean and variance over all processes)."""
    eps_low: float = 0.2
    """Lower clip range of the policy ratio (1 - eps_low)."""
    eps_high: float = 0.2
    """Upper clip range of the policy ratio (1 + eps_high)."""
    cliprange_value: float = 0.2
    """Clip the new values to V_old +- this in the value loss; 0 disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    ppo_epochs: int = 1
    """Optimisation passes over each batch of rollouts."""
    minibatches: int = 1
    """Optimiser steps per pass: the batch's prompts are split in this many minibatches."""
    loss_aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """Token aggregation of the policy and value losses (token_mean: a mean over all tokens)."""
    critic: Literal["head", "model"] = "head"
    """head: a linear value head on the policy's trunk (one forward serves both); model: a
    separate critic, a trainable copy of the starting policy with its own value head."""
    critic_lr: float | None = None
    """Learning rate of the critic's parameters; null uses optim.lr."""
    critic_warmup_steps: int = 0
    """Rollout steps at the start that train the critic alone, the policy frozen (OpenRLHF's
    freezing_actor_steps): the first advantages then come from a critic that has seen returns."""
    value_head_detach: bool = False
    """With critic: head, stop the value loss at the value head: the shared trunk learns from
    the policy loss alone (the trunk's features still serve the head)."""

    def __post_init__(self) -> None:
        require(self.group_size >= 1, "group_size", self.group_size, "an integer >= 1")
        require(
            self.kl_ctl >= 0 and math.isfinite(self.kl_ctl), "kl_ctl", self.kl_ctl, "a finite number >= 0"
        )
        require(
            self.kl_estimator in KL_ESTIMATORS,
            "kl_estimator",
            self.kl_estimator,
            f"one of {', '.join(KL_ESTIMATORS)}",
        )
        require(self.target_kl > 0, "target_kl", self.target_kl, "a number > 0")
        require(self.kl_horizon >= 1, "kl_horizon", self.kl_horizon, "an integer >= 1")
        require(0.0 <= self.gamma <= 1.0, "gamma", self.gamma, "a number in [0, 1]")
        require(0.0 <= self.lam <= 1.0, "lam", self.lam, "a number in [0, 1]")
        require(0.0 < self.eps_low < 1.0, "eps_low", self.eps_low, "a number in (0, 1)")
        require(
            0.0 < self.eps_high and math.isfinite(self.eps_high), "eps_high", self.eps_high, "a number > 0"
        )
        require(
            self.cliprange_value >= 0, "cliprange_value", self.cliprange_value, "a number >= 0 (0 disables)"
        )
        require(self.vf_coef >= 0, "vf_coef", self.vf_coef, "a number >= 0")
        require(self.ppo_epochs >= 1, "ppo_epochs", self.ppo_epochs, "an integer >= 1")
        require(self.minibatches >= 1, "minibatches", self.minibatches, "an integer >= 1")
        require(
            self.loss_aggregation in AGGREGATIONS,
            "loss_aggregation",
            self.loss_aggregation,
            f"one of {', '.join(AGGREGATIONS)}",
        )
        require(self.critic in ("head", "model"), "critic", self.critic, "'head' or 'model'")
        require(
            self.critic_lr is None or self.critic_lr > 0, "critic_lr", self.critic_lr, "a number > 0 or null"
        )
        require(
            self.critic_warmup_steps >= 0, "critic_warmup_steps", self.critic_warmup_steps, "an integer >= 0"
        )


class ValueHead(nn.Module):
    """``V(s_t)`` from the last hidden state: one linear layer, zero-initialised so the first
    values are 0 and the first advantages are the (KL-shaped) rewards themselves."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


@ALGORITHMS.register("ppo")
class PPO(Algorithm):
    """Proximal Policy Optimization: critic + GAE, KL to the reference in the reward."""

    Config = PPOConfig
    config: PPOConfig

    def __init__(self, config: PPOConfig) -> None:
        super().__init__(config)
        self.kl_coef = config.kl_ctl
        self.value_head: ValueHead | None = None
        self.critic_model: nn.Module | None = None

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def needs_reference(self) -> bool:
        return True

    @property
    def needs_scores(self) -> bool:
        return True  # the KL in the reward, GAE and value clipping read pi_old and V_old

    @property
    def needs_hidden_states(self) -> bool:
        return self.config.critic == "head"

    @property
    def passes_per_batch(self) -> int:
        return self.config.ppo_epochs

    @property
    def minibatches_per_pass(self) -> int:
        return self.config.minibatches

    @property
    def module_lr(self) -> float | None:
        return self.config.critic_lr

    @property
    def modules_name(self) -> str:
        return "value"  # train/value_grad_norm: the critic's gradient, apart from the policy's

    def trains_policy(self, rollout_step: int) -> bool:
        return rollout_step >= self.config.critic_warmup_steps

    def build_modules(self, policy: nn.Module) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {}
        if self.config.critic == "model":
            critic = copy.deepcopy(policy)
            # the critic's LM head is never used for its logits: no gradient, nothing to sync
            output_head(critic).requires_grad_(False)
            modules["critic"] = self.critic_model = critic
        self.value_head = ValueHead(hidden_size(policy))
        modules["value_head"] = self.value_head
        return modules

    def values(self, batch: RolloutBatch, hidden: Tensor | None) -> Tensor:
        """``V(s_t)`` for every completion position, ``[B, T]``."""
        assert self.value_head is not None, "build_modules was not called"
        if self.critic_model is not None:
            hidden = batch_forward(self.critic_model, batch, 1.0, with_hidden=True).hidden
        elif hidden is None:
            raise ValueError("PPO with a value head needs the policy's hidden states")
        elif self.config.value_head_detach:
            hidden = hidden.detach()
        return self.value_head(hidden)

    def score(self, batch: RolloutBatch, hidden: Tensor | None) -> RolloutBatch:
        return dataclasses.replace(batch, old_values=self.values(batch, hidden).detach())

    def prepare(self, batch: RolloutBatch, all_reduce_sum: AllReduceSum = single_process) -> RolloutBatch:
        """KL-shaped token rewards -> GAE advantages and returns -> whitening (global)."""
        cfg = self.config
        if batch.old_logprobs is None or batch.ref_logprobs is None or batch.old_values is None:
            raise ValueError("PPO.prepare needs old_logprobs, ref_logprobs and old_values (the scoring pass)")
        mask = batch.completion_mask
        token_rewards, _ = kl_shaped_rewards(
            batch.rewards, batch.old_logprobs, batch.ref_logprobs, mask, self.kl_coef, cfg.kl_estimator
        )
        advantages, returns = gae(token_rewards, batch.old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask, all_reduce_sum=all_reduce_sum)
        return dataclasses.replace(batch, advantages=advantages, returns=returns)

    def loss(
        self, logprobs: Tensor, batch: RolloutBatch, scale: LossScale, hidden: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss + vf_coef * clipped value loss, minimised together.

        Logged apart, so PPO reads like every other algorithm: ``loss`` is the policy's share
        alone, ``value_loss`` the critic's (unweighted)."""
        cfg = self.config
        if batch.returns is None or batch.old_values is None or batch.ref_logprobs is None:
            raise ValueError("PPO.loss needs returns, old_values and ref_logprobs; call prepare first")
        mask = batch.completion_mask
        policy_loss, metrics = clipped_policy_loss(
            logprobs, batch, scale, cfg.eps_low, cfg.eps_high, cfg.loss_aggregation
        )
        values = self.values(batch, hidden)
        per_token, value_clipped = clipped_value_loss(
            values, batch.old_values, batch.returns, cfg.cliprange_value or None
        )
        value_loss = aggregate(per_token, mask, cfg.loss_aggregation, scale)
        loss = policy_loss + cfg.vf_coef * value_loss
        kl = kl_estimate(cfg.kl_estimator, logprobs.detach(), batch.ref_logprobs)
        metrics.update(
            loss=policy_loss.detach(),
            value_loss=value_loss.detach(),
            value_clip_frac=masked_mean(value_clipped.to(mask.dtype), mask).detach(),
            # V_old: the critic's values before it saw this batch, so the figure is a prediction
            # on fresh states, not the fit that several epochs over the same batch reach
            value_explained_var=explained_variance(batch.old_values, batch.returns, mask),
            values_mean=masked_mean(values.detach(), mask),
            returns_mean=masked_mean(batch.returns, mask),
            kl=masked_mean(torch.where(mask.bool(), kl, torch.zeros_like(kl)), mask),
        )
        return loss, metrics

    def end_step(self, metrics: dict[str, float], num_samples: int) -> dict[str, float]:
        """The adaptive controller's update from the step's measured per-token KL."""
        cfg = self.config
        if cfg.adaptive_kl and "train/kl" in metrics and math.isfinite(metrics["train/kl"]):
            error = min(max(metrics["train/kl"] / cfg.target_kl - 1.0, -0.2), 0.2)
            self.kl_coef *= 1.0 + error * num_samples / cfg.kl_horizon
        return {"train/kl_coef": self.kl_coef}

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_coef = float(state.get("kl_coef", self.config.kl_ctl))
