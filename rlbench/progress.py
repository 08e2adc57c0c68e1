"""The matrix's progress line: cells done / running / left, time elapsed, time left.

``rlbench compare`` runs each cell as a ``rlbench train`` process and hands it the matrix's
state at launch in the ``RLBENCH_MATRIX_STATUS`` environment variable; the run shows the line
in its own progress bar and keeps the times ticking from its own progress, so the line is live
while the run's bar moves. Between runs ``compare`` prints the same line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

ENV = "RLBENCH_MATRIX_STATUS"


@dataclass
class MatrixStatus:
    cell: str
    done: int
    failed: int
    running: int
    left: int
    """Cells not started yet (this one excluded)."""
    started: float
    """``time.time()`` when this invocation of the matrix started."""
    cell_s: float | None
    """Mean wall time of the cells finished so far (None before the first)."""
    workers: int = 1

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> MatrixStatus | None:
        raw = os.environ.get(ENV)
        return cls(**json.loads(raw)) if raw else None

    def line(self, fraction: float | None = None, cell_elapsed: float | None = None) -> str:
        """``matrix: 3 done, 1 running, 4 left | 4m12s elapsed, ~9m left``. With the running
        cell's ``fraction`` done after ``cell_elapsed`` seconds, its own time left counts too."""
        now = time.time()
        this_left = None
        if fraction and cell_elapsed is not None and fraction > 0:
            this_left = cell_elapsed * (1 - fraction) / fraction
        per_cell = self.cell_s
        if per_cell is None and this_left is not None and cell_elapsed is not None:
            per_cell = this_left + cell_elapsed
        eta = None
        if per_cell is not None:  # before this cell has made progress, it counts as a whole one
            eta = self.left * per_cell / max(1, self.workers) + (per_cell if this_left is None else this_left)
        failed = f", {self.failed} failed" if self.failed else ""
        left = f", ~{clock(eta)} left" if eta is not None else ""
        return (
            f"matrix: {self.done} done{failed}, {self.running} running, {self.left} left | "
            f"{clock(now - self.started)} elapsed{left}"
        )


def clock(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``."""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def matrix_progress_callback(status: MatrixStatus, max_steps: int) -> Any:
    """A Lightning callback that writes the matrix line into the run's progress bar."""
    from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar

    class MatrixProgress(Callback):
        def __init__(self) -> None:
            self.started = time.time()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            fraction = getattr(pl_module, "rollout_step", 0) / max(1, max_steps)
            text = f"{status.cell} | {status.line(fraction, time.time() - self.started)}"
            bar = trainer.progress_bar_callback  # Lightning's rich bar when rich is installed, else tqdm
            if isinstance(bar, RichProgressBar) and bar.progress is not None:
                if bar.train_progress_bar_id is not None:
                    bar.progress.update(bar.train_progress_bar_id, description=text)
            elif isinstance(bar, TQDMProgressBar) and bar._train_progress_bar is not None:
                bar.train_progress_bar.set_description(text, refresh=False)

    return MatrixProgress()


class Counted:
    """A counted progress bar (``building pairs  37/256 [01:12<07:40]``) that does nothing when off."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total = total
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm  # a Lightning dependency: the same bars as training's

            # leave=False: a finished bar gives its line back to the log lines that follow it
            self.bar = tqdm(total=total, desc=desc, unit="", leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def counted(total: int, desc: str, enabled: bool | None = None) -> Counted:
    """A progress bar over ``total`` units with a count and an ETA, for long work outside
    training's own bar (building pairs, the warm start, conversions, evaluation).

    ``enabled=None`` shows it only when stderr is a terminal, so logs and CI stay quiet;
    ``True``/``False`` force it. Use as ``with counted(n, "building pairs") as bar: bar.update(k)``.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    return Counted(total, desc, enabled)
