"""What goes wrong in RL fine-tuning, measured the same way for every algorithm (Lightning callbacks).

Each callback reads the step's global metrics (``RLModule.last_metrics``, reduced over
processes), derives its own and logs them at the same rollout step. Their running state
(the first step's entropy, trailing windows, counters, cumulative costs) is Lightning callback
state, so it is checkpointed and a resumed run carries on where it stopped.

- ``EntropyCollapse``: ``train/entropy_ratio`` (entropy over its first measured value) and
  the first step where that ratio falls below ``diagnostics.collapse_threshold``:
  ``train/collapse_step``, a warning, and ``collapse_step`` in ``summary.json``.
- ``StabilityMonitor``: ``train/grad_norm_spikes`` (steps whose grad norm exceeded the
  trailing window's mean by ``spike_sigmas`` standard deviations, counted so far) and
  ``train/loss_std`` (std of ``train/loss`` over the trailing window).
- ``CostMeter``: cumulative ``cost/samples``, ``cost/tokens_generated``,
  ``cost/tokens_trained`` and ``cost/wall_s``, so runs of algorithms with different costs
  per step can be compared at equal budget.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn


def step_metrics(module: Any) -> tuple[dict[str, float], int] | None:
    """The metrics of the step that just ended and its rollout step (None before any step)."""
    metrics = getattr(module, "last_metrics", None)
    if not metrics:
        return None
    return metrics, module.rollout_step - 1


def log(module: Any, metrics: dict[str, float], step: int) -> None:
    """Logs derived metrics at ``step`` and adds them to the step's metrics (later callbacks,
    a sweep's pruner, see them too)."""
    module.last_metrics.update(metrics)
    module.log_metrics(metrics, step=step)


class EntropyCollapse(pl.Callback):
    """Detects entropy collapse: the first step whose entropy is below ``threshold`` times the
    entropy of the first step that measured it."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.first_entropy: float | None = None
        self.collapse_step: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        found = step_metrics(pl_module)
        if found is None or "train/entropy" not in found[0]:
            return  # DPO measures entropy on the eval schedule only
        metrics, step = found
        entropy = metrics["train/entropy"]
        if not math.isfinite(entropy):
            return
        if self.first_entropy is None:
            self.first_entropy = entropy
        ratio = entropy / self.first_entropy if self.first_entropy > 0 else 1.0
        out = {"train/entropy_ratio": ratio}
        if self.collapse_step is None and ratio < self.threshold:
            self.collapse_step = step
            out["train/collapse_step"] = float(step)
            rank_zero_warn(
                f"entropy collapse at step {step}: mean token entropy {entropy:.4f} is "
                f"{ratio:.3f} of its first value {self.first_entropy:.4f} "
                f"(diagnostics.collapse_threshold={self.threshold})"
            )
        log(pl_module, out, step)

    def state_dict(self) -> dict[str, Any]:
        return {"first_entropy": self.first_entropy, "collapse_step": self.collapse_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_entropy = state_dict["first_entropy"]
        self.collapse_step = state_dict["collapse_step"]


def is_spike(value: float, window: list[float], sigmas: float) -> bool:
    """Whether ``value`` exceeds the mean of ``window`` by more than ``sigmas`` (population)
    standard deviations. A window of fewer than 3 values, or of equal values, flags nothing:
    a spread of 0 would make any rise a spike."""
    if len(window) < 3 or not math.isfinite(value):
        return False
    spread = statistics.pstdev(window)
    return spread > 0 and value > statistics.fmean(window) + sigmas * spread


class StabilityMonitor(pl.Callback):
    """Counts grad-norm spikes against a trailing window and reports the loss's trailing std."""

    def __init__(self, window: int, sigmas: float) -> None:
        self.window, self.sigmas = window, sigmas
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.losses: deque[float] = deque(maxlen=window)
        self.spikes = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        found = step_metrics(pl_module)
        if found is None:
            return
        metrics, step = found
        out: dict[str, float] = {}
        norm = metrics.get("train/grad_norm")
        if norm is not None and math.isfinite(norm):
            self.spikes += is_spike(norm, list(self.grad_norms), self.sigmas)
            self.grad_norms.append(norm)  # the window trails: the step joins it after the test
            out["train/grad_norm_spikes"] = float(self.spikes)
        loss = metrics.get("train/loss")
        if loss is not None and math.isfinite(loss):
            self.losses.append(loss)
            out["train/loss_std"] = statistics.pstdev(self.losses)
        if out:
            log(pl_module, out, step)

    def state_dict(self) -> dict[str, Any]:
        return {"grad_norms": list(self.grad_norms), "losses": list(self.losses), "spikes": self.spikes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.grad_norms = deque(state_dict["grad_norms"], maxlen=self.window)
        self.losses = deque(state_dict["losses"], maxlen=self.window)
        self.spikes = int(state_dict["spikes"])


#: Per-step counts (``perf/*``, summed over processes) and the cumulative cost axis of each.
COST_AXES = {
    "perf/samples": "cost/samples",
    "perf/tokens_generated": "cost/tokens_generated",
    "perf/tokens_trained": "cost/tokens_trained",
}


class CostMeter(pl.Callback):
    """Cumulative compute spent: completions sampled (pair building included), tokens
    generated, tokens trained on, and wall-clock seconds of training (evaluations included).

    With a ``budget`` it ends the run after the step that spends it (final evaluation and
    checkpoint included), so runs of different algorithms can be compared at equal cost.
    """

    def __init__(self, budget: Any = None) -> None:
        self.totals = dict.fromkeys(COST_AXES.values(), 0.0)
        self.wall_before = 0.0  # seconds spent before this process started (a resumed run)
        self.started: float | None = None
        self.budget = budget
        #: The limit that ended the run (``"budget.samples=1000"``), or None.
        self.stopped_by: str | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.started = time.perf_counter()
        if self.budget is not None and self.budget.spent(self.costs()) is not None:
            trainer.should_stop = True  # a run resumed after its budget was spent

    def costs(self) -> dict[str, float]:
        return {**self.totals, "cost/wall_s": self.wall_s()}

    def wall_s(self) -> float:
        return self.wall_before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        found = step_metrics(pl_module)
        if found is None:
            return
        metrics, step = found
        for per_step, total in COST_AXES.items():
            self.totals[total] += metrics.get(per_step, 0.0)
        costs = self.costs()
        log(pl_module, costs, step)
        if self.budget is None or trainer.should_stop:
            return
        spent = self.budget.spent(costs)
        # every process must take the same decision (wall clocks differ slightly)
        if pl_module.dist.max(1.0 if spent else 0.0) > 0:
            self.stopped_by = spent or "budget.wall_s (on another process)"
            pl_module.finish(f"{self.stopped_by} spent after {step + 1} steps")

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals), "wall_s": self.wall_s()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = dict(state_dict["totals"])
        self.wall_before = float(state_dict["wall_s"])
        self.started = None


def diagnostics_callbacks(config: Any) -> list[pl.Callback]:
    """The diagnostics every run gets, from the ``diagnostics:`` config section."""
    d = config.diagnostics
    return [
        EntropyCollapse(d.collapse_threshold),
        StabilityMonitor(d.window, d.spike_sigmas),
        CostMeter(config.budget),
    ]
