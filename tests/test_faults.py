"""Faults: a non-finite loss or gradient skips the update; too many in a row stop the run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlbench.module import NonFiniteError, RLModule
from rlbench.registry import TASKS
from rlbench.run import train
from rlbench.task import Prompt
from rlbench.tracking import mlflow_tracking_uri
from tasks.arithmetic import Arithmetic


@TASKS.register("test-nan-reward")
class NaNReward(Arithmetic):
    """Rewards are NaN from the third rollout step on (steps 0 and 1 are fine)."""

    calls = 0

    def rewards(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        type(self).calls += 1
        return [math.nan if type(self).calls > 2 else 0.5 * (i % 2) for i in range(len(completions))]


def test_nan_reward_skips_then_stops_naming_the_cause(make_config):
    from mlflow.tracking import MlflowClient

    NaNReward.calls = 0
    config = make_config(
        "task.name=test-nan-reward",
        "trainer.max_steps=10",
        "trainer.checkpoint_every=1",
        "train.max_bad_steps=2",
        "eval.every_n_steps=100",
    )
    with pytest.raises(NonFiniteError) as info:
        train(config, progress_bar=False)
    message = str(info.value)
    assert "2 consecutive updates had a non-finite rewards" in message
    assert "rollout step 3 (optimiser step 2)" in message and "last good checkpoint" in message
    out = Path(config.output_dir)
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the last good update is on disk
    run = MlflowClient(mlflow_tracking_uri(config)).get_run((out / "mlflow_run_id").read_text())
    assert run.info.status == "FAILED"


@TASKS.register("test-faults-coin")
class Coin(Arithmetic):
    """Reward 1 for every other completion: a learning signal whatever the policy samples."""

    def rewards(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        return [float(i % 2) for i in range(len(completions))]


class NaNGradient:
    """Makes the gradient of one weight NaN on the first ``times`` backward passes."""

    def __init__(self, param: torch.nn.Parameter, times: int) -> None:
        self.left = times
        param.register_hook(self)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.left > 0:
            self.left -= 1
            return torch.full_like(grad, math.nan)
        return grad


def test_nan_gradient_is_skipped_and_the_run_recovers(make_config):
    import lightning.pytorch as pl

    from rlbench.data import StepTicks
    from rlbench.warmstart import base_model_path

    config = make_config(
        "task.name=test-faults-coin", "trainer.max_steps=3", "logging.mlflow=false", "eval.every_n_steps=100"
    )
    module = RLModule(config, base_model_path(config, TASKS.get("arithmetic")(config.task.options)))
    NaNGradient(module.policy.model.layers[1].mlp.up_proj.weight, times=1)
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = pl.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, train_dataloaders=StepTicks())
    # max_steps counts rollout steps, a skipped one included: one skipped, two real updates
    assert module.skipped.total == 1 and module.rollout_step == 3
    assert trainer.global_step == 2
    assert all(torch.isfinite(v).all() for v in module.policy.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())


def test_nan_gradient_cause_names_the_parameter(make_config):
    from rlbench.module import non_finite_gradient

    config = make_config()
    module = RLModule(config, str(_preset(config)))
    weight = module.policy.model.layers[0].self_attn.q_proj.weight
    weight.grad = torch.full_like(weight, math.nan)
    assert non_finite_gradient(module.policy) == "gradient of model.layers.0.self_attn.q_proj.weight"


def _preset(config) -> str:
    from rlbench.warmstart import base_model_path

    return base_model_path(config, TASKS.get("arithmetic")(config.task.options))
