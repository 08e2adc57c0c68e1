"""The runs of a matrix read back as plain records, from its directory or from MLflow alone.

A report is built from ``RunRecord``s only, and both sources give the same records: the CSV
log and the MLflow run hold the same metric values at the same steps, and every cell's
coordinates are MLflow tags. So ``rlbench report --experiment NAME`` on a machine that only
sees the tracking server rebuilds the table ``rlbench compare`` wrote.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlbench.errors import RLBenchError
from rlbench.matrix import MATRIX_FILE, Matrix, parse_matrix
from rlbench.typecheck import flatten

DONE, FAILED, NOT_FINISHED = "done", "failed", "not finished"
#: Per-run facts a report states (code commit, warm-start seed, what stopped it, eval.samples).
INFO_KEYS = ("commit", "warmstart_seed", "stopped_by", "eval_samples")

Curve = list[tuple[int, float]]


@dataclass
class RunRecord:
    cell: str
    task: str
    algorithm: str
    seed: int
    noise: float | None
    status: str
    cause: str | None = None
    metrics: dict[str, Curve] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    algorithm_params: dict[str, str] = field(default_factory=dict)
    """The run's algorithm options as MLflow logs them, ``algorithm.<name>.<field>`` to their
    text, from either source: what the report rebuilds the algorithm from (``seed_varies``)."""

    def curve(self, name: str) -> Curve:
        return self.metrics.get(name, [])

    def last(self, name: str) -> float | None:
        values = self.curve(name)
        return values[-1][1] if values else None

    def at_step(self, name: str, step: int) -> float | None:
        """The value of ``name`` logged at ``step`` exactly, or None."""
        return next((v for s, v in self.curve(name) if s == step), None)


@dataclass
class Experiment:
    """What a report is made of: the matrix (its axes) and one record per cell."""

    matrix: Matrix
    records: list[RunRecord]
    source: str


def _curves(rows: list[tuple[str, int, float]]) -> dict[str, Curve]:
    """``(name, step, value)`` rows as step-sorted curves; a step logged twice keeps its last value."""
    by_name: dict[str, dict[int, float]] = {}
    for name, step, value in rows:
        if math.isfinite(value):
            by_name.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in sorted(by_name.items())}


def read_csv_metrics(path: Path) -> dict[str, Curve]:
    rows: list[tuple[str, int, float]] = []
    if path.is_file():
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                step = int(float(row["step"]))
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        rows.append((key, step, float(value)))
    return _curves(rows)


def from_directory(directory: str | Path) -> Experiment:
    """The records of the matrix in ``directory`` (its ``matrix.yaml`` and ``runs/``)."""
    out = Path(directory)
    matrix_file = out / MATRIX_FILE
    if not matrix_file.is_file():
        raise RLBenchError(
            f"{str(out)!r} holds no {MATRIX_FILE}: not the output_dir of an `rlbench compare` matrix"
        )
    import yaml

    matrix = parse_matrix(yaml.safe_load(matrix_file.read_text()), matrix_file, output_dir=out)
    causes = _store_causes(matrix)
    records = []
    for cell in matrix.cells():
        name = matrix.cell_name(cell)
        run_dir = matrix.run_dir(cell)
        record = RunRecord(name, cell.task, cell.algorithm, cell.seed, cell.noise, NOT_FINISHED)
        record.metrics = read_csv_metrics(run_dir / "csv" / "metrics.csv")
        summary = _json(run_dir / "summary.json")
        run = _json(run_dir / "run.json")
        failed = _json(run_dir / "failed.json")
        if summary:
            record.status = DONE
        elif failed or name in causes:
            record.status, record.cause = FAILED, (failed or {}).get("error") or causes.get(name)
        config = _yaml(run_dir / "config.yaml")
        record.info = _info(
            commit=run.get("commit"),
            warmstart_seed=run.get("warmstart_seed"),
            stopped_by=summary.get("stopped_by"),
            eval_samples=(config.get("eval") or {}).get("samples"),
        )
        options = ((config.get("algorithm") or {}).get(cell.algorithm)) or {}
        prefix = f"algorithm.{cell.algorithm}."
        # str(value)[:250] is what Lightning's MLflow logger stores: the two sources agree
        record.algorithm_params = {f"{prefix}{k}": str(v)[:250] for k, v in flatten(options)}
        records.append(record)
    return Experiment(matrix, records, f"directory {out}")


def _store_causes(matrix: Matrix) -> dict[str, str]:
    """Failure causes the default cell store recorded (runs killed before they could write one)."""
    db = matrix.output_dir / "cells.db"
    if not db.is_file():
        return {}
    from rlbench.cellstore import CellStore

    store = CellStore(f"sqlite:///{db.resolve()}", matrix.name)
    try:
        return {r.cell: r.cause or "failed" for r in store.rows() if r.state == FAILED}
    finally:
        store.dispose()


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _info(**values: Any) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v not in (None, "None")}


def from_mlflow(experiment: str, tracking_uri: str) -> Experiment:
    """The records of the matrix logged to MLflow experiment ``experiment``, from MLflow alone."""
    from mlflow import MlflowClient

    from rlbench.tracking import metric_name

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise RLBenchError(
            f"--experiment {experiment!r}: no such MLflow experiment at {tracking_uri}; "
            f"experiments there: {', '.join(names) or 'none'}"
        )
    tag = found.tags.get("rlbench.matrix")
    if not tag:
        raise RLBenchError(
            f"--experiment {experiment!r} was not written by `rlbench compare` (no matrix tag)"
        )
    data = json.loads(tag)
    data["base"] = {}
    matrix = parse_matrix(data, Path(f"mlflow:{experiment}"), output_dir=data["output_dir"])
    runs = client.search_runs(
        [found.experiment_id], max_results=50_000, order_by=["attributes.start_time ASC"]
    )
    by_cell: dict[str, Any] = {}
    for run in runs:
        name = run.data.tags.get("rlbench.cell")
        if name is None:
            continue
        kept = by_cell.get(name)
        # a cell restarted from scratch has an older, unfinished run: keep the one that finished
        if kept is None or kept.info.status != "FINISHED":
            by_cell[name] = run
    records = []
    for cell in matrix.cells():
        name = matrix.cell_name(cell)
        record = RunRecord(name, cell.task, cell.algorithm, cell.seed, cell.noise, NOT_FINISHED)
        run = by_cell.get(name)
        if run is not None:
            rows = [
                (metric_name(key), m.step, m.value)
                for key in run.data.metrics
                for m in client.get_metric_history(run.info.run_id, key)
            ]
            record.metrics = _curves(rows)
            tags = run.data.tags
            if run.info.status == "FINISHED":
                record.status = DONE
            elif run.info.status in ("FAILED", "KILLED"):
                record.status, record.cause = FAILED, tags.get("rlbench.failure", run.info.status.lower())
            record.info = _info(
                commit=tags.get("rlbench.commit"),
                warmstart_seed=tags.get("rlbench.warmstart_seed"),
                stopped_by=tags.get("rlbench.stopped_by"),
                eval_samples=run.data.params.get("eval.samples"),
            )
            prefix = f"algorithm.{cell.algorithm}."
            record.algorithm_params = {k: v for k, v in run.data.params.items() if k.startswith(prefix)}
        records.append(record)
    return Experiment(matrix, records, f"MLflow experiment {experiment!r} at {tracking_uri}")
