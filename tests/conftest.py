"""Shared fixtures: small configs that run in seconds on one CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from rlbench.config import RunConfig, load_config

torch.set_num_threads(2)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., RunConfig]:
    """A tiny run config under ``tmp_path``; extra ``dotted.key=value`` strings override it."""

    def make(*overrides: str) -> RunConfig:
        base = [
            f"output_dir={tmp_path / 'run'}",
            f"warmstart.cache_dir={tmp_path / 'cache'}",
            "warmstart.enabled=false",
            "rollout.prompts_per_step=4",
            "rollout.max_new_tokens=4",
            "algorithm.grpo.group_size=4",
            "trainer.max_steps=3",
            "eval.num_prompts=16",
            "eval.every_n_steps=2",
        ]
        return load_config(None, [*base, *overrides])

    return make


def run_steps(module: Any, steps: int) -> dict[str, float]:
    """Trains ``module`` (an ``RLModule``) for ``steps`` rollout steps in a bare Trainer; its
    last step's metrics."""
    import lightning.pytorch as pl

    from rlbench.data import StepTicks

    module.config.trainer.max_steps = steps
    trainer = pl.Trainer(
        max_steps=100,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=StepTicks())
    return module.last_metrics
