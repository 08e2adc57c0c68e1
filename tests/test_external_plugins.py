"""Plug-ins from a package outside this repo arrive through the entry-point groups alone.

The package is written to a temporary directory with a ``.dist-info`` beside it, which is all
``importlib.metadata`` needs to see an installed distribution once the directory is on
``PYTHONPATH``. Nothing in rlbench imports it: the CLI, run as a real process, finds the
algorithm (``rlbench.algorithms``) and the task (``rlbench.tasks``) by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlbench.warmstart import INFO_FILE

ALGO = '''\
"""GRPO with its advantages multiplied by a constant: a plug-in outside rlbench."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from algorithms.grpo import GRPO, GRPOConfig
from rlbench.algorithm import AllReduceSum, RolloutBatch, single_process
from rlbench.errors import require


@dataclass
class ScaledGRPOConfig(GRPOConfig):
    advantage_scale: float = 1.0
    """Factor applied to every group-normalised advantage."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.advantage_scale > 0, "advantage_scale", self.advantage_scale, "a number > 0")


class ScaledGRPO(GRPO):
    """GRPO whose group-normalised advantages are scaled by advantage_scale."""

    Config = ScaledGRPOConfig
    config: ScaledGRPOConfig

    def prepare(self, batch: RolloutBatch, all_reduce_sum: AllReduceSum = single_process) -> RolloutBatch:
        batch = super().prepare(batch, all_reduce_sum)
        return dataclasses.replace(batch, advantages=batch.advantages * self.config.advantage_scale)
'''

TASK = '''\
"""Digit copy: see ``407=`` and answer ``407``; a task plug-in outside rlbench."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

from rlbench.errors import require
from rlbench.task import Prompt, Split, Task


@dataclass
class DigitCopyConfig:
    digits: int = 3
    """Digits of each number (leading zeros kept)."""
    eval_size: int = 100
    """Numbers in the fixed eval split (at most half of them all)."""
    split_seed: int = 1234
    """Seed that picks the eval split."""

    def __post_init__(self) -> None:
        require(1 <= self.digits <= 6, "digits", self.digits, "an integer from 1 to 6")
        half = 10**self.digits // 2
        require(1 <= self.eval_size <= half, "eval_size", self.eval_size, f"an integer from 1 to {half}")


class DigitCopy(Task):
    """Copy a number of digits verbatim (exact-match verifier)."""

    Config = DigitCopyConfig
    alphabet = "0123456789="

    @cached_property
    def eval_numbers(self) -> list[int]:
        """The eval split: ``eval_size`` distinct numbers drawn by ``split_seed``; train is the rest."""
        numbers = range(10**self.config.digits)
        return random.Random(self.config.split_seed).sample(numbers, self.config.eval_size)

    def to_prompt(self, number: int) -> Prompt:
        text = f"{number:0{self.config.digits}d}"
        return Prompt(text=text + "=", answer=text)

    def prompts(self, split: Split, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(seed)
        if split == "eval":
            if n > self.config.eval_size:
                raise ValueError(f"asked for {n} eval prompts; task.eval_size={self.config.eval_size}")
            return [self.to_prompt(x) for x in rng.sample(self.eval_numbers, n)]
        held_out, numbers = set(self.eval_numbers), []
        while len(numbers) < n:
            x = rng.randrange(10**self.config.digits)
            if x not in held_out:
                numbers.append(x)
        return [self.to_prompt(x) for x in numbers]

    def reward(self, prompt: Prompt, completion: str) -> float:
        return float(self.is_correct(prompt, completion))

    def is_correct(self, prompt: Prompt, completion: str) -> bool:
        return "".join(completion.split()) == prompt.answer

    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        return [(p.text, p.answer) for p in self.prompts("train", n, seed)]
'''

ENTRY_POINTS = """\
[rlbench.algorithms]
scaled_grpo = rlbench_extra.algo:ScaledGRPO

[rlbench.tasks]
digit_copy = rlbench_extra.task:DigitCopy
"""

# Small enough to train in seconds on one CPU (the warm start, on the task's demonstrations,
# reaches 0.1 in a few dozen steps); the plug-ins' own options keep their defaults.
RUN_CONFIG = """\
task:
  name: digit_copy
algorithm:
  name: scaled_grpo
warmstart:
  target_accuracy: 0.1
  validation_prompts: 50
  max_steps: 60
rollout:
  prompts_per_step: 2
  max_new_tokens: 4
trainer:
  max_steps: 2
eval:
  num_prompts: 8
  every_n_steps: 2
logging:
  mlflow: false
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory holding the package ``rlbench_extra`` and its ``.dist-info`` (no install)."""
    root = tmp_path / "site"
    package = root / "rlbench_extra"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""rlbench plug-ins shipped by a third party."""\n')
    (package / "algo.py").write_text(ALGO)
    (package / "task.py").write_text(TASK)
    info = root / "rlbench_extra-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rlbench-extra\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def rlbench(site: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m rlbench.cli *argv`` in a real process that has ``site`` on its path."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlbench.cli", *argv],
        cwd=site.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_list_shows_external_plugins_with_their_summaries(site: Path):
    done = rlbench(site, "list")
    assert done.returncode == 0, done.stderr
    lines = [line.split(None, 1) for line in done.stdout.splitlines() if line.startswith("  ")]
    rows = {parts[0]: parts[1] for parts in lines if len(parts) == 2}
    assert rows["scaled_grpo"] == "GRPO whose group-normalised advantages are scaled by advantage_scale."
    assert rows["digit_copy"] == "Copy a number of digits verbatim (exact-match verifier)."
    assert "grpo" in rows and "arithmetic" in rows  # the built-ins are still there
    algorithms, tasks = done.stdout.index("algorithms:"), done.stdout.index("tasks:")
    assert algorithms < done.stdout.index("  scaled_grpo ") < tasks < done.stdout.index("  digit_copy ")


def test_train_runs_external_algorithm_on_external_task(site: Path, tmp_path: Path):
    config = tmp_path / "run.yaml"
    config.write_text(RUN_CONFIG)
    out = tmp_path / "run"
    done = rlbench(
        site,
        "train",
        "--config",
        str(config),
        "--no-progress",
        f"output_dir={out}",
        f"warmstart.cache_dir={tmp_path / 'cache'}",
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["algorithm"], summary["task"], summary["steps"]) == ("scaled_grpo", "digit_copy", 2)
    assert [step for step, _ in summary["eval_history"]] == [0, 2]
    warm = json.loads((Path(summary["model_path"]) / INFO_FILE).read_text())
    assert warm["accuracy"] >= 0.1  # the warm start learnt from DigitCopy.demonstrations
    resolved = (out / "config.yaml").read_text()
    # the run was configured by the plug-ins' own Config classes
    assert "advantage_scale: 1.0" in resolved and "split_seed: 1234" in resolved


@pytest.mark.parametrize(
    ("override", "kind", "name", "builtin"),
    [
        ("task.name=digit_copi", "task", "digit_copy", "arithmetic"),
        ("algorithm.name=scaled_grpp", "algorithm", "scaled_grpo", "grpo"),
    ],
)
def test_misspelt_external_plugin_is_suggested(
    site: Path, tmp_path: Path, override: str, kind: str, name: str, builtin: str
):
    config = tmp_path / "run.yaml"
    config.write_text(RUN_CONFIG)
    done = rlbench(site, "train", "--config", str(config), f"output_dir={tmp_path / 'run'}", override)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlbench train: error: "), done.stderr
    assert f"(did you mean {name!r}?)" in lines[0]
    valid = lines[0].split(f"valid {kind}s: ", 1)[1].split(", ")
    assert {name, builtin} <= set(valid)
    assert not (tmp_path / "run").exists()
