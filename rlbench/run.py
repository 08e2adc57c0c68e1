"""``train``: one RL run from a resolved config, start to finish (or resumed)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlbench.checkpoints import CHECKPOINT_DIR, LAST_CHECKPOINT
from rlbench.config import RunConfig, dump_yaml, with_resolved_precision
from rlbench.errors import RLBenchError
from rlbench.stopping import SigtermWatchdog

#: What a run writes before its first checkpoint: a directory holding only these (and its
#: ``config.yaml``) is a run that stopped before it saved anything, safe to start again.
#: Provenance of a run (code commit, library versions, seeds), beside its ``config.yaml``.
RUN_FILE = "run.json"
#: Why a run failed (its error and traceback), written when it raises; gone once it finishes.
FAILED_FILE = "failed.json"
EARLY_FILES = (
    "config.yaml",
    RUN_FILE,
    FAILED_FILE,
    "csv",
    "mlflow_run_id",
    "wandb",
    "wandb_run_id",
    CHECKPOINT_DIR,
)
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_libraries() -> None:
    """Keeps library chatter (download bars, tips) out of a run's output.

    Process-wide: ``train`` calls it inside ``process_state_scope``, which undoes it.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    for message in (
        r".*LeafSpec.*",  # Lightning 2.6 on torch 2.13: internal deprecation, not actionable
        r"Found .* module\(s\) in eval mode.*",
    ):
        warnings.filterwarnings("ignore", message=message)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def process_state_scope(num_threads: int) -> Iterator[None]:
    """Runs a block with the process-wide state a run changes, and restores it afterwards:
    torch's thread count, warning filters, global RNGs (``seed_everything``), the environment
    variables Lightning, tokenizers and W&B set, and library log levels. So runs made one after
    another in one process (``compare``, ``sweep``, tests) do not leak into each other."""
    import logging
    import random
    import warnings

    import numpy as np
    import torch
    import transformers

    hf_logging = transformers.utils.logging
    variables = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "TOKENIZERS_PARALLELISM", "WANDB_MODE")
    saved_env = {name: os.environ.get(name) for name in variables}
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    saved_levels = [logger.level for logger in loggers]
    saved_hf = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    saved_threads = torch.get_num_threads()
    saved_rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    saved_cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        with warnings.catch_warnings():
            quiet_libraries()
            if num_threads:
                torch.set_num_threads(num_threads)
            yield
    finally:
        torch.set_num_threads(saved_threads)
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
        if saved_cuda_rng is not None:
            torch.cuda.set_rng_state_all(saved_cuda_rng)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for logger, level in zip(loggers, saved_levels):
            logger.setLevel(level)
        hf_logging.set_verbosity(saved_hf[0])
        (hf_logging.enable_progress_bar if saved_hf[1] else hf_logging.disable_progress_bar)()


def kill_other_ranks(trainer: Any) -> None:
    """SIGKILLs the processes this one launched (Lightning's DDP ranks), if any: a forced stop
    cannot wait for ranks that may be stuck in the same collective.

    Lightning's child-process observer (a thread in the launching process) polls the same list
    of processes every few seconds and, on seeing one die by a signal, SIGKILLs the launcher
    itself, before the forced stop's other callbacks and its exit code. Emptying that list in
    place first leaves the observer nothing to watch: it ends quietly at its next poll.
    """
    launcher = trainer.strategy.launcher
    procs = list(getattr(launcher, "procs", None) or [])
    if not procs:
        return
    launcher.procs.clear()  # the very list the observer holds
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)  # the forced stop's backstop bounds us anyway


class LiveRow:
    """A counted row in Lightning's rich progress display, shaped like ``rlbench.progress.Counted``.

    While Lightning's rich bar is live it owns the terminal (stderr goes through its proxy,
    which holds a line until its newline), so a bar of our own drawn then never shows: work
    inside training (evaluation) adds a row to that display instead, with its count and ETA.
    """

    def __init__(self, callback: Any, total: int, desc: str) -> None:
        self.callback, self.progress = callback, callback.progress
        self.bar: Any = self.progress.add_task(desc, total=total)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.progress.update(self.bar, advance=n)
            self.callback.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.progress.remove_task(self.bar)
            self.bar = None
            self.callback.refresh()

    def __enter__(self) -> LiveRow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bars_beside(trainer: Any) -> Any:
    """Makes bars for work done while ``trainer`` trains: a row of its rich display when that
    draws on a terminal, else a bar of our own (tqdm, which sits beside Lightning's tqdm bar)."""
    from lightning.pytorch.callbacks import RichProgressBar

    from rlbench.progress import counted

    def make(total: int, desc: str, enabled: bool | None = None) -> Any:
        callback = trainer.progress_bar_callback
        live = getattr(callback, "progress", None) if isinstance(callback, RichProgressBar) else None
        if live is not None and enabled is not False:
            if not live.console.is_terminal:  # a log file: quiet, as a bar of our own would be
                return counted(total, desc, False)
            return LiveRow(callback, total, desc)
        return counted(total, desc, enabled)

    return make


def mark_mlflow_runs(loggers: list[Any], status: str) -> None:
    """Ends the run's MLflow run with ``status`` (from another thread: a new client)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    for logger in loggers:
        if isinstance(logger, MLFlowLogger) and logger.run_id:
            MlflowClient(logger._tracking_uri).set_terminated(logger.run_id, status)


def is_launcher_process() -> bool:
    """Whether this is rank 0 (or a single-process run).

    Multi-process strategies (``ddp``) re-run the whole command once per extra process with
    these variables set; only rank 0 checks and prepares the run directory.
    """
    return all(int(os.environ.get(name, "0")) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def stopped_before_first_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a run that ended (crash, kill) before it saved any checkpoint:
    its ``config.yaml`` and early logs, no checkpoint, no summary. Nothing in it is worth
    keeping, and the run can only start again."""
    names = {p.name for p in out.iterdir()}
    checkpoints = out / CHECKPOINT_DIR
    return (
        "config.yaml" in names
        and names <= set(EARLY_FILES)
        and not (checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")))
    )


def check_run_dir(config: RunConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite or to resume nothing.

    A directory left by a run that stopped before its first checkpoint is cleared and started
    again (with or without ``--resume``): it holds no finished work.
    """
    out = Path(config.output_dir)
    last = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not is_launcher_process():  # rank 0 has checked, and has already started writing
        return last if resume and last.is_file() else None
    if out.is_dir() and any(out.iterdir()) and stopped_before_first_checkpoint(out):
        print(f"output_dir={str(out)!r}: its run stopped before the first checkpoint; starting it again")
        for name in EARLY_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return None
    if resume and not last.is_file():
        raise RLBenchError(f"--resume: no checkpoint at {str(last)!r}; start the run without --resume")
    if resume and not zipfile.is_zipfile(last):  # torch.save writes a zip archive
        raise RLBenchError(
            f"--resume: {str(last)!r} is not a readable checkpoint (corrupt or truncated); "
            f"resume from another checkpoint in {str(last.parent)!r} by copying it to {LAST_CHECKPOINT!r}"
        )
    if not resume and out.is_dir() and any(out.iterdir()):
        raise RLBenchError(
            f"output_dir={str(out)!r} already holds a run; pass --resume to continue it, "
            f"or choose another output_dir"
        )
    return last if resume else None


def train(
    config: RunConfig,
    resume: bool = False,
    progress_bar: bool = True,
    callbacks: list[Any] | None = None,
    watchdog: SigtermWatchdog | None = None,
) -> dict[str, Any]:
    """Warm start (cached) -> RL training -> final eval. Returns the run's summary.

    ``callbacks`` are extra Lightning callbacks (benchmark timers, sweep pruners). Process-wide
    state the run changes (threads, RNGs, warning filters) is restored when it returns. With a
    SIGTERM ``watchdog`` (the CLI installs one), a run stuck in a collective still ends on
    SIGTERM: other ranks are killed and the MLflow run is marked KILLED; checkpoints are
    written atomically, so the last one is intact for ``--resume``.
    """
    checkpoint = check_run_dir(config, resume)
    failed = Path(config.output_dir) / FAILED_FILE
    # set once the run directory is being written: a failure before it (a refused start) leaves
    # the directory as it was, one after it is recorded there
    writing = threading.Event()
    try:
        with process_state_scope(config.trainer.num_threads):
            summary = _train(config, checkpoint, progress_bar, callbacks or [], watchdog, writing)
    except Exception as err:
        if is_launcher_process() and writing.is_set():
            record_failure(failed, err)
        raise
    failed.unlink(missing_ok=True)  # a failed run, resumed to its end
    return summary


def record_failure(path: Path, err: BaseException) -> None:
    """Writes why the run failed into its directory, for ``rlbench compare``'s report."""
    import traceback

    message = str(err).strip().splitlines()
    error = (
        f"{type(err).__name__}: {message[0] if message else ''}"
        if not isinstance(err, RLBenchError)
        else str(err)
    )
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    path.write_text(json.dumps({"error": error, "traceback": trace}, indent=1))


def _train(
    config: RunConfig,
    checkpoint: Path | None,
    progress_bar: bool,
    callbacks: list[Any],
    watchdog: SigtermWatchdog | None,
    writing: threading.Event,
) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from rlbench.checkpoints import RolloutStepCheckpoint
    from rlbench.data import StepTicks
    from rlbench.diagnostics import CostMeter, EntropyCollapse, diagnostics_callbacks
    from rlbench.module import RLModule
    from rlbench.registry import TASKS
    from rlbench.tracking import (
        WANDB_DIR,
        atomic_checkpoint_io,
        build_loggers,
        logged_steps,
        mlflow_tracking_uri,
        provenance,
        set_mlflow_tag,
        start_loggers,
        ui_command,
        wandb_offline,
    )
    from rlbench.warmstart import base_model_path, warm_start

    resume = checkpoint is not None
    started = time.perf_counter()
    # resolved once, here: the warm start, the Trainer, config.yaml and the logged params all
    # see the precision this machine runs, never "auto"
    config, chosen = with_resolved_precision(config)
    if is_launcher_process():
        print(chosen)
    # builds objects only (nothing is written yet); first, so that a missing optional logger
    # (wandb) fails before the warm start
    loggers = build_loggers(config, resume)
    if config.warmstart.enabled:
        # rank 0 builds (or finds) it before the other processes start, so they find it cached
        model_path, info = warm_start(config, quiet=not progress_bar)
        print(
            f"warm start: {model_path} (validation accuracy {info['accuracy']:.3f} after "
            f"{info['steps']} steps)"
        )
    else:
        model_path = base_model_path(config, TASKS.get(config.task.name)(config.task.options))
    out = Path(config.output_dir)
    pl.seed_everything(config.seed, verbose=False)
    module = RLModule(config, model_path)
    max_steps = config.trainer.max_steps
    checkpoints = RolloutStepCheckpoint(out / CHECKPOINT_DIR, config.trainer.checkpoint_every, max_steps)
    # before the checkpoint callback: a checkpoint holds the diagnostics of its own step
    diagnostics = diagnostics_callbacks(config)
    try:
        trainer = pl.Trainer(
            # the module stops at max_steps rollout steps; Lightning counts optimiser steps, at
            # most passes x minibatches per rollout step, so this bound never cuts a run short
            max_steps=max_steps * module.optimizer_steps_per_rollout_step,
            accelerator=config.trainer.accelerator,
            devices=config.trainer.devices,
            num_nodes=config.trainer.num_nodes,
            strategy=config.trainer.strategy,
            precision=config.trainer.precision,
            logger=loggers,
            callbacks=[*diagnostics, checkpoints, *callbacks],
            enable_checkpointing=False,  # RolloutStepCheckpoint saves, on the rollout-step clock
            plugins=[atomic_checkpoint_io()],
            log_every_n_steps=1,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
            default_root_dir=str(out),
        )
    except (ValueError, TypeError, MisconfigurationException) as err:  # Lightning refused the settings
        t = config.trainer
        settings = (
            f"trainer.accelerator={t.accelerator!r}, trainer.strategy={t.strategy!r}, "
            f"trainer.devices={t.devices!r}, trainer.num_nodes={t.num_nodes}, "
            f"trainer.precision={t.precision!r}"
        )
        raise RLBenchError(f"{settings}: rejected by Lightning: {err}") from None
    if not progress_bar:  # --no-progress: eval's bar too (without a terminal it is off anyway)
        module.evaluator.progress = False
    module.evaluator.bars = bars_beside(trainer)
    # everything is validated: only now does the run directory get written
    writing.set()
    if is_launcher_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(config))
        if not resume:
            (out / RUN_FILE).write_text(json.dumps(provenance(config), indent=1))
        start_loggers(loggers, config, resume)
        if resume:
            module.logged_steps = logged_steps(loggers)
        if config.logging.mlflow:
            print(f"MLflow tracking URI: {mlflow_tracking_uri(config)}\n  open it with: {ui_command(config)}")
        if config.logging.wandb and wandb_offline():
            print(f"W&B: offline run under {out / WANDB_DIR}\n  upload it with: wandb sync {out / WANDB_DIR}")
    if watchdog is not None:
        watchdog.on_forced_stop(lambda: kill_other_ranks(trainer))
        if is_launcher_process():
            watchdog.on_forced_stop(lambda: mark_mlflow_runs(loggers, "KILLED"))
    trainer.fit(module, train_dataloaders=StepTicks(), ckpt_path=str(checkpoint) if checkpoint else None)
    history = module.eval_history
    collapse = next(c for c in diagnostics if isinstance(c, EntropyCollapse))
    cost = next(c for c in diagnostics if isinstance(c, CostMeter))
    summary = {
        "output_dir": str(out),
        "algorithm": config.algorithm.name,
        "task": config.task.name,
        "steps": module.rollout_step,
        "optimizer_steps": trainer.global_step,
        "accuracy_before": history[0][1] if history else None,
        "accuracy_after": history[-1][1] if history else None,
        "eval_history": history,
        "collapse_step": collapse.collapse_step,
        "stopped_by": cost.stopped_by,
        "cost": {**cost.totals, "cost/wall_s": cost.wall_s()},
        "wall_s": time.perf_counter() - started,
        "model_path": model_path,
        "mlflow_tracking_uri": mlflow_tracking_uri(config) if config.logging.mlflow else None,
    }
    if trainer.is_global_zero:
        from rlbench.lora import export_model  # merges LoRA adapters: a plain HF checkpoint

        export_model(module.policy, module.tokenizer, out / "final_model")
        if cost.stopped_by is not None:
            set_mlflow_tag(loggers, "rlbench.stopped_by", cost.stopped_by)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
