"""RLOO: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740).

Sample ``G >= 2`` completions ``o_1..o_G`` of each prompt from ``pi_old``. The default
``form: sequence`` is the published algorithm, as TRL's ``RLOOTrainer`` runs it: a whole
completion is one action. The KL to the reference is folded into each completion's reward
(k1 by default, from pi_old's log-probs: a constant of the step), and each completion's baseline is the
mean of the *other* ``G - 1`` shaped rewards, unbiased and with no critic::

    R_i = r_i - beta * sum_t KL_{i,t}         KL_{i,t} = log pi_old(o_{i,t} | .) - log pi_ref(o_{i,t} | .)
    A_i = R_i - 1/(G-1) * sum_{j != i} R_j

With one pass over the batch (``mu = 1``) the loss is REINFORCE on the sequence log-prob,
averaged over the step's ``N`` completions (TRL's normalisation: a mean over completions, not
divided by their lengths, so ``dL / d log pi_theta(o_{i,t}) = -A_i / N`` for every token)::

    log pi_theta(o_i) = sum_t log pi_theta(o_{i,t} | q, o_{i,<t})
    L = -1/N * sum_i A_i * log pi_theta(o_i)
    grad L = -1/N * sum_i A_i * grad log pi_theta(o_i)

With ``mu > 1`` the later passes are off-policy, so the sequence ratio is clipped, as PPO::

    rho_i = pi_theta(o_i) / pi_old(o_i) = exp(sum_t log pi_theta(o_{i,t}) - log pi_old(o_{i,t}))
    L = -1/N * sum_i min(rho_i * A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) * A_i)

(at pass 0, ``rho = 1`` and the gradient is REINFORCE's). ``N`` counts the whole step, so the
losses of a step's micro-batches add up to the whole batch's.

``form: token`` is the token-level variant: every token of ``o_i`` gets ``A_i`` and the loss
is GRPO's clipped surrogate per token (``rlbench.losses.clipped_policy_loss``), aggregated by
``loss_aggregation``. Its KL goes in the loss (``kl_in: loss``, the default there: a per-token
penalty ``- beta * KL_{i,t}``, as GRPO) or in the reward as above (``kl_in: reward``). With the
KL in the loss and ``seq_mean_token_mean`` it equals GRPO with ``scale_rewards: false`` times
``G / (G - 1)``.

The KL estimator defaults to where the KL goes: k1 in a reward (only its value counts there,
and k1's is unbiased), k3 in the loss (GRPO's). In the loss only the gradient counts and k1's
is zero in expectation, so k1 is refused there (docs/kl_estimators.md).

This file is the whole algorithm: it plugs into the core through the ``Algorithm`` contract
alone, with no change to ``rlbench/``.
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
from rlbench.estimators import (
    K1_IN_LOSS,
    KL_ESTIMATORS,
    kl_estimate,
    kl_shaped_rewards,
    leave_one_out_advantages,
)
from rlbench.losses import AGGREGATIONS, clipped_policy_loss, clipped_surrogate, masked_mean, masked_min_max
from rlbench.registry import ALGORITHMS


@dataclass
class RLOOConfig:
    """Options of RLOO (``algorithm.rloo``)."""

    group_size: int = 8
    """Completions sampled per prompt (>= 2: each one's baseline is the mean of the others)."""
    beta: float = 0.04
    """KL coefficient to the reference; 0 loads no reference model."""
    form: Literal["sequence", "token"] = "sequence"
    """sequence: the published RLOO, REINFORCE on each completion's log-prob with the KL in the
    reward (clipped sequence ratio only with mu > 1); token: GRPO's clipped per-token surrogate
    with leave-one-out advantages."""
    kl_in: Literal["loss", "reward"] | None = None
    """Where the KL goes: reward (subtracted from each completion's reward before the baseline)
    or loss (a per-token penalty, as GRPO; form: token only). Unset: reward with form: sequence,
    loss with form: token."""
    kl_estimator: Literal["k1", "k2", "k3", "k1+", "k3+"] | None = None
    """Per-token KL estimator. Unset: k1 in the reward (unbiased value), k3 in the loss. k1 is
    refused in the loss: its expected gradient is 0 (docs/kl_estimators.md)."""
    eps_low: float = 0.2
    """Lower clip range of the policy ratio (1 - eps_low): per token with form: token, per
    completion with form: sequence and mu > 1."""
    eps_high: float = 0.2
    """Upper clip range of the policy ratio (1 + eps_high), as eps_low."""
    mu: int = 1
    """Optimisation passes over each batch of rollouts (form: sequence clips its ratio only when > 1)."""
    loss_aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = (
        "seq_mean_token_mean"
    )
    """Token aggregation of the loss with form: token (as GRPO's option); form: sequence sums
    each completion's tokens and averages over completions."""

    def __post_init__(self) -> None:
        require(self.group_size >= 2, "group_size", self.group_size, "an integer >= 2 (one to leave out)")
        require(self.beta >= 0 and math.isfinite(self.beta), "beta", self.beta, "a finite number >= 0")
        require(self.form in ("sequence", "token"), "form", self.form, "'sequence' or 'token'")
        require(self.kl_in in ("loss", "reward", None), "kl_in", self.kl_in, "'loss', 'reward' or unset")
        require(
            not (self.form == "sequence" and self.kl_in == "loss"),
            "kl_in",
            self.kl_in,
            "the sequence form folds the KL into each completion's reward (as the RLOO paper); "
            "a per-token KL in the loss needs form: token",
        )
        # Resolved here, so what a run logs as its parameters is what it ran.
        if self.kl_in is None:
            self.kl_in = "reward" if self.form == "sequence" else "loss"
        if self.kl_estimator is None:
            self.kl_estimator = "k1" if self.kl_in == "reward" else "k3"
        require(
            self.kl_estimator in KL_ESTIMATORS,
            "kl_estimator",
            self.kl_estimator,
            f"one of {', '.join(KL_ESTIMATORS)}",
        )
        require(
            not (self.beta > 0 and self.kl_in == "loss" and self.kl_estimator == "k1"),
            "kl_estimator",
            self.kl_estimator,
            K1_IN_LOSS,
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


def sequence_policy_loss(
    logprobs: Tensor,
    batch: RolloutBatch,
    scale: LossScale,
    clip: bool = False,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO's sequence-level loss of a micro-batch, and its metrics (module docstring).

    ``batch.advantages`` are ``[B]``, one per completion. Without ``clip``: REINFORCE,
    ``-1/N sum_i A_i log pi_theta(o_i)``. With ``clip``: ``-1/N sum_i min(rho_i A_i,
    clip(rho_i) A_i)`` on the sequence ratio ``rho_i``, pi_old being ``batch.old_logprobs`` (or
    the detached current log-probs: pass 0, ratio 1), plus ``clip_frac`` (the share of
    completion tokens whose completion is clipped: they get no gradient) and the sequence
    ratio's ``ratio_min`` and ``ratio_max``. ``N`` is ``scale.num_sequences``, the step's count.
    """
    if batch.advantages is None:
        raise ValueError("the policy loss needs batch.advantages; call algorithm.prepare(batch) first")
    if batch.advantages.dim() != 1:
        raise ValueError(
            f"the sequence form needs one advantage per completion, got {tuple(batch.advantages.shape)}"
        )
    mask = batch.completion_mask
    keep = mask.bool()
    # where, not a product: a padding log-prob may be -inf, and -inf * 0 is NaN
    sequence_logp = torch.where(keep, logprobs, torch.zeros_like(logprobs)).sum(-1)
    advantages = batch.advantages.to(sequence_logp.dtype)
    metrics: dict[str, Tensor] = {
        "advantage_abs_mean": masked_mean(advantages.abs().unsqueeze(-1).expand_as(mask), mask).detach()
    }
    if not clip:
        objective = advantages * sequence_logp
    else:
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        old_sequence_logp = torch.where(keep, old, torch.zeros_like(old)).sum(-1).detach()
        objective, clip_active = clipped_surrogate(
            sequence_logp, old_sequence_logp, advantages, eps_low, eps_high
        )
        ratio = torch.exp(sequence_logp.detach() - old_sequence_logp)
        has_tokens = keep.any(-1)
        ratio_min, ratio_max = masked_min_max(ratio, has_tokens)
        clipped_tokens = clip_active.unsqueeze(-1).to(mask.dtype).expand_as(mask)
        metrics |= {
            "clip_frac": masked_mean(clipped_tokens, mask).detach(),
            "ratio_min": ratio_min,
            "ratio_max": ratio_max,
        }
    loss = -objective.sum() / scale.num_sequences
    metrics["loss"] = loss.detach()
    return loss, metrics


@ALGORITHMS.register("rloo")
class RLOO(Algorithm):
    """REINFORCE Leave-One-Out: REINFORCE on each completion, the others' mean reward its baseline."""

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
            assert cfg.kl_estimator is not None  # resolved by the config
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
        assert cfg.kl_estimator is not None  # resolved by the config
        if cfg.form == "sequence":
            # with one pass the ratio is 1: no clip applies, and none is logged
            loss, metrics = sequence_policy_loss(
                logprobs, batch, scale, cfg.mu > 1, cfg.eps_low, cfg.eps_high
            )
        else:
            beta = cfg.beta if cfg.kl_in == "loss" else 0.0
            loss, metrics = clipped_policy_loss(
                logprobs,
                batch,
                scale,
                cfg.eps_low,
                cfg.eps_high,
                cfg.loss_aggregation,
                beta,
                cfg.kl_estimator,
            )
        if "kl" not in metrics and batch.ref_logprobs is not None:  # KL in the reward: still logged
            # the reward's own KL: pi_old's (the current policy's on a pass without scores)
            policy = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
            kl = kl_estimate(cfg.kl_estimator, policy, batch.ref_logprobs)
            metrics["kl"] = masked_mean(kl, batch.completion_mask)
        return loss, metrics
