"""``rlbench compare`` end to end: real runs, a real MLflow server, killed and parallel workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from rlbench.cellstore import CellStore
from rlbench.cli import main
from rlbench.htmlcheck import check_images, find_chromium
from rlbench.records import from_directory, from_mlflow
from rlbench.report import tables_markdown

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[1] / "configs"
TINY = {
    "warmstart.enabled": False,
    "trainer.max_steps": 4,
    "trainer.checkpoint_every": 2,
    "eval.every_n_steps": 2,
    "eval.num_prompts": 16,
    "eval.samples": 4,
    "rollout.prompts_per_step": 4,
    "algorithm.grpo.group_size": 4,
    "algorithm.rloo.group_size": 4,
    "algorithm.ppo.group_size": 4,
    "algorithm.dpo.num_prompts": 16,
}


def write_matrix(tmp_path: Path, algorithms: list[str], seeds: list[int], **settings: object) -> Path:
    data = {
        "name": "m",
        "base": str(CONFIGS / "grpo_addition.yaml"),
        "output_dir": str(tmp_path / "out"),
        "algorithms": algorithms,
        "seeds": seeds,
        "set": {**TINY, **settings},
    }
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def mlflow_server(tmp_path, free_tcp_port):
    """A real ``mlflow server`` on 127.0.0.1 with an SQLite backend; its URL."""
    port = free_tcp_port
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # it spawns helpers: end the whole group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_matrix_logs_to_a_real_mlflow_server_and_the_report_rebuilds_from_it(tmp_path, mlflow_server, capsys):
    path = write_matrix(tmp_path, ["grpo", "rloo"], [0, 1], **{"logging.mlflow_tracking_uri": mlflow_server})
    assert main(["compare", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("m")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["rlbench.cell"] for r in runs) == [
        "arithmetic-grpo-s0", "arithmetic-grpo-s1", "arithmetic-rloo-s0", "arithmetic-rloo-s1",
    ]  # fmt: skip
    for run in runs:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert params["algorithm.name"] == tags["rlbench.cell.algorithm"]
        assert params["seed"] == tags["rlbench.cell.seed"]
        assert tags["rlbench.commit"] and tags["rlbench.torch"]
        accuracy = client.get_metric_history(run.info.run_id, "eval/accuracy")
        assert [m.step for m in accuracy] == [0, 2, 4]
        rewards = client.get_metric_history(run.info.run_id, "train/reward_mean")
        assert [m.step for m in rewards] == [0, 1, 2, 3]
        csv_rows = (out / "runs" / tags["rlbench.cell"] / "csv" / "metrics.csv").read_text()
        assert f"{accuracy[-1].value}" in csv_rows  # the same values in both logs

    # `rlbench report --experiment` from the server alone rebuilds the same text and tables
    assert (
        main(
            ["report", "--experiment", "m", "--tracking-uri", mlflow_server, "--output", str(tmp_path / "r")]
        )
        == 0
    )
    records = from_mlflow("m", mlflow_server).records
    # MLflow refuses '@' in metric names: written as _at_, read back under the logged name
    assert [s for s, _ in records[0].curve("eval/pass@2")] == [0, 2, 4]
    assert records[0].curve("eval/pass@k") and "eval/pass_at_k" not in records[0].metrics
    from_server = tables_markdown(from_mlflow("m", mlflow_server))
    assert from_server == tables_markdown(from_directory(out))
    assert "| grpo | 2/2 |" in from_server and "| rloo | 2/2 |" in from_server
    written = (tmp_path / "r" / "report.md").read_text()
    assert written == (out / "report.md").read_text()
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == [
        "arithmetic-curves-samples.png", "arithmetic-curves-step.png", "arithmetic-curves-wall.png",
        "arithmetic-pass_at_k.png",
    ]  # fmt: skip
    if find_chromium() is not None:  # CI installs it (.ci/run)
        images = check_images(out / "report.html")
        assert len(images.images) == 4 and images.broken == []


def test_a_killed_matrix_resumes_skipping_finished_cells(tmp_path):
    path = write_matrix(tmp_path, ["grpo"], [0, 1], **{"trainer.max_steps": 10})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rlbench.cli", "compare", str(path), "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    second = out / "runs" / "arithmetic-grpo-s1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not second.is_file():  # the first cell is done and the second has saved a checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the worker and its run, mid-step
    proc.wait()
    first = out / "runs" / "arithmetic-grpo-s0" / "summary.json"
    finished_at = first.stat().st_mtime_ns
    assert not (out / "runs" / "arithmetic-grpo-s1" / "summary.json").exists()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 done, 0 failed, 1 running, 0 left" in again.stdout  # the killed cell is still "running"
    assert "arithmetic-grpo-s1: resuming" in again.stdout
    assert "arithmetic-grpo-s0: starting" not in again.stdout
    assert first.stat().st_mtime_ns == finished_at  # skipped, not run again
    summary = json.loads((out / "runs" / "arithmetic-grpo-s1" / "summary.json").read_text())
    assert summary["steps"] == 10
    (row_0, row_1) = CellStore(f"sqlite:///{out / 'cells.db'}", "m").rows()
    assert (row_0.state, row_0.attempts, row_1.state, row_1.attempts) == ("done", 1, "done", 2)
    assert (out / "report.html").is_file()


def test_two_workers_share_a_matrix_and_a_crashing_cell_is_recorded(tmp_path):
    bad_pairs = tmp_path / "pairs.jsonl"
    bad_pairs.write_text("this is not JSON\n")
    path = write_matrix(tmp_path, ["grpo", "dpo"], [0, 1], **{"algorithm.dpo.pairs_file": str(bad_pairs)})
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "rlbench.cli", "compare", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # some cells failed, the rest ran
    rows = CellStore(f"sqlite:///{out / 'cells.db'}", "m").rows()
    assert {r.cell: r.state for r in rows} == {
        "arithmetic-grpo-s0": "done", "arithmetic-grpo-s1": "done",
        "arithmetic-dpo-s0": "failed", "arithmetic-dpo-s1": "failed",
    }  # fmt: skip
    assert all(r.attempts == 1 for r in rows)  # each cell ran exactly once
    assert len({r.worker for r in rows}) == 2  # and both workers took cells
    for row in rows:
        if row.state == "failed":
            assert "pairs.jsonl" in row.cause and "JSON" in row.cause
    report = (out / "report.md").read_text()
    assert "## Runs without a result" in report
    assert "| arithmetic-dpo-s0 | failed |" in report and "not valid JSON" in report
    assert "| grpo | 2/2 |" in report and "| dpo | 0/2 |" in report


def test_two_workers_share_a_matrix_through_postgresql(tmp_path, postgres):
    path = write_matrix(tmp_path, ["grpo", "rloo"], [0, 1], **{"logging.mlflow": False})
    result = subprocess.run(
        [sys.executable, "-m", "rlbench.cli", "compare", str(path), "--workers", "2", "--storage", postgres],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = CellStore(postgres, "m").rows()
    assert [(r.state, r.attempts) for r in rows] == [("done", 1)] * 4  # each cell ran exactly once
    assert len({r.worker for r in rows}) == 2
    assert "| grpo | 2/2 |" in (tmp_path / "out" / "report.md").read_text()
