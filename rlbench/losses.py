"""Token aggregation and the clipped policy surrogate, shared by every policy-gradient loss.

Aggregation modes (THEORY section 1), ``L_{i,t}`` the per-token objective, ``|o_i|`` the
number of unmasked tokens of completion ``i``, ``G`` the number of completions::

    seq_mean_token_mean      1/G sum_i 1/|o_i| sum_t L_{i,t}       (original GRPO)
    token_mean               sum_i sum_t L_{i,t} / sum_i |o_i|     (DAPO)
    seq_mean_token_sum_norm  1/G sum_i sum_t L_{i,t} / L_max       (Dr. GRPO)

The outer denominators (``G``, ``sum_i |o_i|``, ``L_max``) come from a ``LossScale`` that
counts the whole step, so the aggregates of a step's micro-batches add up to the aggregate
of the whole batch.

The critic side of PPO (THEORY sections 3 and 9)::

    whiten                (x - mean) / sqrt(var + eps) over the unmasked entries of all processes
    clipped_value_loss    0.5 * max((V - ret)^2, (clip(V, V_old - c, V_old + c) - ret)^2)
    explained_variance    1 - Var[ret - V] / Var[ret]
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlbench.algorithm import AllReduceSum, LossScale, RolloutBatch
from rlbench.estimators import kl_estimate

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


def clipped_policy_loss(
    logprobs: Tensor,
    batch: RolloutBatch,
    scale: LossScale,
    eps_low: float,
    eps_high: float,
    aggregation: str,
    beta: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy-gradient loss GRPO, RLOO and PPO share: minus the aggregated clipped surrogate,
    less ``beta`` times the per-token KL to the reference when ``beta > 0`` (KL in the loss)::

        L_{i,t} = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) - beta * KL_{i,t}

    ``batch.advantages`` are ``[B]`` or ``[B, T]``; pi_old is ``batch.old_logprobs``, or the
    detached current log-probs (a single pass: ratio 1, its gradient still flows). Returns the
    loss and the metrics every algorithm logs under the same names: ``loss``, ``clip_frac``,
    ``ratio_min``, ``ratio_max``, ``advantage_abs_mean`` (mean ``|A|`` over completion tokens)
    and, with a KL term, ``kl``.
    """
    if batch.advantages is None:
        raise ValueError("the policy loss needs batch.advantages; call algorithm.prepare(batch) first")
    mask = batch.completion_mask
    old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
    objective, clip_active = clipped_surrogate(logprobs, old, batch.advantages, eps_low, eps_high)
    ratio = torch.exp(logprobs.detach() - old.detach())
    ratio_min, ratio_max = masked_min_max(ratio, mask)
    advantages = batch.advantages if batch.advantages.dim() == 2 else batch.advantages.unsqueeze(-1)
    metrics: dict[str, Tensor] = {
        "clip_frac": masked_mean(clip_active.to(mask.dtype), mask).detach(),
        "ratio_min": ratio_min,
        "ratio_max": ratio_max,
        "advantage_abs_mean": masked_mean(advantages.abs().expand_as(mask), mask).detach(),
    }
    if beta > 0.0:
        if batch.ref_logprobs is None:
            raise ValueError("a KL penalty (beta > 0) needs batch.ref_logprobs (the reference's log-probs)")
        kl = kl_estimate(kl_estimator, logprobs, batch.ref_logprobs)
        objective = objective - beta * kl
        metrics["kl"] = masked_mean(kl, mask).detach()
    loss = -aggregate(objective, mask, aggregation, scale)
    metrics["loss"] = loss.detach()
    return loss, metrics


def whiten(
    values: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    all_reduce_sum: AllReduceSum | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Masked whitening ``(x - mean) / sqrt(var + eps)`` over the unmasked entries, 0 where masked.

    ``mean`` and the population ``var`` are global over every data-parallel process: the local
    sums ``[sum(x * m), sum(x^2 * m), sum(m)]`` go through ``all_reduce_sum`` (None: a single
    process) before ``mean = S1 / N`` and ``var = S2 / N - mean^2`` are taken. Whitening each
    process's share on its own would make the advantages, and so the run, depend on the number
    of processes. ``shift_mean=False`` adds the mean back (rescales only), as TRL's and
    OpenRLHF's ``masked_whiten``.

    The statistics are constants (no gradient flows through them); the sums are float64 so
    ``S2 / N - mean^2`` does not cancel to noise, and go out as one tensor so a step costs a
    single collective.
    """
    keep = mask.bool()
    x = torch.where(keep, values.detach(), torch.zeros((), dtype=values.dtype, device=values.device))
    x64 = x.to(torch.float64)
    sums = torch.stack([x64.sum(), x64.square().sum(), keep.sum().to(torch.float64)])
    if all_reduce_sum is not None:
        sums = all_reduce_sum(sums)
    # No unmasked entry anywhere: every output is masked, so any finite mean will do.
    count = sums[2].clamp(min=1.0)
    mean = sums[0] / count
    # Rounding can leave a constant batch's variance a hair below 0.
    var = (sums[1] / count - mean.square()).clamp(min=0.0)
    whitened = (values.to(torch.float64) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    whitened = whitened.to(values.dtype)
    return torch.where(keep, whitened, torch.zeros_like(whitened))


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float | None
) -> tuple[Tensor, Tensor]:
    """PPO's value loss per token and where its clip is active, ``(loss [B, T], clip_active [B, T])``.

    ``loss = 0.5 * max((V - ret)^2, (clip(V, V_old - c, V_old + c) - ret)^2)`` with
    ``c = clip_range``; with ``clip_range`` None or 0 it is ``0.5 * (V - ret)^2``. The bool tensor
    marks tokens where the clipped term is the larger one and differs from the unclipped term:
    there ``V`` has left ``V_old +- c`` and the loss's gradient with respect to ``V`` is 0.
    Reducing over tokens is the caller's job (``aggregate`` or ``masked_mean``).
    """
    if clip_range is not None and clip_range < 0:
        raise ValueError(f"clip_range must be None or >= 0, got {clip_range}")
    unclipped = (values - returns).square()
    if not clip_range:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (clipped_values - returns).square()
    clip_active = clipped > unclipped
    # torch.where, not torch.maximum, so a tie sends the whole gradient through the unclipped term.
    return 0.5 * torch.where(clip_active, clipped, unclipped), clip_active


#: ``explained_variance`` reports 0 when the returns' variance is at most this: their spread
#: (a std under 1e-6) is then rounding, and the ratio would be noise over noise.
EXPLAINED_VARIANCE_MIN_RETURN_VAR = 1e-12


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the returns' variance the critic explains, ``1 - Var[ret - V] / Var[ret]``.

    Over the entries where ``mask`` is 1 (population variances; the correction would cancel).
    1: perfect; 0: no better than predicting the mean; negative: worse than that. When
    ``Var[ret] <= EXPLAINED_VARIANCE_MIN_RETURN_VAR`` (constant returns, or no unmasked entry)
    the ratio is undefined; it is reported as 0, not NaN, so it cannot poison a logged mean.
    A diagnostic over this process's tokens: a scalar float tensor with no gradient.
    """
    keep = mask.bool()
    ret = returns.detach().to(torch.float64)
    residual = ret - values.detach().to(torch.float64)
    count = keep.sum().clamp(min=1)

    def masked_var(x: Tensor) -> Tensor:
        # Two passes (centre, then square) stay accurate where E[x^2] - E[x]^2 would cancel.
        x = torch.where(keep, x, torch.zeros_like(x))
        centred = torch.where(keep, x - x.sum() / count, torch.zeros_like(x))
        return centred.square().sum() / count

    var_ret = masked_var(ret)
    var_residual = masked_var(residual)
    defined = var_ret > EXPLAINED_VARIANCE_MIN_RETURN_VAR
    ratio = var_residual / var_ret.clamp(min=EXPLAINED_VARIANCE_MIN_RETURN_VAR)
    return torch.where(defined, 1.0 - ratio, torch.zeros_like(ratio)).to(torch.float32)
