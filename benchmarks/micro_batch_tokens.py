"""What a token budget per micro-batch (``train.micro_batch_tokens``) saves, A/B on one batch.

    python benchmarks/micro_batch_tokens.py --shape medium --budget 640
    python benchmarks/micro_batch_tokens.py --config examples/smollm2_addition.yaml --budget 1024 \\
        --set rollout.max_new_tokens=64

The run trains normally until its third step; that step's batch (sampled by the policy, so
its completion lengths are the model's own) then goes through ``RLModule.update`` ``--reps``
times with no budget and with ``--budget``, alternately, so both see the same machine load.
Printed: each variant's minimum and median seconds, the batch's completion lengths, and the
budget's micro-batches: their padded cells (rows x (prompt + longest completion), what the
budget bounds) and the tokens their forwards compute (each distinct prompt once per
micro-batch, plus the completions), against the whole batch's. Sorting by length splits a
group's rows, so a prompt shared by a group may be computed in several micro-batches: with
long prompts and short completions that can cost more than the trimming saves. Each
repetition is a real optimiser step, so the weights move a little between repetitions; the
work per repetition does not change.

``--shape`` takes ``grpo_step.py``'s random-weight presets (GRPO, 8 prompts x G = 8);
``--config`` any run config (``--set`` overrides it). Run with nothing else busy.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
from grpo_step import SHAPES, TIMED, shape_overrides  # benchmarks/ is on sys.path when this runs as a script

from rlbench.config import cpu_summary, load_config
from rlbench.forward import distinct_prompts
from rlbench.microbatch import completion_lengths, take
from rlbench.run import train

TIMED_STEP = 2


class UpdateAB(pl.Callback):
    """Times ``RLModule.update`` on one batch without and with the token budget."""

    def __init__(self, budget: int, reps: int) -> None:
        self.budget, self.reps = budget, reps
        self.seconds: dict[int, list[float]] = {0: [], budget: []}
        self.report: list[str] = []

    def setup(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        update = module.update
        train_config = module.config.train

        def timed(batch: Any, first: Any) -> Any:
            if module.rollout_step == TIMED_STEP and not self.report:
                for _ in range(self.reps):
                    for budget in self.seconds:
                        train_config.micro_batch_tokens = budget
                        started = time.perf_counter()
                        update(copy.copy(batch), first)
                        self.seconds[budget].append(time.perf_counter() - started)
                self.describe(module, batch)
                train_config.micro_batch_tokens = 0
            return update(batch, first)

        module.update = timed

    def describe(self, module: Any, batch: Any) -> None:
        lengths = completion_lengths(batch.completion_mask)
        prompt = batch.prompt_ids.shape[1]
        whole = len(batch) * (prompt + batch.completion_ids.shape[1])
        parts = [take(batch, rows) for rows in module.micro_batches(batch)]
        cells = sum(len(p) * (prompt + p.completion_ids.shape[1]) for p in parts)
        computed, computed_whole = sum(forward_tokens(p) for p in parts), forward_tokens(batch)
        self.report = [
            f"batch: {len(batch)} rows, prompt width {prompt}, completion lengths mean "
            f"{float(lengths.float().mean()):.1f} max {int(lengths.max())}",
            f"budget {self.budget}: {len(parts)} micro-batches of {[len(p) for p in parts]} rows, "
            f"widths {[prompt + p.completion_ids.shape[1] for p in parts]}; "
            f"{cells} padded cells against {whole} ({cells / whole:.2f}x); tokens through the "
            f"forward {computed} against {computed_whole} ({computed / computed_whole:.2f}x)",
        ]


def forward_tokens(batch: Any) -> int:
    """Positions a teacher-forced forward computes: each distinct prompt once
    (``rlbench.forward``), then every row's completion at the micro-batch's width."""
    prompts = distinct_prompts(batch.prompt_ids, batch.prompt_mask)[0]
    return prompts.shape[0] * prompts.shape[1] + batch.completion_ids.numel()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--shape", choices=list(SHAPES), default="medium")
    source.add_argument("--config", help="a run config instead of a random-weight shape")
    parser.add_argument("--budget", type=int, default=640, help="train.micro_batch_tokens to compare")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"output_dir={tmp}/run",
            f"trainer.max_steps={TIMED_STEP + 1}",
            *TIMED,
        ]
        if args.config:
            config = load_config(args.config, [*common, *args.set])
        else:
            config = load_config(None, [*shape_overrides(args.shape, f"{tmp}/cache"), *common, *args.set])
        ab = UpdateAB(args.budget, args.reps)
        train(config, progress_bar=False, callbacks=[ab])
    print(cpu_summary())  # every figure below was measured on this CPU's kernels
    print(f"{args.config or args.shape}: RLModule.update on one batch, {args.reps} repetitions each")
    print("\n".join(ab.report))
    for budget, seconds in ab.seconds.items():
        median = statistics.median(seconds)
        print(f"micro_batch_tokens={budget:<6} min {min(seconds):.3f} s  median {median:.3f} s")
    base, packed = min(ab.seconds[0]), min(ab.seconds[args.budget])
    print(f"budget / none: {packed / base:.2f}x (minimum seconds)")


if __name__ == "__main__":
    main()
