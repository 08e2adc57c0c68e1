"""Two sweep workers on one study in a real PostgreSQL server; one of them SIGKILLed mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from rlbench.sweep import GRACE_S

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[1] / "configs"


def test_two_workers_share_a_study_and_a_killed_workers_trial_is_failed_not_lost(tmp_path, postgres):
    sweep = {
        "name": "pg",
        "base": str(CONFIGS / "grpo_addition.yaml"),
        "output_dir": str(tmp_path / "sweep"),
        "set": {
            "warmstart.enabled": False,
            "trainer.max_steps": 12,
            "trainer.checkpoint_every": 12,
            "eval.every_n_steps": 4,
            "eval.num_prompts": 16,
            "rollout.prompts_per_step": 4,
            "algorithm.grpo.group_size": 4,
            "logging.mlflow": False,
        },
        "space": {"optim.lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True}},
        "n_trials": 6,
        "sampler": {"name": "random", "seed": 0},
        "pruner": "none",
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    command = [sys.executable, "-m", "rlbench.cli", "sweep", str(path), "--storage", postgres]
    proc = subprocess.Popen([*command, "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def trials() -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name="pg", storage=postgres).trials
        except KeyError:  # the study is not created yet
            return []

    deadline = time.time() + 600
    victim = None
    while victim is None:  # both workers have finished a trial, and one is running its next
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        done = trials()
        workers = {t.user_attrs.get("worker") for t in done if t.state.name == "COMPLETE"}
        running = [t for t in done if t.state.name == "RUNNING" and "worker" in t.user_attrs]
        if len(workers) == 2 and running:
            victim = running[0]
        time.sleep(0.2)
    killed_at = time.time()
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    output = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, output  # the other worker finished the study's share

    after = {t.number: t for t in trials()}
    assert after[victim.number].state.name == "RUNNING"  # its worker died; no heartbeat since
    others = [t for n, t in after.items() if n != victim.number]
    assert all(t.state.name == "COMPLETE" for t in others) and len(others) >= 5
    assert len({t.user_attrs["worker"] for t in others}) == 2  # both workers contributed

    time.sleep(max(0.0, killed_at + GRACE_S + 1 - time.time()))
    again = subprocess.run([*command, "--n-trials", "7"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    final = optuna.load_study(study_name="pg", storage=postgres).trials
    assert final[victim.number].state.name == "FAIL"  # failed by its stale heartbeat, not lost
    retried = [t for t in final if t.number > victim.number and t.params == victim.params]
    assert retried and retried[0].state.name == "COMPLETE"  # and run again with its parameters
    assert sum(t.state.name == "COMPLETE" for t in final) == 7
