"""``rlbench compare``: run every cell of a matrix, resumably, on one or many workers, then report.

Each cell runs as its own ``rlbench train`` process, so one cell's crash, memory or DDP
launch (Lightning re-runs the command per rank) cannot touch the others or the worker. The
worker claims cells from a ``CellStore`` (SQLite in ``output_dir`` by default, any database
with ``--storage``), so any number of workers, here (``--workers K``) or on other machines,
share one matrix and each cell runs once. Re-running the command resumes: finished cells are
skipped, a cell whose worker died is resumed from its last checkpoint, failed cells are
reported (and retried with ``--retry-failed``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rlbench.cellstore import DONE, FAILED, PENDING, RUNNING, CellStore, Heartbeat
from rlbench.config import dump_yaml
from rlbench.config_files import read_yaml
from rlbench.errors import ERROR_FILE_ENV, RLBenchError
from rlbench.matrix import LOGS_DIR, MATRIX_FILE, Matrix, MatrixError, load_matrix
from rlbench.progress import ENV, MatrixStatus, clock
from rlbench.run import FAILED_FILE
from rlbench.workers import run_workers, this_worker

SUMMARY_FILE = "summary.json"
CONFIGS_DIR = "configs"


def default_storage(matrix: Matrix) -> str:
    return f"sqlite:///{matrix.output_dir.resolve() / 'cells.db'}"


def compare(
    path: str | Path,
    output_dir: str | Path | None = None,
    storage: str | None = None,
    workers: int = 1,
    retry_failed: bool = False,
    progress_bar: bool | None = None,
    report: bool = True,
) -> int:
    """Runs the matrix in ``path`` to the end and writes its report. Exit status: 0 when every
    cell finished, 1 when some failed (they are in the report), 3 when cells are still running
    on other workers (run ``rlbench report`` when they finish)."""
    if workers < 1:
        raise RLBenchError(f"--workers={workers} is invalid: at least 1")
    matrix = load_matrix(path, output_dir)
    prepare(matrix)
    url = storage or default_storage(matrix)
    store = CellStore(url, matrix.name)
    names = [matrix.cell_name(c) for c in matrix.cells()]
    store.create(names)
    for cell in matrix.cells():  # finished before the store knew (or on another store)
        if (matrix.run_dir(cell) / SUMMARY_FILE).is_file():
            store.mark_done(matrix.cell_name(cell))
    counts = store.counts(names)
    print(
        f"matrix {matrix.name!r}: {len(names)} cells ({counts[DONE]} done, {counts[FAILED]} failed, "
        f"{counts[RUNNING]} running, {counts[PENDING]} left); runs in {matrix.output_dir / 'runs'}"
    )
    started = time.time()
    if workers == 1:
        bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        work(matrix, store, retry_failed, started, workers=1, progress_bar=bar)
    else:
        spawn_workers(path, matrix.output_dir, url, workers, retry_failed)
    rows = store.rows(names)
    store.dispose()
    failed = [r for r in rows if r.state == FAILED]
    unfinished = [r for r in rows if r.state in (PENDING, RUNNING)]
    for row in failed:
        print(f"  failed: {row.cell}: {row.cause}", file=sys.stderr)
    if unfinished:
        print(
            f"{len(unfinished)} cells are still running or left on other workers; when they finish: "
            f"rlbench report {matrix.output_dir}"
        )
        return 3
    if report:
        from rlbench.report import write_report

        written = write_report(matrix.output_dir)
        print(f"report: {written}")
    return 1 if failed else 0


def prepare(matrix: Matrix) -> None:
    """Checks that ``output_dir`` holds this matrix (or nothing yet), writes ``matrix.yaml``
    and each cell's config, and creates the MLflow experiment once, before any worker starts
    (two processes creating one SQLite store at once fail)."""
    out = matrix.output_dir
    for cell in matrix.cells():
        written = matrix.run_dir(cell) / "config.yaml"
        if written.is_file() and read_yaml(written) != _plain(matrix.cell_config(cell)):
            raise MatrixError(
                f"{matrix.source}: cell {matrix.cell_name(cell)}: {written} was run with another config "
                f"than the matrix gives it now; use another output_dir, or delete that run directory"
            )
    (out / CONFIGS_DIR).mkdir(parents=True, exist_ok=True)
    (out / LOGS_DIR).mkdir(exist_ok=True)
    (out / MATRIX_FILE).write_text(matrix.dump())
    for cell in matrix.cells():
        (out / CONFIGS_DIR / f"{matrix.cell_name(cell)}.yaml").write_text(dump_yaml(matrix.cell_config(cell)))
    first = matrix.cell_config(matrix.cells()[0])
    if first.logging.mlflow:
        import logging

        import mlflow

        from rlbench.tracking import ensure_experiment

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its schema set-up chatter

        client = mlflow.MlflowClient(matrix.tracking_uri())
        # created with its kind, so MLflow 3's UI opens it on its runs (or found: another
        # worker on another machine may have made it a moment ago)
        experiment_id = ensure_experiment(client, matrix.name)
        client.set_experiment_tag(experiment_id, "rlbench.matrix", json.dumps(matrix_tag(matrix)))


def matrix_tag(matrix: Matrix) -> dict[str, Any]:
    """The matrix without its base config: what the report needs to rebuild from MLflow alone."""
    data = matrix.to_dict()
    data.pop("base")
    data.pop("set", None)
    return data


def _plain(config: Any) -> Any:
    import yaml

    return yaml.safe_load(dump_yaml(config))


def spawn_workers(path: str | Path, output_dir: Path, url: str, workers: int, retry_failed: bool) -> None:
    """Starts ``workers`` worker processes on the same store and waits for them all."""
    command = [sys.executable, "-m", "rlbench.cli", "compare", str(path), "--worker"]
    command += ["--output-dir", str(output_dir), "--storage", url]
    if retry_failed:
        command.append("--retry-failed")
    run_workers(command, workers)


def work(
    matrix: Matrix,
    store: CellStore,
    retry_failed: bool,
    started: float,
    workers: int,
    progress_bar: bool,
) -> None:
    """Claims and runs cells until none is left."""
    worker = this_worker()
    cells = {matrix.cell_name(c): c for c in matrix.cells()}
    names = list(cells)
    while (name := store.claim(names, worker, retry_failed)) is not None:
        run_dir = matrix.run_dir(cells[name])
        if (run_dir / SUMMARY_FILE).is_file():
            store.finish(name, worker, DONE)
            continue
        rows = store.rows(names)
        walls = [r.wall_s for r in rows if r.state == DONE and r.wall_s]
        status = MatrixStatus(
            cell=name,
            done=sum(r.state == DONE for r in rows),
            failed=sum(r.state == FAILED for r in rows),
            running=sum(r.state == RUNNING for r in rows),
            left=sum(r.state == PENDING for r in rows),
            started=started,
            cell_s=sum(walls) / len(walls) if walls else None,
            workers=workers,
        )
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        print(f"[{status.line()}] {name}: {'resuming' if resume else 'starting'}", flush=True)
        cell_started = time.time()
        with Heartbeat(store, name, worker):
            try:
                code, log = run_cell(matrix, name, resume, status, progress_bar)
            except BaseException:  # Ctrl-C, or the worker is being stopped: the cell is not done
                store.release(name, worker)
                raise
        wall = time.time() - cell_started
        if code == 0 and (run_dir / SUMMARY_FILE).is_file():
            store.finish(name, worker, DONE, wall_s=wall)
            summary = json.loads((run_dir / SUMMARY_FILE).read_text())
            print(f"  {name}: done in {clock(wall)}{_accuracy(summary)}", flush=True)
        else:
            cause = failure_cause(run_dir, matrix.output_dir / LOGS_DIR / f"{name}.error.json", code, log)
            store.finish(name, worker, FAILED, cause=cause, wall_s=wall)
            try:
                mark_failed_in_mlflow(matrix, run_dir, cause)
            except Exception as err:  # noqa: BLE001 - the store has it; the matrix goes on
                print(f"  {name}: could not mark its MLflow run failed ({err})", file=sys.stderr)
            print(f"  {name}: FAILED ({cause}); the matrix goes on", file=sys.stderr, flush=True)


def _accuracy(summary: dict[str, Any]) -> str:
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is None or after is None:
        return ""
    return f", eval accuracy {before:.3f} -> {after:.3f}"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the worker dies, even by SIGKILL (Linux), so no
    orphaned run writes into a cell another worker has taken over."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_cell(
    matrix: Matrix, name: str, resume: bool, status: MatrixStatus, progress_bar: bool
) -> tuple[int, Path | None]:
    """Runs one cell's ``rlbench train``; its exit code and the log file (None: the terminal)."""
    config = matrix.output_dir / CONFIGS_DIR / f"{name}.yaml"
    command = [sys.executable, "-m", "rlbench.cli", "train", "--config", str(config)]
    if resume:
        command.append("--resume")
    if not progress_bar:
        command.append("--no-progress")
    error_file = matrix.output_dir / LOGS_DIR / f"{name}.error.json"
    error_file.unlink(missing_ok=True)
    env = {**os.environ, ENV: status.to_env(), ERROR_FILE_ENV: str(error_file)}
    log = None if progress_bar else matrix.output_dir / LOGS_DIR / f"{name}.log"
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    if log is None:
        proc = subprocess.Popen(command, env=env, preexec_fn=preexec)
    else:
        with log.open("a") as sink:
            proc = subprocess.Popen(
                command, env=env, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=preexec
            )
    try:
        return proc.wait(), log
    except BaseException:
        proc.terminate()  # the run saves nothing half-written (atomic checkpoints)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def failure_cause(run_dir: Path, error_file: Path, code: int, log: Path | None) -> str:
    """Why a cell's run failed: the error it recorded (in its run directory if it had started,
    else in ``error_file``), else how its process ended."""
    for recorded in (run_dir / FAILED_FILE, error_file):
        if recorded.is_file():
            try:
                return str(json.loads(recorded.read_text())["error"])
            except (ValueError, KeyError):
                pass
    if code < 0:
        how = f"killed by {signal.Signals(-code).name}"
    else:
        how = f"exit status {code}"
    if log is not None and log.is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return f"{how}: {lines[-1][:300]}"
    return how


def mark_failed_in_mlflow(matrix: Matrix, run_dir: Path, cause: str) -> None:
    """Ends a failed cell's MLflow run as FAILED with its cause (a killed run cannot itself)."""
    from rlbench.tracking import MLFLOW_RUN_ID_FILE

    id_file = run_dir / MLFLOW_RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient(matrix.tracking_uri())
    client.set_tag(run_id, "rlbench.failure", cause[:5000])
    client.set_terminated(run_id, "FAILED")


def worker_main(
    path: str | Path, output_dir: str | Path | None, storage: str | None, retry_failed: bool
) -> int:
    """One worker of ``--workers K``: runs cells, no report (the command that started it writes it)."""
    matrix = load_matrix(path, output_dir)
    store = CellStore(storage or default_storage(matrix), matrix.name)
    try:
        work(matrix, store, retry_failed, time.time(), workers=1, progress_bar=False)
    finally:
        store.dispose()
    return 0
