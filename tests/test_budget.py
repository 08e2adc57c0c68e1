"""Compute budgets: a run stops after the step that spends its budget, evaluated and saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlbench.config import BudgetConfig
from rlbench.errors import ConfigError
from rlbench.run import train


def test_the_first_spent_limit_is_named():
    budget = BudgetConfig(samples=100, wall_s=60.0)
    assert budget.spent({"cost/samples": 99.0, "cost/wall_s": 1.0}) is None
    assert budget.spent({"cost/samples": 100.0, "cost/wall_s": 1.0}) == "budget.samples=100"
    assert budget.spent({"cost/samples": 0.0, "cost/wall_s": 61.0}) == "budget.wall_s=60.0"
    assert BudgetConfig().spent({"cost/samples": 1e12}) is None  # no limits


def test_a_bad_budget_names_the_field():
    with pytest.raises(ConfigError, match="budget.samples=0 is invalid: null \\(no limit\\) or a number > 0"):
        from rlbench.config import load_config

        load_config(None, ["budget.samples=0"])


def test_a_sample_budget_stops_the_run_after_the_step_that_spends_it(make_config):
    # 4 prompts x G = 4: 16 completions a step; 40 are spent during step 3 (48 >= 40)
    config = make_config("budget.samples=40", "trainer.max_steps=10", "logging.mlflow=false")
    summary = train(config, progress_bar=False)
    assert summary["steps"] == 3 and summary["stopped_by"] == "budget.samples=40"
    assert summary["cost"]["cost/samples"] == 48.0
    assert summary["eval_history"][-1][0] == 3  # the final evaluation ran at the stop
    out = Path(config.output_dir)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["rlbench_state"]["rollout_step"] == 3  # and the run was saved there
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "budget.samples=40"


def test_a_token_budget_and_a_wall_clock_budget(make_config, tmp_path: Path):
    tokens = make_config(
        f"output_dir={tmp_path / 'tokens'}",
        "budget.tokens_generated=1",
        "trainer.max_steps=5",
        "logging.mlflow=false",
    )
    assert train(tokens, progress_bar=False)["steps"] == 1
    wall = make_config(
        f"output_dir={tmp_path / 'wall'}",
        "budget.wall_s=0.001",
        "trainer.max_steps=5",
        "logging.mlflow=false",
    )
    summary = train(wall, progress_bar=False)
    assert summary["steps"] == 1 and summary["stopped_by"] == "budget.wall_s=0.001"
