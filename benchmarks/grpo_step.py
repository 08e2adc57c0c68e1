"""Median seconds per GRPO step (rollout + reward + loss + optimiser step) at the peers' shapes.

    python benchmarks/grpo_step.py                 # all shapes, fp32
    python benchmarks/grpo_step.py --shape medium --precision bf16-mixed

Shapes match ../shared/peers/{trl_grpo_cpu,floor_grpo_cpu}.py: a Llama with vocabulary 32,
B = 64 completions per step (8 prompts x G = 8), beta 0.04, random weights (no warm start),
2-digit addition prompts. ``tiny4``/``tiny16``: hidden 128, 4 layers, 4 / 16 new tokens;
``medium``: hidden 512, 8 layers, 8 heads, 32 new tokens. The step is timed from Lightning's
batch start to batch end, so the framework's own per-step overhead (logging included, CSV
logger on, MLflow off) is counted. Run it with nothing else busy on the machine and compare
side by side with the peer scripts in the same session.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch

from rlbench.config import cpu_summary, load_config
from rlbench.run import train

SHAPES = {
    "tiny4": ("tiny-llama", 4),
    "tiny16": ("tiny-llama", 16),
    "medium": ("medium-llama", 32),
}


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[float] = []
        self.rollouts: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.steps.append(time.perf_counter() - self.started)
        # an algorithm that samples nothing to train on (DPO) logs no rollout time
        self.rollouts.append(module.last_metrics.get("perf/rollout_s", 0.0))


def shape_overrides(shape: str, cache_dir: str) -> list[str]:
    """A shape's run: its random-weight preset (built in ``cache_dir``, no warm start) doing
    GRPO on 2-digit addition, B = 64 (8 prompts x G = 8), beta 0.04."""
    preset, new_tokens = SHAPES[shape]
    return [
        f"warmstart.cache_dir={cache_dir}",
        "warmstart.enabled=false",
        f"model.name_or_path={preset}",
        "task.name=arithmetic",
        "algorithm.name=grpo",
        "algorithm.grpo.group_size=8",
        "algorithm.grpo.beta=0.04",
        "rollout.prompts_per_step=8",
        f"rollout.max_new_tokens={new_tokens}",
    ]


#: What a timed run sets: nothing between steps but the steps (no checkpoint, no evaluation
#: until the final one, on 8 prompts; no MLflow).
TIMED = [
    "trainer.checkpoint_every=100000",
    "eval.every_n_steps=100000",
    "eval.num_prompts=8",
    "logging.mlflow=false",
]


def train_shape(
    shape: str, precision: str, max_steps: int, callback: pl.Callback, extra: list[str] | None = None
) -> None:
    """Trains ``shape``'s run for ``max_steps`` steps at lr 1e-4 in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            None,
            [
                f"output_dir={tmp}/run",
                *shape_overrides(shape, f"{tmp}/cache"),
                f"trainer.max_steps={max_steps}",
                f"trainer.precision={precision}",
                *TIMED,
                "optim.lr=1e-4",
                *(extra or []),
            ],
        )
        train(config, progress_bar=False, callbacks=[callback])


def measure(shape: str, precision: str, steps: int, extra: list[str] | None = None) -> dict[str, float]:
    timer = StepTimer()
    train_shape(shape, precision, steps + 1, timer, extra)
    # the first two steps warm up allocators; the last one runs the final evaluation
    steady = timer.steps[2:-1]
    return {
        "median_step_s": statistics.median(steady),
        "median_rollout_s": statistics.median(timer.rollouts[2:-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override, e.g. --set train.micro_batch_tokens=640 (repeatable)",
    )
    args = parser.parse_args()
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    print(cpu_summary())  # every figure below was measured on this CPU's kernels
    print(
        f"rlbench GRPO step, B=64 (8 prompts x G=8), beta=0.04, {args.precision}, "
        f"threads={torch.get_num_threads()}" + (f", {' '.join(args.set)}" if args.set else "")
    )
    for shape in shapes:
        steps = args.steps
        result = measure(shape, args.precision, steps, args.set)
        print(
            f"{shape:<8} median_step_s={result['median_step_s']:.4f} "
            f"median_rollout_s={result['median_rollout_s']:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
