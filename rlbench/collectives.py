"""Reductions over the data-parallel processes of a run, through the Lightning strategy.

Every figure a step logs or decides on (loss denominators, whitening statistics, metrics, the
number of micro-batches to pad to) is global, so a run's result does not depend on how many
processes share it. In a single process every operation is the identity.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from rlbench.metrics import reduce_over_processes


class Collectives:
    """Sums, maxima and gathers over the processes of ``module``'s trainer."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    @property
    def world_size(self) -> int:
        """Processes sharing each step (1 when not attached to a Trainer, e.g. in tests)."""
        trainer = self.module._trainer
        return trainer.world_size if trainer is not None else 1

    def sum(self, value: float) -> float:
        """``value`` summed over all processes."""
        return value if self.world_size == 1 else self._reduce(value, "sum")

    def max(self, value: float) -> float:
        """``value``'s maximum over all processes."""
        return value if self.world_size == 1 else self._reduce(value, "max")

    def min(self, value: float) -> float:
        """``value``'s minimum over all processes."""
        return value if self.world_size == 1 else -self._reduce(-value, "max")

    def _reduce(self, value: float, op: str) -> float:
        tensor = torch.tensor(float(value), device=self.module.device)
        return float(self.module.trainer.strategy.reduce(tensor, reduce_op=op))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over all processes (the ``AllReduceSum`` algorithms are handed)."""
        if self.world_size == 1:
            return tensor
        strategy = self.module.trainer.strategy
        return strategy.reduce(tensor.to(self.module.device), reduce_op="sum").to(tensor.device)

    def gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor`` stacked in rank order and flattened (one all-gather)."""
        if self.world_size == 1:
            return tensor
        return self.module.all_gather(tensor.to(self.module.device)).reshape(-1)

    def reduce(self, metrics: dict[str, float], weight: float) -> dict[str, float]:
        """Global figures from this process's metrics (``metrics.reduce_over_processes``)."""
        if self.world_size == 1:
            return metrics
        return reduce_over_processes(metrics, weight, self.gather)
