"""Optuna pruning for a sweep's trial: reports the eval metric at the rollout step it was
measured, and stops a trial the pruner gives up on (or whose entropy collapsed).

optuna-integration's Lightning callback reports once per *epoch* (``step=current_epoch``);
an rlbench run is one long epoch, so its pruner would see a single value. This callback
reports after every evaluation, at ``rollout_step``, the axis every curve uses.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from rlbench.diagnostics import EntropyCollapse


class TrialPruning(pl.Callback):
    """Reports ``metric`` to ``trial`` at each evaluation; on a prune, ends the run after the
    step (checkpoint written, MLflow run finished) and says why in ``pruned_because``."""

    def __init__(self, trial: Any, metric: str, prune_on: list[str]) -> None:
        self.trial, self.metric, self.prune_on = trial, metric, prune_on
        self.reported_step = -1
        self.last_value: float | None = None
        self.pruned_because: str | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if self.pruned_because is not None:
            return
        evaluated = getattr(pl_module, "last_eval", None)
        if evaluated is not None and evaluated[0] > self.reported_step:
            step, metrics = evaluated
            self.reported_step, self.last_value = step, metrics[self.metric]
            # step 0 is the starting model, the same in every trial: nothing to judge a trial by
            # (and the pruner would keep it as the trial's best value)
            if step == 0:
                return
            self.trial.report(self.last_value, step)
            if self.trial.should_prune():
                self.stop(trainer, f"pruned at step {step}: {self.metric}={self.last_value:.4f}")
                return
        if "collapse" in self.prune_on:
            for callback in trainer.callbacks:
                if isinstance(callback, EntropyCollapse) and callback.collapse_step is not None:
                    self.stop(trainer, f"entropy collapse at step {callback.collapse_step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # the final evaluation runs after the last step's batch end: read it here
        evaluated = getattr(pl_module, "last_eval", None)
        if evaluated is not None and evaluated[0] > self.reported_step:
            self.reported_step, self.last_value = evaluated[0], evaluated[1][self.metric]

    def stop(self, trainer: pl.Trainer, reason: str) -> None:
        self.pruned_because = reason
        trainer.should_stop = True
