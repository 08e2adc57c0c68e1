"""How close a GRPO step is to this CPU's matmul limit, in fp32 and bf16-mixed.

    python benchmarks/flop_floor.py                       # medium, 32-true and bf16-mixed
    python benchmarks/flop_floor.py --shape tiny16 --precision 32-true

For each precision it runs ``grpo_step.py``'s shape, counts the matrix-multiply FLOPs of one
steady step with ``torch.utils.flop_counter.FlopCounterMode`` (sampling, the reference forward,
the policy's forward and backward: everything the step multiplies, padding included), times
the same step without the counter, and measures this machine's GEMM rate at the step's own
shapes: ``[tokens, hidden] x [hidden, hidden | intermediate]`` for the training passes and
``[rows, hidden] x ...`` for one decoding step. The floor is FLOPs / rate per phase, the time
a step would take if it did nothing but its matmuls at that rate. Nothing else runs in the
floor: attention's softmax, norms, rotary, casts and Python are what the rest of the step is.

It answers "how much is left": the issue's goal of a bf16-mixed medium step at 0.3x TRL-fp32
is a time, and if the floor is already near it the goal is not reachable by removing overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from grpo_step import SHAPES, StepTimer, train_shape  # benchmarks/ is on sys.path as a script
from torch.utils.flop_counter import FlopCounterMode

from rlbench.config import cpu_summary
from rlbench.policy import PRESETS

PRESET_OF = {"tiny4": "tiny-llama", "tiny16": "tiny-llama", "medium": "medium-llama"}


class CountStep(pl.Callback):
    """Counts the FLOPs of step ``at`` and of its sampling phase (the rollout collector)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.total = 0
        self.sampling = 0

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        if idx != self.at:
            return
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()
        collect = module.experience.collect

        def counted(*args: Any, **kwargs: Any) -> Any:
            before = self.counter.get_total_flops()
            out = collect(*args, **kwargs)
            self.sampling = self.counter.get_total_flops() - before
            return out

        module.experience.collect = counted

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx == self.at:
            self.counter.__exit__(None, None, None)
            self.total = self.counter.get_total_flops()
            del module.experience.collect  # the instance attribute; the method is back


def gemm_rate(rows: int, shape: dict[str, int], dtype: torch.dtype, repeats: int = 20) -> float:
    """FLOP/s of the model's linear layers at ``rows`` rows: the q/k/v/o, gate/up and down
    projections in their proportions (4 x h*h, 2 x h*i, 1 x i*h per layer)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    layers = [(h, h)] * 4 + [(h, i)] * 2 + [(i, h)]
    x = {k: torch.randn(rows, k, dtype=dtype) for k in (h, i)}
    w = [torch.randn(n, k, dtype=dtype) for k, n in layers]  # nn.Linear's [out, in] layout
    for _ in range(3):
        for weight in w:
            x[weight.shape[1]] @ weight.T
    started = time.perf_counter()
    for _ in range(repeats):
        for weight in w:
            x[weight.shape[1]] @ weight.T
    seconds = (time.perf_counter() - started) / repeats
    return sum(2 * rows * k * n for k, n in layers) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="medium")
    parser.add_argument("--precision", action="append", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    precisions = args.precision or ["32-true", "bf16-mixed"]
    shape = PRESETS[PRESET_OF[args.shape]]
    print(cpu_summary())  # every figure below was measured on this CPU's kernels
    print(f"GRPO step at {args.shape}, B=64, threads={torch.get_num_threads()}")
    counted = CountStep(at=2)
    train_shape(args.shape, "32-true", 4, counted)  # the FLOPs do not depend on the precision
    train_flops = counted.total - counted.sampling
    print(
        f"matmul FLOPs of one step: {counted.total / 1e9:.0f} G "
        f"(sampling {counted.sampling / 1e9:.0f} G, "
        f"reference + policy forward/backward {train_flops / 1e9:.0f} G)"
    )
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
        timer = StepTimer()
        train_shape(args.shape, precision, args.steps + 1, timer)
        step = statistics.median(timer.steps[2:-1])
        sampling = statistics.median(timer.rollouts[2:-1])
        train_rate = gemm_rate(2048, shape, dtype)
        decode_rate = gemm_rate(64, shape, dtype)
        floor_train = train_flops / train_rate
        floor_sampling = counted.sampling / decode_rate
        floor = floor_train + floor_sampling
        print(
            f"{precision:<10} step {step:.3f} s "
            f"(sampling {sampling:.3f} s, the rest {step - sampling:.3f} s) | "
            f"GEMM {train_rate / 1e9:.0f} GFLOP/s at 2048 rows, {decode_rate / 1e9:.0f} at 64 | "
            f"floor {floor:.3f} s (sampling {floor_sampling:.3f} s, the rest {floor_train:.3f} s) | "
            f"step at {100 * floor / step:.0f}% of the floor's speed",
            flush=True,
        )


if __name__ == "__main__":
    main()
