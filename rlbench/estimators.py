"""KL and advantage estimators shared by every algorithm (THEORY sections 1, 2 and 9).

KL estimators work per token from the sampled token's log-probabilities only. With
``x ~ q`` (the policy) and ``r = p(x) / q(x)`` (``p`` = the reference)::

    k1 = -log r               unbiased, high variance, can be negative
    k2 = 0.5 * (log r)^2      biased, low variance, never negative
    k3 = r - 1 - log r        unbiased (E_q[r] = 1), never negative, low variance

Advantage estimators map a step's rewards ``[P, G]`` (``P`` prompts, ``G`` completions each)
to one advantage per completion, given to every one of its tokens.
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


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(name: str, logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(policy || reference) by the estimator ``name`` (``k1``, ``k2`` or ``k3``)."""
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


def leave_one_out_advantages(rewards: Tensor) -> Tensor:
    """RLOO advantages ``A_i = r_i - 1/(G-1) sum_{j != i} r_j`` along the last dimension.

    Needs ``G >= 2`` (with one completion there is nothing to leave out).
    """
    group_size = rewards.shape[-1]
    if group_size < 2:
        raise ValueError(f"leave-one-out advantages need group_size >= 2, got {group_size}")
    others_mean = (rewards.sum(dim=-1, keepdim=True) - rewards) / (group_size - 1)
    return rewards - others_mean
