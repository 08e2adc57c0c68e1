"""The non-finite guard: what went NaN or inf in a step, named for the user, and the count of
skipped updates that stops a run after too many in a row."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from rlbench.algorithm import RolloutBatch
from rlbench.errors import RLBenchError


class NonFiniteError(RLBenchError):
    """Too many consecutive updates with a non-finite loss or gradient."""


@dataclass
class SkippedUpdates:
    """Updates skipped for a non-finite loss or gradient: in all (``train/skipped_steps``) and
    in a row now. ``max_in_a_row`` of them in a row stop the run; checkpoints in
    ``checkpoints`` are left as they are, and the error says whether there is one."""

    max_in_a_row: int
    checkpoints: Path
    total: int = 0
    in_a_row: int = 0

    def record(self, cause: str | None, where: str) -> None:
        """One update's outcome: ``cause`` names what was not finite, None for a good update."""
        if cause is None:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        pl.utilities.rank_zero_warn(f"skipped the update of {where}: non-finite {cause}")
        if self.in_a_row >= self.max_in_a_row:
            kept = (
                f"the last good checkpoint is kept in {self.checkpoints}"
                if any(self.checkpoints.glob("*.ckpt"))
                else "no checkpoint had been written yet"
            )
            raise NonFiniteError(
                f"stopped at {where}: {self.in_a_row} consecutive updates had a non-finite "
                f"{cause}; {kept} (train.max_bad_steps={self.max_in_a_row})"
            )


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
