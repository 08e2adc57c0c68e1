"""Preference losses on offline pairs: DPO (with label smoothing) and IPO (THEORY sections 4, 9).

A pair is a prompt ``x`` with a chosen completion ``y_w`` and a rejected one ``y_l``. With the
policy ``pi`` and the frozen reference ``pi_ref``, each completion's log-ratio is a sum over its
completion tokens::

    logratio(y) = log pi(y|x) - log pi_ref(y|x) = sum_t log pi(y_t|x, y_<t) - log pi_ref(y|x)

DPO (``loss_type="sigmoid"``), with label smoothing ``s`` (``s = 0`` is plain DPO)::

    h    = logratio(y_w) - logratio(y_l)
    loss = -(1 - s) * log sigmoid(beta * h) - s * log sigmoid(-beta * h)

IPO (``loss_type="ipo"``) averages each log-ratio over its completion's tokens, which keeps
``beta`` comparable across lengths (what TRL implements; the IPO authors confirmed it)::

    h    = logratio(y_w) / |y_w| - logratio(y_l) / |y_l|
    loss = (h - 1 / (2 * beta))^2

The loss of a batch is the mean of the per-pair losses; with ``num_pairs`` (the pair count of
the whole step) it is their sum divided by ``num_pairs``, so a step's micro-batch losses add
up to the loss of the whole batch.

Metrics, each a detached scalar averaged over the pairs of the batch, with the implicit reward
``r(y) = beta * logratio(y)`` (sequence log-ratios, whatever the ``loss_type``):

    reward_accuracy    fraction of pairs with r(y_w) > r(y_l)
    margin             mean of r(y_w) - r(y_l) = beta * (logratio(y_w) - logratio(y_l))
    chosen_logratio    mean of logratio(y_w)
    rejected_logratio  mean of logratio(y_l)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlbench.registry import did_you_mean

LOSS_TYPES = ("sigmoid", "ipo")


def _sequence_logps(logps: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``logps [P, T]`` over the tokens where ``mask`` is set, ``[P]``, in at least float32.

    ``torch.where`` rather than ``logps * mask``, so whatever sits at padded positions (``-inf``,
    ``nan``) neither reaches the sum nor its gradient.
    """
    dtype = torch.promote_types(logps.dtype, torch.float32)
    return torch.where(mask > 0, logps.to(dtype), 0.0).sum(dim=-1)


def _check_shapes(
    chosen_logps: Tensor,
    chosen_mask: Tensor,
    rejected_logps: Tensor,
    rejected_mask: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> int:
    """The number of pairs ``P``; raises ``ValueError`` when the shapes disagree."""
    if chosen_logps.dim() != 2 or chosen_logps.shape != chosen_mask.shape:
        raise ValueError(
            f"chosen_logps and chosen_mask must both be [P, T], got "
            f"{tuple(chosen_logps.shape)} and {tuple(chosen_mask.shape)}"
        )
    if rejected_logps.dim() != 2 or rejected_logps.shape != rejected_mask.shape:
        raise ValueError(
            f"rejected_logps and rejected_mask must both be [P, T], got "
            f"{tuple(rejected_logps.shape)} and {tuple(rejected_mask.shape)}"
        )
    num = chosen_logps.shape[0]
    shapes = {
        "rejected_logps": tuple(rejected_logps.shape[:1]),
        "ref_chosen_logps": tuple(ref_chosen_logps.shape),
        "ref_rejected_logps": tuple(ref_rejected_logps.shape),
    }
    for name, shape in shapes.items():
        if shape != (num,):
            raise ValueError(
                f"{name} must have P={num} entries (one per pair, as chosen_logps), got shape {shape}"
            )
    return num


def preference_loss(
    chosen_logps: Tensor,
    chosen_mask: Tensor,
    rejected_logps: Tensor,
    rejected_mask: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    *,
    num_pairs: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO or IPO loss of a batch of pairs, and its metrics (see the module docstring).

    ``chosen_logps [P, T_w]`` and ``rejected_logps [P, T_l]`` are the policy's per-token
    log-probs, with masks of the same shapes (1 on completion tokens, 0 on padding);
    ``ref_chosen_logps [P]`` and ``ref_rejected_logps [P]`` are the reference's per-sequence
    sums. ``label_smoothing`` (``0 <= s < 0.5``) applies to ``sigmoid`` only. ``num_pairs``,
    when given, is the pair count of the whole step: the loss is then the sum over this
    micro-batch's pairs divided by it; by default it is the mean over the ``P`` pairs.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}{did_you_mean(loss_type, list(LOSS_TYPES))}; "
            f"valid loss types: {', '.join(LOSS_TYPES)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing!r} applies to loss_type 'sigmoid' only; "
            "set it to 0 with loss_type 'ipo'"
        )
    num = _check_shapes(
        chosen_logps, chosen_mask, rejected_logps, rejected_mask, ref_chosen_logps, ref_rejected_logps
    )
    if num_pairs is not None and num_pairs < num:
        raise ValueError(f"num_pairs={num_pairs} (pairs in the step) is less than this batch's {num} pairs")

    chosen_logratio = _sequence_logps(chosen_logps, chosen_mask) - ref_chosen_logps
    rejected_logratio = _sequence_logps(rejected_logps, rejected_mask) - ref_rejected_logps

    if loss_type == "sigmoid":
        h = chosen_logratio - rejected_logratio
        # The smoothed term treats the label as flipped with probability s (conservative DPO).
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        # Counted in the log-ratios' dtype (a bf16 mask cannot count past 256 exactly); a
        # completion with no tokens counts as length 1 rather than dividing by 0.
        chosen_len = (chosen_mask > 0).to(chosen_logratio.dtype).sum(dim=-1).clamp(min=1)
        rejected_len = (rejected_mask > 0).to(rejected_logratio.dtype).sum(dim=-1).clamp(min=1)
        h = chosen_logratio / chosen_len - rejected_logratio / rejected_len
        # IPO regresses the length-normalised margin onto 1 / (2 beta) instead of pushing it to infinity.
        losses = (h - 1.0 / (2.0 * beta)).square()

    loss = losses.mean() if num_pairs is None else losses.sum() / num_pairs

    with torch.no_grad():
        chosen_reward = beta * chosen_logratio
        rejected_reward = beta * rejected_logratio
        metrics = {
            "reward_accuracy": (chosen_reward > rejected_reward).to(chosen_reward.dtype).mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
            "chosen_logratio": chosen_logratio.mean(),
            "rejected_logratio": rejected_logratio.mean(),
        }
    return loss, metrics
