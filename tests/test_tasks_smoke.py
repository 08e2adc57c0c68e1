"""Every task with every algorithm through ``rlbench train``: a few steps each, from a random
tiny preset (DPO from a pairs file of the task's own demonstrations, since a random model
rarely earns a reward to build pairs from)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from rlbench.cli import main
from rlbench.registry import TASKS

TASK_NAMES = ["arithmetic", "countdown", "sort", "reverse", "multistep", "jsonl"]
ALGORITHMS = ["grpo", "ppo", "dpo", "rloo"]


def config_file(tmp_path: Path) -> str:
    """A config file holding only the seed: every other field is its default or overridden."""
    path = tmp_path / "base.yaml"
    path.write_text("seed: 0\n")
    return str(path)


def write_demo_pairs(task_name: str, path: Path) -> None:
    """Chosen: a prompt's demonstration; rejected: the next prompt's (a wrong answer)."""
    task_cls = TASKS.get(task_name)
    demos = task_cls(task_cls.Config()).demonstrations(16, seed=0)
    with path.open("w") as f:
        for (prompt, chosen), (_, rejected) in zip(demos, demos[1:] + demos[:1]):
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def test_every_task_is_registered_with_a_description():
    for name in TASK_NAMES:
        task = TASKS.get(name)
        assert (task.__doc__ or "").strip(), name


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_trains_with_every_algorithm(task: str, algorithm: str, tmp_path: Path):
    out = tmp_path / "run"
    args = [
        "train",
        "--no-progress",
        f"--config={config_file(tmp_path)}",
        f"output_dir={out}",
        f"warmstart.cache_dir={tmp_path / 'cache'}",
        "warmstart.enabled=false",
        f"task.name={task}",
        f"algorithm.name={algorithm}",
        f"algorithm.{algorithm}.group_size=2" if algorithm != "dpo" else "rollout.prompts_per_step=4",
        "rollout.prompts_per_step=4",
        "rollout.max_new_tokens=6",
        "trainer.max_steps=2",
        "eval.num_prompts=4",
        "eval.every_n_steps=2",
        "logging.mlflow=false",
    ]
    if algorithm == "dpo":
        pairs = tmp_path / "pairs.jsonl"
        write_demo_pairs(task, pairs)
        args.append(f"algorithm.dpo.pairs_file={pairs}")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task and summary["algorithm"] == algorithm and summary["steps"] == 2
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_grpo_with_process_supervision_trains_on_multistep(tmp_path: Path):
    out = tmp_path / "run"
    common = [
        f"warmstart.cache_dir={tmp_path / 'cache'}",
        "warmstart.enabled=false",
        "algorithm.grpo.group_size=2",
        "rollout.prompts_per_step=4",
        "rollout.max_new_tokens=6",
        "trainer.max_steps=2",
        "eval.num_prompts=4",
        "logging.mlflow=false",
    ]
    args = [
        "train",
        "--no-progress",
        f"--config={config_file(tmp_path)}",
        f"output_dir={out}",
        "task.name=multistep",
        "algorithm.grpo.advantage=prm",
    ]
    assert main([*args, *common]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_process_supervision_on_a_task_without_steps_is_a_config_error(tmp_path: Path, capsys):
    args = ["train", f"--config={config_file(tmp_path)}", f"output_dir={tmp_path}", "task.name=arithmetic"]
    assert main([*args, "algorithm.grpo.advantage=prm"]) == 2
    err = capsys.readouterr().err
    assert "task.name='arithmetic'" in err and "step rewards" in err and "multistep" in err
