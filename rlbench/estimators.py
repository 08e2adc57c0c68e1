"""KL and advantage estimators shared by every algorithm (THEORY sections 1, 2 and 9).

KL estimators work per token from the sampled token's log-probabilities only. With
``x ~ q`` (the policy) and ``r = p(x) / q(x)`` (``p`` = the reference)::

    k1 = -log r               unbiased, high variance, can be negative
    k2 = 0.5 * (log r)^2      biased, low variance, never negative
    k3 = r - 1 - log r        unbiased (E_q[r] = 1), never negative, low variance
    k1+ = k1 in value, k2's gradient:   k1 + (k2 - stop_grad(k2))
    k3+ = k3 in value, k2's gradient:   k3 + (k2 - stop_grad(k2))

In a reward only the value counts. In a loss the gradient counts, and with the sample held fixed
(what a loss differentiates) the expected gradients are, from ``grad log r = -grad log q``::

    E_q[grad k1] = E_q[grad log q]                    = 0                   (noise only)
    E_q[grad k2] = E_q[(log q - log p) grad log q]    = grad KL(q || p)
    E_q[grad k3] = E_q[(1 - p/q) grad log q]          = grad KL(p || q)     (the forward KL)

so k1+ and k3+ report an unbiased KL(q || p) and descend it. docs/kl_estimators.md has the table.

Advantage estimators map a step's rewards ``[P, G]`` (``P`` prompts, ``G`` completions each)
to one advantage per completion, given to every one of its tokens.

PPO's critic side (THEORY sections 3 and 9) works per token: ``kl_shaped_rewards`` puts the
KL penalty into the reward (``R_t = -kl_coef * KL_t``, plus the outcome reward on the last
token) and ``gae`` turns those rewards and the critic's values into advantages and returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

#: ``log r`` is clamped to this range before ``exp`` in k3, so a token the reference all but
#: rules out (``log r`` of -1e4, say) cannot overflow to inf; beyond it k3's gradient is zero.
K3_LOG_RATIO_CLAMP = 20.0


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``log r = log p_ref(x) - log q(x)`` per token."""
    return ref_logp - logp


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``k1 = -log r``: unbiased estimate of KL(q || p_ref), can be negative."""
    return -_log_ratio(logp, ref_logp)


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``k2 = 0.5 * (log r)^2``: biased, low variance, never negative."""
    return 0.5 * _log_ratio(logp, ref_logp).square()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``k3 = r - 1 - log r``: unbiased, never negative (GRPO's default).

    ``log r`` is clamped to ``[-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP]`` before use, so ``exp``
    stays finite; the clamped value is used in both terms, which keeps ``k3 >= 0``.
    """
    log_r = _log_ratio(logp, ref_logp).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return torch.exp(log_r) - 1.0 - log_r


def _with_k2_gradient(value: Tensor, log_r: Tensor) -> Tensor:
    """``value`` in the forward pass, the gradient of ``k2 = 0.5 * log_r^2`` in the backward pass.

    ``k2 - k2.detach()`` is exactly 0 in value (x - x is 0 in floating point) yet carries k2's
    gradient, so the result equals ``value`` and differentiates as k2 (a straight-through sum).
    """
    k2 = 0.5 * log_r.square()
    return value.detach() + (k2 - k2.detach())


def kl_k1_plus(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``k1+``: k1's value (unbiased KL(q || p_ref)) with k2's gradient, for a loss."""
    return _with_k2_gradient(kl_k1(logp, ref_logp), _log_ratio(logp, ref_logp))


def kl_k3_plus(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``k3+``: k3's value (unbiased, never negative) with k2's gradient, for a loss.

    k2's ``log r`` is clamped as k3's is, so k3+ is finite wherever k3 is and, like k3, has no
    gradient beyond ``K3_LOG_RATIO_CLAMP``.
    """
    log_r = _log_ratio(logp, ref_logp).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return _with_k2_gradient(kl_k3(logp, ref_logp), log_r)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "k1+": kl_k1_plus,
    "k3+": kl_k3_plus,
}

#: Why k1 is refused wherever the KL is in the loss, and what to use instead.
K1_IN_LOSS = (
    "with the KL in the loss, k1's expected gradient is zero (E_pi[grad log pi] = 0): it adds noise and "
    "no pull towards the reference. Use k2, k1+ or k3+ (gradient of KL(pi || ref); k1+ and k3+ also "
    "report an unbiased value), or k3 (gradient of the forward KL(ref || pi)); see docs/kl_estimators.md"
)


def kl_estimate(name: str, logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(policy || reference) by the estimator ``name`` (``k1``, ``k2``, ``k3``,
    ``k1+`` or ``k3+``): ``logp`` the policy's log-probs of the sampled tokens, ``ref_logp``
    the reference's."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; valid estimators: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name](logp, ref_logp)


def exact_kl(logits_q: Tensor, logits_p: Tensor) -> Tensor:
    """Exact KL(q || p) = sum_v q_v (log q_v - log p_v) per position, from logits ``[..., V]``.

    A diagnostic (costs a softmax over the vocabulary). Half-precision logits are promoted to
    float32 so the log-softmax does not lose the small differences the KL is made of.
    """
    dtype = torch.promote_types(logits_q.dtype, torch.float32)
    log_q = torch.log_softmax(logits_q.to(dtype), dim=-1)
    log_p = torch.log_softmax(logits_p.to(dtype), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


def group_advantages(
    rewards: Tensor,
    scale_by_std: bool = True,
    std: Literal["sample", "population"] = "sample",
    eps: float = 1e-4,
) -> Tensor:
    """GRPO's group-normalised advantages ``A_i = (r_i - mean(r)) / (std(r) + eps)``, ``[P, G]``.

    Statistics are taken along the last dimension (each prompt's group). ``scale_by_std=False``
    gives ``r_i - mean(r)`` (Dr. GRPO). ``std="sample"`` divides by ``G - 1`` (``torch.std``, as
    TRL and verl); ``"population"`` by ``G``. The sample std of a single completion is undefined;
    with ``G = 1`` it is taken as 0, and since ``r - mean = 0`` the advantages are 0, not NaN.
    """
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale_by_std:
        return centred
    if std not in ("sample", "population"):
        raise ValueError(f"unknown std {std!r}; valid: 'sample', 'population'")
    group_size = rewards.shape[-1]
    if std == "sample" and group_size < 2:
        spread = torch.zeros_like(centred)
    else:
        correction = 1 if std == "sample" else 0
        spread = rewards.std(dim=-1, correction=correction, keepdim=True)
    return centred / (spread + eps)


def process_advantages(
    step_rewards: Tensor,
    step_ends: Tensor,
    group_size: int,
    scale_by_std: bool = True,
    std: Literal["sample", "population"] = "sample",
    eps: float = 1e-4,
) -> Tensor:
    """PRM advantages (process supervision), ``[B, T]``.

    ``step_rewards[i, t]`` is the reward of the step of completion ``i`` that ends at token
    ``t`` where ``step_ends[i, t] = 1`` (0 elsewhere); rows ``g*G .. g*G+G-1`` form a group.
    Every step reward is normalised by the mean and std of all step rewards of its group,
    ``r~ = (r - mean(R)) / (std(R) + eps)``, and a token's advantage is the sum of the
    normalised rewards of the steps ending at or after it::

        A_{i,t} = sum_{j : index(j) >= t} r~_i^{index(j)}

    ``scale_by_std=False`` only centres (Dr. GRPO). Tokens after a completion's last step get
    0; a group without steps gets 0 everywhere.
    """
    ends = step_ends.to(step_rewards.dtype)
    rows, width = step_rewards.shape
    grouped_r = (step_rewards * ends).view(-1, group_size * width)
    grouped_e = ends.view(-1, group_size * width)
    count = grouped_e.sum(-1, keepdim=True)
    mean = grouped_r.sum(-1, keepdim=True) / count.clamp(min=1)
    centred = (grouped_r - mean) * grouped_e
    if scale_by_std:
        correction = 1 if std == "sample" else 0
        var = (centred**2).sum(-1, keepdim=True) / (count - correction).clamp(min=1)
        centred = centred / (var.sqrt() + eps)
    normalised = centred.view(rows, width)
    # sum over steps ending at or after t: a reversed cumulative sum along the tokens
    return normalised.flip(-1).cumsum(-1).flip(-1)


def leave_one_out_advantages(rewards: Tensor) -> Tensor:
    """RLOO advantages ``A_i = r_i - 1/(G-1) sum_{j != i} r_j`` along the last dimension.

    Needs ``G >= 2`` (with one completion there is nothing to leave out).
    """
    group_size = rewards.shape[-1]
    if group_size < 2:
        raise ValueError(f"leave-one-out advantages need group_size >= 2, got {group_size}")
    others_mean = (rewards.sum(dim=-1, keepdim=True) - rewards) / (group_size - 1)
    return rewards - others_mean


def kl_shaped_rewards(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """PPO's per-token reward with the KL penalty inside it (THEORY section 3), ``(token_rewards, kl)``.

    ``R_t = -kl_coef * KL_t`` on every unmasked token, ``+ rewards[b]`` on row ``b``'s last
    unmasked token, where ``KL_t`` is ``kl_estimate(estimator, logprobs, ref_logprobs)`` (k1 by
    default). ``rewards`` is ``[B]``; the other tensors and both results are ``[B, T]``, 0 where
    ``mask`` is 0. A row with no unmasked token gets no reward at all.

    The reward is data for GAE, not a differentiable quantity: the log-probs are detached.
    """
    if not logprobs.shape == ref_logprobs.shape == mask.shape or logprobs.dim() != 2:
        raise ValueError(
            "kl_shaped_rewards needs logprobs, ref_logprobs and mask of one shape [B, T], got "
            f"{tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)} and {tuple(mask.shape)}"
        )
    if rewards.shape != logprobs.shape[:1]:
        raise ValueError(f"rewards must be [B] = {tuple(logprobs.shape[:1])}, got {tuple(rewards.shape)}")
    keep = mask.bool()
    kl = kl_estimate(estimator, logprobs.detach(), ref_logprobs.detach())
    # where, not a product: padding log-probs may be -inf, and -inf * 0 is NaN.
    kl = torch.where(keep, kl, torch.zeros_like(kl))
    dtype = torch.promote_types(kl.dtype, rewards.dtype)
    token_rewards = (-kl_coef * kl).to(dtype)
    # Index of each row's last unmasked token: the largest 1-based position that is kept
    # (argmax of an all-zero row is 0, which the has_token factor below then cancels).
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    last = (keep * positions).argmax(dim=-1, keepdim=True)
    has_token = keep.any(dim=-1)
    outcome = torch.where(has_token, rewards.detach().to(dtype), torch.zeros((), dtype=dtype))
    token_rewards = token_rewards.scatter_add(1, last, outcome.unsqueeze(-1))
    return token_rewards, kl


def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (THEORY section 9), ``(advantages, returns)``, all ``[B, T]``.

    ``delta_t = R_t + gamma * V(s_{t+1}) - V(s_t)``, with ``V(s_{T+1}) = 0`` after a
    completion's last unmasked token ``T``; ``A_t = sum_{l >= 0} (gamma * lam)^l delta_{t+l}``
    over the completion's unmasked tokens; ``returns_t = A_t + V(s_t)``. Computed backwards as
    ``A_t = delta_t + gamma * lam * A_{t+1}``. Unwhitened; both outputs are 0 where ``mask`` is 0.

    The mask is 1 up to and including EOS, then 0. Rewards and values at masked positions are
    ignored (whatever the critic outputs on padding is never bootstrapped from). Advantages
    and returns are regression targets, not part of any graph: the inputs are detached.
    """
    if not token_rewards.shape == values.shape == mask.shape or values.dim() != 2:
        raise ValueError(
            "gae needs token_rewards, values and mask of one shape [B, T], got "
            f"{tuple(token_rewards.shape)}, {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    # At least float32: a bf16 critic's values would round the small deltas away.
    dtype = torch.promote_types(torch.promote_types(token_rewards.dtype, values.dtype), torch.float32)
    keep = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=values.device)
    rewards = torch.where(keep, token_rewards.detach().to(dtype), zero)
    # Zeroing the padding's values is what makes V(s_{T+1}) = 0 after the last kept token.
    vals = torch.where(keep, values.detach().to(dtype), zero)
    keep_f = keep.to(dtype)
    advantages = torch.zeros_like(vals)
    next_value = torch.zeros_like(vals[:, 0])
    next_advantage = torch.zeros_like(vals[:, 0])
    for t in reversed(range(vals.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - vals[:, t]
        # The keep factor stops the sum at the padding, so nothing flows in from beyond EOS.
        next_advantage = (delta + gamma * lam * next_advantage) * keep_f[:, t]
        advantages[:, t] = next_advantage
        next_value = vals[:, t]
    returns = torch.where(keep, advantages + vals, zero)
    return advantages, returns
