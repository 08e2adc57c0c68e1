"""Weights & Biases logging (``logging.wandb``): an offline run under ``<output_dir>/wandb``
that holds the same metrics, at the same steps, as the CSV log."""

from __future__ import annotations

import csv
import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlbench.errors import ConfigError, RLBenchError
from rlbench.run import stopped_before_first_checkpoint, train

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

#: The ``.wandb`` transaction log: a 7-byte file header (``:W&B``, magic, version), then
#: LevelDB-log records (crc32, length, type) in 32 KiB blocks; each whole record is a protobuf
#: ``Record``. wandb 0.31 ships no Python reader of its own.
BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:HEADER]
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if left < HEADER or (kind == 0 and length == 0):  # the block's zero padding
            pos += left
            continue
        parts += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def key(item) -> str:  # a HistoryItem or ConfigItem
    return item.key or ".".join(item.nested_key)  # names with a "/" come as nested_key


def read_offline_run(run_dir: Path) -> dict:
    """The run record, config, history rows and exit code of one ``offline-run-*`` directory."""
    (log,) = run_dir.glob("run-*.wandb")
    run, config, history, exit_code = None, {}, [], None
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"run": run, "config": config, "history": history, "exit_code": exit_code}


def csv_points(output_dir: Path) -> dict[tuple[str, int], float]:
    points = {}
    for row in csv.DictReader((output_dir / "csv" / "metrics.csv").open()):
        for name, value in row.items():
            if name != "step" and value not in ("", None):
                points[name, int(float(row["step"]))] = float(value)
    return points


def wandb_points(history: list[dict]) -> dict[tuple[str, int], float]:
    points = {}
    for row in history:
        step = row["trainer/global_step"]
        for name, value in row.items():
            if not name.startswith("_") and name != "trainer/global_step":
                points[name, step] = value
    return points


@pytest.fixture
def offline(monkeypatch):
    """No API key and no WANDB_MODE: the run must choose offline by itself."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_offline_run_holds_the_csv_metrics(make_config, offline, capsys):
    config = make_config(
        "logging.wandb=true",
        "logging.mlflow=false",
        "logging.wandb_project=rlbench-test",
        "logging.wandb_group=cmp-1",
        "logging.run_name=grpo-seed0",
    )
    summary = train(config, progress_bar=False)
    out = Path(config.output_dir)
    run_id = (out / "wandb_run_id").read_text()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert run_dir.name.endswith(f"-{run_id}")
    logged = read_offline_run(run_dir)

    run = logged["run"]
    assert (run.run_id, run.project, run.display_name, run.run_group) == (
        run_id,
        "rlbench-test",
        "grpo-seed0",
        "cmp-1",
    )
    params = logged["config"]
    assert params["algorithm.name"] == "grpo" and params["algorithm.grpo.beta"] == 0.04
    assert params["logging.wandb"] is True and params["trainer.max_steps"] == 3
    assert params["rlbench.seed"] == 0 and params["rlbench.torch"]  # provenance, as in MLflow's tags

    # every CSV value, at its step, and nothing else
    csv_log, wandb_log = csv_points(out), wandb_points(logged["history"])
    assert wandb_log.keys() == csv_log.keys()
    assert wandb_log == pytest.approx(csv_log, rel=1e-9)
    names = {name for name, _ in wandb_log}
    assert {"train/reward_mean", "train/kl", "train/loss", "eval/accuracy"} <= names
    assert sorted(step for name, step in wandb_log if name == "eval/accuracy") == [0, 2, 3]
    assert sorted(step for name, step in wandb_log if name == "train/reward_mean") == [0, 1, 2]
    assert wandb_log["eval/accuracy", 3] == summary["accuracy_after"]

    assert logged["exit_code"] == 0  # the run was finished, not left to the process's exit
    assert wandb.run is None
    assert "WANDB_MODE" not in os.environ  # Lightning's offline switch does not outlive the run
    printed = capsys.readouterr()
    assert "wandb sync" in printed.out  # rlbench's own hint
    assert "wandb:" not in printed.out + printed.err  # W&B itself is silent


def test_resumed_run_continues_the_same_wandb_run(make_config, offline):
    first = make_config("logging.wandb=true", "logging.mlflow=false", "trainer.max_steps=2")
    train(first, progress_bar=False)
    out = Path(first.output_dir)
    run_id = (out / "wandb_run_id").read_text()
    config = make_config("logging.wandb=true", "logging.mlflow=false", "trainer.max_steps=4")
    train(config, resume=True, progress_bar=False)
    assert (out / "wandb_run_id").read_text() == run_id
    # offline, each process writes its own directory (offline-run-<time>-<id>, "-1" added when
    # two start in the same second); ``wandb sync`` puts both into the one W&B run
    runs = [read_offline_run(d) for d in (out / "wandb").glob("offline-run-*")]
    assert len(runs) == 2
    assert [r["run"].run_id for r in runs] == [run_id, run_id]
    assert [r["exit_code"] for r in runs] == [0, 0]
    steps = sorted(
        sorted(step for name, step in wandb_points(r["history"]) if name == "train/reward_mean") for r in runs
    )
    assert steps == [[0, 1], [2, 3]]  # the resumed process logs only the steps it took


def test_without_wandb_the_error_says_how_to_install_it(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    config = make_config("logging.wandb=true", "logging.mlflow=false")
    with pytest.raises(RLBenchError, match=r'logging.wandb=true needs wandb: pip install "rlbench\[wandb\]"'):
        train(config, progress_bar=False)
    assert not Path(config.output_dir).exists()  # refused before anything was written


def test_a_run_that_died_before_its_first_checkpoint_can_start_again(tmp_path: Path):
    out = tmp_path / "run"
    (out / "wandb" / "offline-run-20260101_000000-abc").mkdir(parents=True)
    for name in ("config.yaml", "wandb_run_id", "mlflow_run_id"):
        (out / name).write_text("x")
    assert stopped_before_first_checkpoint(out)


def test_wandb_project_is_checked(make_config):
    with pytest.raises(ConfigError, match=r"logging.wandb_project='a/b' is invalid: a W&B project name"):
        make_config("logging.wandb_project=a/b")
