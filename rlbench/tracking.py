"""Lightning loggers for a run: CSV always, MLflow by default (an embedded SQLite store), and
Weights & Biases with ``logging.wandb``.

Every run under the same parent directory shares one SQLite store (``<parent>/mlflow.db``),
so ``mlflow ui --backend-store-uri sqlite:///<parent>/mlflow.db`` shows them side by side.
W&B runs are written offline under ``<output_dir>/wandb`` (``wandb sync`` uploads them) unless
``WANDB_API_KEY`` is set. A resumed run continues its MLflow and W&B runs (their ids are kept
in the run directory).
"""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlbench.config import RunConfig
from rlbench.errors import RLBenchError

MLFLOW_RUN_ID_FILE = "mlflow_run_id"
#: The experiment tag the MLflow 3 UI reads to choose an experiment's first page (set by its
#: "experiment type" selector): with none, a new experiment opens on the GenAI overview of
#: traces and evaluations, empty for rlbench's training runs. "custom_model_development"
#: opens it on its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
WANDB_RUN_ID_FILE = "wandb_run_id"
#: Where W&B writes its runs, under ``output_dir`` (``offline-run-*`` without an API key).
WANDB_DIR = "wandb"


def mlflow_tracking_uri(config: RunConfig) -> str:
    if config.logging.mlflow_tracking_uri:
        return config.logging.mlflow_tracking_uri
    store = Path(config.output_dir).resolve().parent / "mlflow.db"
    return f"sqlite:///{store}"


def mark_experiment_kind(client: Any, experiment_id: str) -> None:
    """Tags the experiment as model training (``EXPERIMENT_KIND``) unless it has a kind already:
    a kind chosen in the UI stays."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def ensure_experiment(client: Any, name: str) -> str:
    """The id of the MLflow experiment ``name``, created (with its kind) if it does not exist.

    Another process may create it at the same moment (a worker of the same matrix or sweep on
    another machine): then its experiment is the one returned."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            pass
        found = client.get_experiment_by_name(name)
    mark_experiment_kind(client, found.experiment_id)  # one made before rlbench set kinds
    return found.experiment_id


def build_loggers(config: RunConfig, resume: bool) -> list[Any]:

    out = Path(config.output_dir)
    # flushed every step, so a killed run loses no row that a resume would not write again
    loggers: list[Any] = [resumable_csv_logger(out, flush_every=1)]
    if config.logging.mlflow:
        run_id_file = out / MLFLOW_RUN_ID_FILE
        run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
        mlflow_logger = mlflow_logger_class()(
            experiment_name=config.logging.experiment,
            run_name=config.logging.run_name or out.resolve().name,
            tracking_uri=mlflow_tracking_uri(config),
            run_id=run_id,
            synchronous=False,  # metrics are written in the background, off the step's critical path
        )
        loggers.append(mlflow_logger)
    if config.logging.wandb:
        loggers.append(wandb_logger(config, resume))
    return loggers


#: MLflow refuses ``@`` in metric names (Lightning would silently drop it: ``eval/pass@k`` ->
#: ``eval/passk``); rlbench writes it as ``_at_`` there, which ``metric_name`` reverses.
MLFLOW_AT = "_at_"


def mlflow_metric_key(name: str) -> str:
    """``eval/pass@4`` -> ``eval/pass_at_4``: a metric's name in MLflow."""
    return name.replace("@", MLFLOW_AT)


def metric_name(mlflow_key: str) -> str:
    """``eval/pass_at_4`` -> ``eval/pass@4``: the metric an MLflow key holds."""
    return mlflow_key.replace(MLFLOW_AT, "@")


def mlflow_logger_class() -> type:
    """Lightning's MLFlowLogger, writing ``@`` in metric names as ``_at_`` (see ``MLFLOW_AT``)."""
    from lightning.pytorch.loggers import MLFlowLogger

    class RLBenchMLFlowLogger(MLFlowLogger):
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            super().log_metrics({mlflow_metric_key(k): v for k, v in metrics.items()}, step)

        def flush(self) -> None:
            """Waits until every metric logged so far is stored.

            Called before each checkpoint: with asynchronous logging a SIGKILL could otherwise
            lose the metrics of a step that the checkpoint already counts as done, and a resume
            never computes that step again. MLflow keeps one logging queue per tracking store;
            the public ``mlflow.flush_async_logging`` only reaches the global tracking URI's.
            """
            if self._initialized:
                self.experiment._tracking_client.store.flush_async_logging()

    return RLBenchMLFlowLogger


def wandb_offline() -> bool:
    """Whether W&B runs are written offline: yes unless ``WANDB_API_KEY`` is set."""
    return not os.environ.get("WANDB_API_KEY")


def wandb_logger(config: RunConfig, resume: bool) -> Any:
    """Lightning's ``WandbLogger`` for the run, with the MLflow run's name and a run id kept in
    ``output_dir`` (a resumed run continues the same W&B run); RLBenchError without wandb."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise RLBenchError(
            'logging.wandb=true needs wandb: pip install "rlbench[wandb]" (or pip install wandb)'
        ) from None
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    class FinishingWandbLogger(WandbLogger):
        """Lightning's WandbLogger, except that it ends its W&B run when training ends, failed
        or not (Lightning's ``finalize`` leaves the run open until the process exits)."""

        _finished = False

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            # Lightning always passes anonymous=None, which recent wandb (0.31) warns about on the
            # console (before the run's own ``silent`` setting applies)
            self._wandb_init.pop("anonymous", None)

        @rank_zero_only
        def finalize(self, status: str) -> None:
            super().finalize(status)
            if self._experiment is not None and not self._finished:
                self._finished = True
                self._experiment.finish(exit_code=1 if status == "failed" else 0)

    out = Path(config.output_dir)
    id_file = out / WANDB_RUN_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
    return FinishingWandbLogger(
        project=config.logging.wandb_project,
        name=config.logging.run_name or out.resolve().name,
        group=config.logging.wandb_group,
        save_dir=str(out),  # W&B writes <output_dir>/wandb
        # Lightning sets WANDB_MODE for this; process_state_scope restores it after the run
        offline=wandb_offline(),
        id=run_id or secrets.token_hex(4),  # not the global RNGs: seeding is the run's own
        resume="allow",
        settings={"silent": True},  # no banners or sync hints on the console
    )


def code_commit() -> str | None:
    """The git commit of the rlbench code that runs (None outside a git checkout), with
    ``-dirty`` when its tracked files have uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def provenance(config: RunConfig) -> dict[str, Any]:
    """What reproduces a run besides its ``config.yaml``: the code commit, the library
    versions and the seeds (written as ``run.json`` and as MLflow tags)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "commit": code_commit(),
        "seed": config.seed,
        "warmstart_seed": config.warmstart_seed,
        "python": platform.python_version(),
        **{name: installed(name) for name in ("rlbench", "torch", "transformers", "lightning", "mlflow")},
        "reproduce": f"rlbench train --config {Path(config.output_dir) / 'config.yaml'}",
    }


def start_loggers(loggers: list[Any], config: RunConfig, resume: bool) -> None:
    """Creates the MLflow run now (so its id is on disk before the first step), logs params and
    tags the run with its provenance (code commit, library versions, seeds): MLflow tags, and
    ``rlbench.*`` entries of the W&B run's config."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    facts = provenance(config)
    tags = {**{f"rlbench.{k}": str(v) for k, v in facts.items()}, **config.logging.tags}
    out = Path(config.output_dir)
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            (out / MLFLOW_RUN_ID_FILE).write_text(logger.run_id or "")
            # Lightning creates a missing experiment without tags
            mark_experiment_kind(logger.experiment, logger.experiment_id)
        if isinstance(logger, WandbLogger):
            (out / WANDB_RUN_ID_FILE).write_text(logger.version or "")
        if not resume:  # MLflow refuses to change a logged param, and a resume keeps them
            logger.log_hyperparams(config.flat())
            if isinstance(logger, MLFlowLogger):
                for key, value in tags.items():
                    logger.experiment.set_tag(logger.run_id, key, value)
            if isinstance(logger, WandbLogger):
                facts = {f"rlbench.{k}": v for k, v in facts.items()}
                logger.experiment.config.update({**facts, **config.logging.tags})


def set_mlflow_tag(loggers: list[Any], key: str, value: str) -> None:
    """Tags the run's MLflow run (after training too: what stopped it)."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in loggers:
        if isinstance(logger, MLFlowLogger) and logger.run_id:
            logger.experiment.set_tag(logger.run_id, key, value)


def ui_command(config: RunConfig) -> str:
    return f"mlflow ui --backend-store-uri {mlflow_tracking_uri(config)}"


def resumable_csv_logger(out: Path, flush_every: int) -> Any:
    """Lightning's CSV logger, except that it appends to an existing ``metrics.csv``.

    Lightning's writer deletes the file it finds, which would throw away a resumed run's
    history; this one keeps it and carries on with its columns.
    """
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                    self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    from lightning.pytorch.utilities import rank_zero_only

    class ResumableCSVLogger(CSVLogger):
        @property
        def experiment(self) -> Any:
            if self._experiment is None and rank_zero_only.rank == 0:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return super().experiment

    return ResumableCSVLogger(save_dir=str(out), name="", version="csv", flush_logs_every_n_steps=flush_every)


def flush_metrics(loggers: list[Any]) -> None:
    """Stores every metric logged so far (see ``RLBenchMLFlowLogger.flush``); a checkpoint
    must never count a step as done whose metrics a kill could still lose."""
    for logger in loggers:
        flush = getattr(logger, "flush", None)
        if callable(flush):
            flush()


def logged_steps(loggers: list[Any]) -> list[dict[str, set[int]]]:
    """For each logger, the steps already recorded per metric (what a resumed run must not repeat).

    A run killed after its last checkpoint has logged steps that the resumed run computes
    again, identically; the module skips those instead of writing them twice. The steps are a
    set, not a high-water mark: MLflow's asynchronous logging writes batches from several
    threads, so a SIGKILL can leave step 7 stored and step 6 lost, and the resumed run must
    fill that gap. Other loggers (W&B, whose offline history is not read back) get nothing:
    they see those steps again.
    """
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    marks: list[dict[str, set[int]]] = []
    for logger in loggers:
        mark: dict[str, set[int]] = {}
        if isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "metrics.csv"
            if path.is_file():
                with path.open(newline="") as file:
                    for row in csv.DictReader(file):
                        for key, value in row.items():
                            if key != "step" and value not in ("", None):
                                mark.setdefault(key, set()).add(int(float(row["step"])))
        elif isinstance(logger, MLFlowLogger) and logger.run_id:
            client = logger.experiment
            for key in client.get_run(logger.run_id).data.metrics:
                mark[metric_name(key)] = {m.step for m in client.get_metric_history(logger.run_id, key)}
        marks.append(mark)
    return marks


def atomic_checkpoint_io() -> Any:
    """Checkpoint writes that a kill cannot tear: write a temporary file, then rename it."""
    import os

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            tmp = f"{path}.tmp"
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one

    return AtomicCheckpointIO()
