"""Reproducibility: a warm start with its own seed, each run's provenance, and a run rebuilt
from its own config.yaml."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from rlbench.config import load_config
from rlbench.run import train
from rlbench.warmstart import base_model_path, warmstart_dir
from tasks.arithmetic import Arithmetic, ArithmeticConfig


def test_a_fixed_warmstart_seed_gives_every_run_seed_the_same_start(make_config):
    runs = [make_config(f"seed={seed}", "warmstart.seed=7") for seed in (0, 1, 2)]
    assert len({warmstart_dir(c) for c in runs}) == 1
    task = Arithmetic(ArithmeticConfig())
    assert len({base_model_path(c, task) for c in runs}) == 1  # the same preset weights too
    # by default the warm start follows the run's seed (and keeps the cache keys it had)
    own = [make_config(f"seed={seed}") for seed in (0, 1)]
    assert own[0].warmstart_seed == 0 and own[1].warmstart_seed == 1
    assert warmstart_dir(own[0]) != warmstart_dir(own[1])
    assert warmstart_dir(make_config("seed=7")) == warmstart_dir(runs[0])


def loss_series(output_dir: Path) -> list[float]:
    rows = csv.DictReader((output_dir / "csv" / "metrics.csv").open())
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_a_run_records_its_provenance_and_reruns_from_its_config(make_config, tmp_path: Path):
    config = make_config("warmstart.seed=3")  # MLflow on: the tags are checked below
    train(config, progress_bar=False)
    out = Path(config.output_dir)
    provenance = json.loads((out / "run.json").read_text())
    assert provenance["seed"] == 0 and provenance["warmstart_seed"] == 3
    assert provenance["torch"] and provenance["transformers"] and provenance["lightning"]
    assert provenance["commit"] is None or len(provenance["commit"].removesuffix("-dirty")) == 40
    assert provenance["reproduce"] == f"rlbench train --config {out / 'config.yaml'}"

    from mlflow.tracking import MlflowClient

    from rlbench.tracking import mlflow_tracking_uri

    client = MlflowClient(mlflow_tracking_uri(config))
    tags = client.get_run((out / "mlflow_run_id").read_text()).data.tags
    assert tags["rlbench.warmstart_seed"] == "3" and tags["rlbench.torch"] == provenance["torch"]

    again = load_config(out / "config.yaml", [f"output_dir={tmp_path / 'again'}", "logging.mlflow=false"])
    train(again, progress_bar=False)
    assert len(loss_series(out)) == 3 and loss_series(tmp_path / "again") == loss_series(out)
