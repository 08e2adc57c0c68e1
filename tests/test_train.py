"""End-to-end runs of the Lightning module on a tiny random model (seconds each)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import torch

from rlbench.errors import RewardError, RLBenchError
from rlbench.module import RLModule
from rlbench.registry import TASKS
from rlbench.run import train
from rlbench.task import Prompt
from rlbench.warmstart import base_model_path
from tasks.arithmetic import Arithmetic

STEP_METRICS = [
    "train/reward_mean",
    "train/reward_std",
    "train/frac_zero_std_groups",
    "train/entropy",
    "train/kl",
    "train/clip_frac",
    "train/ratio_min",
    "train/ratio_max",
    "train/grad_norm",
    "train/loss",
    "train/completion_len",
    "perf/rollout_tokens_per_s",
    "perf/step_s",
]


@TASKS.register("test-coin")
class Coin(Arithmetic):
    """Arithmetic prompts, reward a fair coin per completion (hashed, so deterministic)."""

    def reward(self, prompt: Prompt, completion: str) -> float:
        return float(hashlib.sha256(f"{prompt.text}|{completion}".encode()).digest()[0] % 2)


@TASKS.register("test-short-rewards")
class ShortRewards(Arithmetic):
    """Returns one reward too few."""

    def rewards(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        return [0.0] * (len(completions) - 1)


def test_run_logs_every_metric_to_csv_and_mlflow(make_config):
    from mlflow.tracking import MlflowClient

    config = make_config()
    summary = train(config, progress_bar=False)
    out = Path(config.output_dir)
    assert summary["steps"] == 3
    assert [step for step, _ in summary["eval_history"]] == [0, 2, 3]  # before, every 2, after the last
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    columns = set(rows[0])
    assert set(STEP_METRICS) | {"eval/accuracy"} <= columns
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run_id = (out / "mlflow_run_id").read_text()
    run = client.get_run(run_id)
    params = run.data.params
    assert params["algorithm.name"] == "grpo" and params["algorithm.grpo.beta"] == "0.04"
    assert "algorithm.beta" not in params  # options are logged under their algorithm's section
    for name in STEP_METRICS:
        assert len(client.get_metric_history(run_id, name)) == 3, name
    assert len(client.get_metric_history(run_id, "eval/accuracy")) == 3
    assert run.info.status == "FINISHED"
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "final_model" / "config.json").is_file()


def test_resume_continues_the_same_mlflow_run(make_config):
    from mlflow.tracking import MlflowClient

    train(make_config("trainer.max_steps=2", "trainer.checkpoint_every=1"), progress_bar=False)
    config = make_config("trainer.max_steps=4", "trainer.checkpoint_every=1")
    run_id = (Path(config.output_dir) / "mlflow_run_id").read_text()
    summary = train(config, resume=True, progress_bar=False)
    assert summary["steps"] == 4
    assert (Path(config.output_dir) / "mlflow_run_id").read_text() == run_id
    history = MlflowClient(summary["mlflow_tracking_uri"]).get_metric_history(run_id, "train/reward_mean")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


def test_existing_run_dir_is_not_overwritten(make_config):
    config = make_config("trainer.max_steps=1")
    train(config, progress_bar=False)
    before = sorted(p.name for p in Path(config.output_dir).iterdir())
    with pytest.raises(RLBenchError, match="already holds a run; pass --resume"):
        train(config, progress_bar=False)
    assert sorted(p.name for p in Path(config.output_dir).iterdir()) == before
    with pytest.raises(RLBenchError, match="no checkpoint"):
        train(make_config(f"output_dir={config.output_dir}-other"), resume=True, progress_bar=False)


def module_for(config) -> RLModule:
    task = TASKS.get(config.task.name)(config.task.options)
    return RLModule(config, base_model_path(config, task))


def test_reward_of_wrong_length_is_refused(make_config):
    module = module_for(make_config("task.name=test-short-rewards"))
    with pytest.raises(RewardError, match="returned 15 values for 16 completions"):
        module.rollouts.sample(module.policy, module.rollouts.source.batch(0))


def test_dynamic_sampling_keeps_only_informative_groups(make_config):
    config = make_config(
        "task.name=test-coin", "algorithm.grpo.dynamic_sampling=true", "algorithm.grpo.group_size=2"
    )
    module = module_for(config)
    batch, first, metrics = module.rollouts.collect(module.policy, step=0)
    groups = batch.rewards.view(-1, 2)
    assert len(batch) == 8 and metrics["train/kept_groups"] == 4
    assert bool((groups[:, 0] != groups[:, 1]).all())  # every kept group carries a learning signal
    assert bool(
        (first.rewards.view(-1, 2)[:, 0] == first.rewards.view(-1, 2)[:, 1]).any()
    )  # some were dropped


def test_beta_zero_loads_no_reference(make_config):
    assert module_for(make_config("algorithm.grpo.beta=0")).reference is None
    module = module_for(make_config())
    assert module.reference is not None
    assert not any(name.startswith("reference") for name in module.state_dict())  # not checkpointed
    assert all(not p.requires_grad for p in module.reference.model.parameters())


def test_same_seed_same_run(make_config, tmp_path: Path):
    first = train(make_config("logging.mlflow=false"), progress_bar=False)
    second = train(
        make_config("logging.mlflow=false", f"output_dir={tmp_path / 'again'}"), progress_bar=False
    )
    a = torch.load(Path(first["output_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(Path(second["output_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_more_eval_prompts_than_the_split_holds(make_config):
    with pytest.raises(RLBenchError, match=r"eval.num_prompts=500 is invalid: .*task.eval_size=200"):
        module_for(make_config("eval.num_prompts=500"))
