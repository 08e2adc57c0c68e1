"""SIGTERM ends a 2-process DDP run whose rank 0 is stuck in a collective (issue 13, point 5).

Rank 1's reward function hangs from the third step on, so rank 0 waits inside the all-gather
of the step's keep decisions, in C++, where Python signal handlers never run. The CLI's SIGTERM
watchdog must still end it: the other rank killed, the MLflow run marked, the last checkpoint
intact for ``--resume``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

CONFIG = Path(__file__).parents[1] / "configs" / "grpo_addition.yaml"

SCRIPT = """
import os, sys, time
from pathlib import Path
from rlbench.registry import TASKS
from tasks.arithmetic import Arithmetic

@TASKS.register("test-rank-1-hangs")
class Hangs(Arithmetic):
    calls = 0

    def rewards(self, prompts, completions):
        Hangs.calls += 1
        if os.environ.get("LOCAL_RANK") == "1" and Hangs.calls >= 3:
            Path(sys.argv[-1].split("=", 1)[1]).write_text(str(os.getpid()))
            time.sleep(3600)  # rank 0 now waits in a collective that never completes
        return [float(len(c) % 2) for c in completions]

if __name__ == "__main__":
    from rlbench.cli import main
    sys.exit(main(sys.argv[1:-1]))
"""


@pytest.mark.slow
def test_sigterm_ends_a_run_stuck_in_a_collective(tmp_path: Path):
    script = tmp_path / "hanging_run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out, marker = tmp_path / "run", tmp_path / "rank1-hangs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable,
        str(script),
        "train",
        "--config",
        str(CONFIG),
        "--no-progress",
        f"output_dir={out}",
        "warmstart.enabled=false",
        "task.name=test-rank-1-hangs",
        "rollout.prompts_per_step=4",
        "algorithm.grpo.group_size=2",
        "rollout.max_new_tokens=3",
        "trainer.max_steps=50",
        "trainer.checkpoint_every=1",
        "eval.num_prompts=8",
        "eval.every_n_steps=100",
        f"logging.mlflow_tracking_uri={uri}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"marker={marker}",  # read by the script, not passed to rlbench
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "rank 1 never reached its hanging step"
            time.sleep(0.5)
        time.sleep(3)  # rank 0 is inside the all-gather by now
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        output = proc.communicate(timeout=90)[0].decode()
        assert proc.returncode == 143, output[-3000:]
        assert time.monotonic() - started < 60
        rank1 = int(marker.read_text())
        time.sleep(1)
        assert not Path(f"/proc/{rank1}").exists() or "zombie" in Path(f"/proc/{rank1}/status").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["rlbench_state"]["rollout_step"] == 2  # the steps before the hang
    from mlflow.tracking import MlflowClient

    run_id = (out / "mlflow_run_id").read_text()
    assert MlflowClient(uri).get_run(run_id).info.status in ("KILLED", "FAILED")
