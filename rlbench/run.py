"""``train``: one RL run from a resolved config, start to finish (or resumed)."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

from rlbench.config import RunConfig, dump_yaml
from rlbench.errors import RLBenchError

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"


def quiet_libraries() -> None:
    """Keeps library chatter (download bars, tips) out of a run's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    for message in (
        r".*LeafSpec.*",  # Lightning 2.6 on torch 2.13: internal deprecation, not actionable
        r"Using ModelCheckpoint with manual optimization.*",  # we save after the update on purpose
        r"Found .* module\(s\) in eval mode.*",
    ):
        warnings.filterwarnings("ignore", message=message)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def is_launcher_process() -> bool:
    """Whether this is rank 0 (or a single-process run).

    Multi-process strategies (``ddp``) re-run the whole command once per extra process with
    these variables set; only rank 0 checks and prepares the run directory.
    """
    return all(int(os.environ.get(name, "0")) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def check_run_dir(config: RunConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite or to resume nothing."""
    out = Path(config.output_dir)
    last = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not is_launcher_process():  # rank 0 has checked, and has already started writing
        return last if resume else None
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
    config: RunConfig, resume: bool = False, progress_bar: bool = True, callbacks: list[Any] | None = None
) -> dict[str, Any]:
    """Warm start (cached) -> RL training -> final eval. Returns the run's summary.

    ``callbacks`` are extra Lightning callbacks (benchmark timers, sweep pruners).
    """
    checkpoint = check_run_dir(config, resume)
    quiet_libraries()
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from rlbench.data import StepTicks
    from rlbench.module import RLModule
    from rlbench.registry import TASKS
    from rlbench.tracking import (
        atomic_checkpoint_io,
        build_loggers,
        logged_steps,
        mlflow_tracking_uri,
        start_loggers,
        ui_command,
    )
    from rlbench.warmstart import base_model_path, warm_start

    if config.trainer.num_threads:
        torch.set_num_threads(config.trainer.num_threads)
    started = time.perf_counter()
    if config.warmstart.enabled:
        # rank 0 builds (or finds) it before the other processes start, so they find it cached
        model_path, info = warm_start(config, quiet=not progress_bar)
        print(f"warm start: {model_path} (eval accuracy {info['accuracy']:.3f} after {info['steps']} steps)")
    else:
        model_path = base_model_path(config, TASKS.get(config.task.name)(config.task.options))
    out = Path(config.output_dir)
    pl.seed_everything(config.seed, verbose=False)
    module = RLModule(config, model_path)
    loggers = build_loggers(config, resume)  # builds objects only: nothing is written yet
    checkpoints = ModelCheckpoint(
        dirpath=out / CHECKPOINT_DIR,
        filename="step-{step}",
        every_n_train_steps=config.trainer.checkpoint_every,
        save_top_k=1,
        monitor=None,
        save_last=True,
    )
    try:
        trainer = pl.Trainer(
            max_steps=config.trainer.max_steps,
            accelerator=config.trainer.accelerator,
            devices=config.trainer.devices,
            num_nodes=config.trainer.num_nodes,
            strategy=config.trainer.strategy,
            precision=config.trainer.precision,
            logger=loggers,
            callbacks=[checkpoints, *(callbacks or [])],
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
    # everything is validated: only now does the run directory get written
    if is_launcher_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(config))
        start_loggers(loggers, config, resume)
        if resume:
            module.logged_steps = logged_steps(loggers)
        if config.logging.mlflow:
            print(f"MLflow tracking URI: {mlflow_tracking_uri(config)}\n  open it with: {ui_command(config)}")
    trainer.fit(module, train_dataloaders=StepTicks(), ckpt_path=str(checkpoint) if checkpoint else None)
    history = module.eval_history
    summary = {
        "output_dir": str(out),
        "algorithm": config.algorithm.name,
        "task": config.task.name,
        "steps": trainer.global_step,
        "accuracy_before": history[0][1] if history else None,
        "accuracy_after": history[-1][1] if history else None,
        "eval_history": history,
        "wall_s": time.perf_counter() - started,
        "model_path": model_path,
        "mlflow_tracking_uri": mlflow_tracking_uri(config) if config.logging.mlflow else None,
    }
    if trainer.is_global_zero:
        from rlbench.lora import export_model  # merges LoRA adapters: a plain HF checkpoint

        export_model(module.policy, module.tokenizer, out / "final_model")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
