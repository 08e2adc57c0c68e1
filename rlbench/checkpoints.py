"""Checkpoints on the rollout-step clock.

Lightning's ``ModelCheckpoint`` counts optimiser steps (``global_step``), which advance ``mu``
times per rollout step: ``checkpoint_every: 25`` with ``mu: 2`` would save only at 50, 100...
and a final step that is not a multiple would be skipped. This callback counts rollout steps,
the clock of ``trainer.max_steps``, ``eval.every_n_steps`` and every logged metric.

Files (in ``output_dir/checkpoints``): ``last.ckpt``, the resume point, rewritten at every
save, and ``step-<N>.ckpt``, the newest periodic checkpoint (the previous one is removed).
Writes go through the trainer's checkpoint IO (atomic in rlbench runs: temporary file, rename).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"


class RolloutStepCheckpoint(pl.Callback):
    """Saves every ``every`` rollout steps, at step ``max_steps``, and when the run stops early
    (a spent budget)."""

    def __init__(self, dirpath: str | Path, every: int, max_steps: int) -> None:
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.dirpath = Path(dirpath)
        self.every = every
        self.max_steps = max_steps

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(pl_module.rollout_step)  # steps taken, this one included
        if step % self.every and step < self.max_steps and not trainer.should_stop:
            return
        last = self.dirpath / LAST_CHECKPOINT
        trainer.save_checkpoint(last, weights_only=False)  # every process calls it; rank 0 writes
        if trainer.is_global_zero:
            previous = sorted(self.dirpath.glob("step-*.ckpt"))
            snapshot = self.dirpath / f"step-{step}.ckpt"
            link_or_copy(last, snapshot)
            for old in previous:
                if old != snapshot:
                    old.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source`` atomically: a hard link when the file system has
    them (no second write; ``last.ckpt`` is later replaced, not modified in place)."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
