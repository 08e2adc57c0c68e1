"""The optimiser and its learning-rate schedule (``optim.*``), as Lightning's
``configure_optimizers`` returns them."""

from __future__ import annotations

import math
from typing import Any

import torch

from rlbench.config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, total: int) -> float:
    """The learning rate at optimiser step ``step`` of ``total``, as a fraction of ``optim.lr``:
    a linear warm-up over ``optim.warmup_steps``, then ``optim.schedule`` (constant, linear or
    cosine decay to 0 at ``total``)."""
    if step < optim.warmup_steps:
        return (step + 1) / (optim.warmup_steps + 1)
    progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
    if optim.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if optim.schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def optimizer_and_schedule(groups: list[dict[str, Any]], optim: OptimConfig, total: int) -> dict[str, Any]:
    """AdamW over the parameter ``groups`` and its schedule, which steps once per optimiser step."""
    # fused: one kernel for all parameters instead of a Python loop over them (CPU and CUDA)
    optimizer = torch.optim.AdamW(
        groups, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
