"""The non-finite guard's diagnosis: what went NaN or inf in a step, named for the user."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rlbench.algorithm import RolloutBatch
from rlbench.errors import RLBenchError


class NonFiniteError(RLBenchError):
    """Too many consecutive updates with a non-finite loss or gradient."""


def non_finite_cause(batch: RolloutBatch, logprobs: Tensor, loss: Tensor) -> str:
    """Names the first non-finite input of a non-finite loss, in the order the step computes them."""
    names = ("rewards", "advantages", "behaviour_logprobs", "old_logprobs", "ref_logprobs")
    for name in (*names, "ref_sequence_logprobs", "old_values", "returns"):
        value = getattr(batch, name)
        if value is not None and not bool(torch.isfinite(value).all()):
            rows = (~torch.isfinite(value)).reshape(len(value), -1).any(-1).nonzero().flatten().tolist()
            source = " from the task's rewards()" if name == "rewards" else ""
            return f"{name}{source} (rows {rows[:8]} of the micro-batch)"
    if not bool(torch.isfinite(logprobs).all()):
        return "policy log-probs"
    return f"loss ({float(loss)})"


def non_finite_gradient(model: nn.Module) -> str:
    for name, param in model.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return f"gradient of {name}"
    return "gradient norm"


def logprob_gap(batch: RolloutBatch, logprobs: Tensor) -> float:
    """max |behaviour - current| log-prob over the completion tokens of ``batch`` (-inf if none,
    or when the batch was not sampled: preference pairs).

    Sampled at pass 0, before any update, this must be 0 up to float error: anything more means
    the sampler and the loss see different distributions (dropout, filtering, precision).
    """
    mask = batch.completion_mask > 0
    if batch.behaviour_logprobs is None or not bool(mask.any()):
        return -math.inf
    return float((batch.behaviour_logprobs - logprobs).abs()[mask].max())
