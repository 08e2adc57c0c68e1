"""Lightning loggers for a run: CSV always, MLflow by default (an embedded SQLite store).

Every run under the same parent directory shares one SQLite store (``<parent>/mlflow.db``),
so ``mlflow ui --backend-store-uri sqlite:///<parent>/mlflow.db`` shows them side by side.
A resumed run continues its MLflow run (the run id is kept in the run directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlbench.config import RunConfig

MLFLOW_RUN_ID_FILE = "mlflow_run_id"


def mlflow_tracking_uri(config: RunConfig) -> str:
    if config.logging.mlflow_tracking_uri:
        return config.logging.mlflow_tracking_uri
    store = Path(config.output_dir).resolve().parent / "mlflow.db"
    return f"sqlite:///{store}"


def build_loggers(config: RunConfig, resume: bool) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    out = Path(config.output_dir)
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="", version="csv")]
    if config.logging.mlflow:
        run_id_file = out / MLFLOW_RUN_ID_FILE
        run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
        mlflow_logger = MLFlowLogger(
            experiment_name=config.logging.experiment,
            run_name=config.logging.run_name or out.resolve().name,
            tracking_uri=mlflow_tracking_uri(config),
            run_id=run_id,
            synchronous=False,  # metrics are written in the background, off the step's critical path
        )
        loggers.append(mlflow_logger)
    return loggers


def start_loggers(loggers: list[Any], config: RunConfig, resume: bool) -> None:
    """Creates the MLflow run now (so its id is on disk before the first step) and logs params."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            (Path(config.output_dir) / MLFLOW_RUN_ID_FILE).write_text(logger.run_id or "")
        if not resume:  # MLflow refuses to change a logged param, and a resume keeps them
            logger.log_hyperparams(config.flat())


def ui_command(config: RunConfig) -> str:
    return f"mlflow ui --backend-store-uri {mlflow_tracking_uri(config)}"
