"""Token aggregation and the clipped policy surrogate, shared by every policy-gradient loss.

Aggregation modes (THEORY section 1), ``L_{i,t}`` the per-token objective, ``|o_i|`` the
number of unmasked tokens of completion ``i``, ``G`` the number of completions::

    seq_mean_token_mean      1/G sum_i 1/|o_i| sum_t L_{i,t}       (original GRPO)
    token_mean               sum_i sum_t L_{i,t} / sum_i |o_i|     (DAPO)
    seq_mean_token_sum_norm  1/G sum_i sum_t L_{i,t} / L_max       (Dr. GRPO)

The outer denominators (``G``, ``sum_i |o_i|``, ``L_max``) come from a ``LossScale`` that
counts the whole step, so the aggregates of a step's micro-batches add up to the aggregate
of the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlbench.algorithm import LossScale

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def aggregate(values: Tensor, mask: Tensor, mode: str, scale: LossScale) -> Tensor:
    """Reduce per-token ``values [B, T]`` over the tokens where ``mask [B, T]`` is 1 to a scalar."""
    masked = values * mask
    if mode == "seq_mean_token_mean":
        # A completion with no tokens contributes 0 rather than 0/0.
        lengths = mask.sum(dim=-1).clamp(min=1)
        return (masked.sum(dim=-1) / lengths).sum() / scale.num_sequences
    if mode == "token_mean":
        return masked.sum() / scale.num_tokens
    if mode == "seq_mean_token_sum_norm":
        return masked.sum() / (scale.num_sequences * scale.max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid modes: {', '.join(AGGREGATIONS)}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over all tokens where ``mask`` is 1 (0 when there are none)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_min_max(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max of ``values`` over the tokens where ``mask`` is 1 (both 0 when there are none)."""
    selected = values[mask.bool()]
    if selected.numel() == 0:
        zero = values.new_zeros(())
        return zero, zero
    return selected.min(), selected.max()


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token, to be maximised, and where its clip is active.

    ``objective = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`` with
    ``rho = exp(logp - old_logp)``. ``advantages`` is ``[B]`` (one per completion, broadcast over
    its tokens) or ``[B, T]``. The returned bool tensor marks tokens where the clipped term is
    the smaller one and differs from the unclipped term (``A > 0, rho > 1 + eps_high`` or
    ``A < 0, rho < 1 - eps_low``): there the objective's gradient with respect to ``logp`` is 0.
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    clip_active = clipped < unclipped
    # torch.where, not torch.minimum, so a tie sends the whole gradient through the unclipped term.
    return torch.where(clip_active, clipped, unclipped), clip_active
