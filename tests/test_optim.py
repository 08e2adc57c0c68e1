"""The learning-rate schedule against hand-computed values, and the optimiser Lightning gets."""

from __future__ import annotations

import math

import pytest
import torch

from rlbench.config import OptimConfig
from rlbench.optim import lr_factor, optimizer_and_schedule


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warm-up 2 of 10 steps: 1/3, 2/3, then the schedule over the 8 steps left
        ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 0.0]),
        ("cosine", [1 / 3, 2 / 3, 1.0, (1 + math.cos(math.pi / 8)) / 2, (1 + math.sqrt(0.5)) / 2, 0.0]),
    ],
)
def test_warm_up_then_the_schedule_decays_to_zero_at_the_last_step(schedule, expected):
    optim = OptimConfig(warmup_steps=2, schedule=schedule)
    got = [lr_factor(step, optim, total=10) for step in (0, 1, 2, 3, 4, 10)]
    assert got == pytest.approx(expected)


def test_the_scheduler_steps_the_optimiser_learning_rate():
    optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="linear")
    weight = torch.nn.Parameter(torch.zeros(2))
    built = optimizer_and_schedule([{"params": [weight], "lr": optim.lr}], optim, total=4)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert built["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
