"""Time to accuracy: rlbench's GRPO beside TRL's GRPOTrainer, several seeds, one warm start.

    python benchmarks/time_to_accuracy.py --trl-python /path/to/trl-venv/bin/python
    python benchmarks/time_to_accuracy.py --variants shipped,linear,token_mean --seeds 0 1 2
    python benchmarks/time_to_accuracy.py --json tta.json     # also writes every curve

The protocol of ``../shared/peers/trl_grpo_addition_tta.py`` (its README): 2-digit addition,
the tiny char-level Llama warm-started by rlbench (``configs/grpo_addition.yaml``'s warm start,
``warmstart.seed=0``) and given to both frameworks, so every run starts from the same
weights; B = 64 completions per step (8 prompts x G = 8), lr 1e-4, beta 0.04, 4 new tokens,
500 steps, greedy accuracy on 200 held-out prompts every 25 steps. The clock counts training
seconds only: each framework's evaluation time is subtracted. The two frameworks draw
different eval prompts, so compare gains over each run's own start, not accuracies.

Per variant it prints the median training seconds to reach the start + 15 points (and the
step), the final gain (mean, min..max over seeds), seconds per step and how many runs reported
entropy collapse; then the issue's goals against TRL: +15 in at most 0.4x TRL's seconds, a
final gain at least TRL's + 5 points, no collapse. A variant is a list of config overrides on
top of the shipped config (``VARIANTS``; ``shipped`` is none). The TRL runs need TRL's own
environment (``--trl-python``: ``pip install torch==2.13.0 trl`` in a venv); without it only
rlbench runs. Run with nothing else busy on the machine: the seconds halve under load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from rlbench.config import cpu_summary, load_config
from rlbench.run import train
from rlbench.warmstart import warm_start

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peers" / "trl_grpo_addition_tta.py"
#: TRL's optimiser settings: AdamW (0.9, 0.999), linear decay to 0, no warm-up, token-mean
#: loss. Of these the linear decay is the one that mattered, and the shipped config now has it
#: (docs/benchmarks.md).
TRL_OPTIM = [
    "optim.schedule=linear",
    "optim.betas=[0.9,0.999]",
    "optim.warmup_steps=0",
    "algorithm.grpo.loss_aggregation=token_mean",
]
#: What configs/grpo_addition.yaml shipped before: constant LR after 10 warm-up steps (AdamW
#: (0.9, 0.99) and the per-sequence token mean, as now).
PREVIOUS = [
    "optim.schedule=constant",
    "optim.betas=[0.9,0.99]",
    "optim.warmup_steps=10",
    "algorithm.grpo.loss_aggregation=seq_mean_token_mean",
]
VARIANTS: dict[str, list[str]] = {
    "shipped": [],
    "previous": PREVIOUS,
    "trl-optim": TRL_OPTIM,
    # one of TRL's settings at a time on top of the previous defaults: which one matters
    "linear": [*PREVIOUS, "optim.schedule=linear"],
    "betas": [*PREVIOUS, "optim.betas=[0.9,0.999]"],
    "warmup0": [*PREVIOUS, "optim.warmup_steps=0"],
    "token_mean": [*PREVIOUS, "algorithm.grpo.loss_aggregation=token_mean"],
}
GAIN = 0.15
SPEED_GOAL, GAIN_MARGIN = 0.4, 0.05


def protocol(steps: int, eval_every: int) -> list[str]:
    """The overrides every rlbench run shares (the peer script's settings)."""
    return [
        "model.name_or_path=tiny-llama",
        "task.name=arithmetic",
        "task.digits=2",
        "algorithm.name=grpo",
        "algorithm.grpo.group_size=8",
        "algorithm.grpo.beta=0.04",
        "rollout.prompts_per_step=8",
        "rollout.max_new_tokens=4",
        "rollout.temperature=1.0",
        "optim.lr=1e-4",
        f"trainer.max_steps={steps}",
        "trainer.checkpoint_every=100000",
        f"eval.every_n_steps={eval_every}",
        "eval.num_prompts=200",
        "warmstart.seed=0",
        "logging.mlflow=false",
    ]


class TrainClock(pl.Callback):
    """Training seconds after each step, evaluation excluded (evaluations are timed and
    subtracted, as the peer script does)."""

    def __init__(self) -> None:
        self.eval_s = 0.0
        self.after: dict[int, float] = {0: 0.0}  # rollout steps done -> training seconds

    def setup(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        evaluate = module.evaluate

        def timed_evaluate() -> float:
            started = time.perf_counter()
            try:
                return evaluate()
            finally:
                self.eval_s += time.perf_counter() - started

        module.evaluate = timed_evaluate

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        self.after[module.rollout_step] = time.perf_counter() - self.started - self.eval_s


def rlbench_run(overrides: list[str], seed: int, cache: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            ROOT / "configs" / "grpo_addition.yaml",
            [*overrides, f"seed={seed}", f"output_dir={tmp}/run", f"warmstart.cache_dir={cache}"],
        )
        clock = TrainClock()
        summary = train(config, progress_bar=False, callbacks=[clock])
    curve = [(step, clock.after[step], accuracy) for step, accuracy in summary["eval_history"]]
    steps = max(clock.after)
    return {"curve": curve, "s_per_step": clock.after[steps] / steps, "collapsed": summary["collapse_step"]}


def trl_run(python: str, model_dir: str, seed: int, steps: int, eval_every: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        curve_file = Path(tmp) / "curve.json"
        env = {
            **os.environ,
            "MAX_STEPS": str(steps),
            "EVAL_EVERY": str(eval_every),
            "SEED": str(seed),
            "B": "64",
            "G": "8",
            "LR": "1e-4",
            "BETA": "0.04",
            "MAXNEW": "4",
            "CURVE_JSON": str(curve_file),
        }
        done = subprocess.run(
            [python, str(PEER), model_dir], env=env, cwd=tmp, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"TRL run (seed {seed}) failed:\n{done.stderr[-3000:]}")
        curve = [tuple(point) for point in json.loads(curve_file.read_text())]
    last_step, last_s, _ = curve[-1]
    return {"curve": curve, "s_per_step": last_s / last_step, "collapsed": None}


def time_to_gain(curve: list[tuple[int, float, float]]) -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation at the start's accuracy + 15 points."""
    start = curve[0][2]
    return next(((step, s) for step, s, accuracy in curve if accuracy >= start + GAIN - 1e-9), None)


def progress(run: dict[str, Any]) -> str:
    curve = run["curve"]
    return f"{curve[0][2]:.3f} -> {curve[-1][2]:.3f}, +15 at (step, s) {time_to_gain(curve)}"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    reached = [time_to_gain(run["curve"]) for run in runs]
    times = [hit[1] for hit in reached if hit is not None]
    gains = [run["curve"][-1][2] - run["curve"][0][2] for run in runs]
    return {
        "runs": len(runs),
        "reached": len(times),
        # a run that never reached it counts as infinitely slow: the median is then honest
        "median_s": statistics.median([*times, *[float("inf")] * (len(runs) - len(times))]),
        "median_step": statistics.median([hit[0] if hit is not None else float("inf") for hit in reached]),
        "gain_mean": statistics.fmean(gains),
        "gain_min": min(gains),
        "gain_max": max(gains),
        "s_per_step": statistics.median(run["s_per_step"] for run in runs),
        "collapsed": sum(run["collapsed"] is not None for run in runs),
        "start_mean": statistics.fmean(run["curve"][0][2] for run in runs),
    }


def report(results: dict[str, dict[str, Any]]) -> None:
    print(
        f"\n{'run':<12} {'+15 s':>7} {'+15 step':>8} {'reached':>7} {'final gain (min..max)':>24} "
        f"{'s/step':>7} {'collapsed':>9} {'vs TRL':>7}"
    )
    trl = results.get("trl")
    for name, r in results.items():
        ratio = r["median_s"] / trl["median_s"] if trl and math.isfinite(trl["median_s"]) else float("nan")
        print(
            f"{name:<12} {r['median_s']:>7.1f} {r['median_step']:>8} {r['reached']:>4}/{r['runs']:<2} "
            f"{r['gain_mean']:>+8.3f} ({r['gain_min']:+.3f}..{r['gain_max']:+.3f}) "
            f"{r['s_per_step']:>7.3f} {r['collapsed']:>9} {ratio:>6.2f}x"
        )
    if trl:
        for name, r in results.items():
            if name == "trl":
                continue
            fast = r["median_s"] <= SPEED_GOAL * trl["median_s"]
            good = r["gain_mean"] >= trl["gain_mean"] + GAIN_MARGIN
            stable = r["collapsed"] == 0
            verdict = "PASS" if fast and good and stable else "FAIL"
            print(
                f"{verdict}: {name}: +15 in {r['median_s'] / trl['median_s']:.2f}x TRL's seconds (<= 0.4), "
                f"final gain {r['gain_mean']:+.3f} vs TRL {trl['gain_mean']:+.3f} + 0.05, "
                f"{r['collapsed']} collapsed"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="shipped", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--trl-python", help="python of a venv with TRL: also run TRL's defaults")
    parser.add_argument("--cache", default="runs/warmstart", help="warm-start cache (shared by all runs)")
    parser.add_argument("--json", help="write every curve and summary here")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    if args.trl_python and not PEER.is_file():
        parser.error(f"--trl-python: the peer script is not at {PEER}")

    base = protocol(args.steps, args.eval_every)
    cache = Path(args.cache).resolve()
    model_dir, info = warm_start(
        load_config(ROOT / "configs" / "grpo_addition.yaml", [*base, f"warmstart.cache_dir={cache}"]),
        quiet=True,
    )
    print(cpu_summary())  # every figure below was measured on this CPU's kernels
    print(
        f"time to accuracy: warm start {model_dir} (validation accuracy {info['accuracy']:.3f}); "
        f"{args.steps} steps, B=64 (8 x G=8), lr 1e-4, beta 0.04, eval every {args.eval_every}; "
        f"seeds {args.seeds}",
        flush=True,
    )
    curves: dict[str, list[dict[str, Any]]] = {}
    if args.trl_python:
        curves["trl"] = []
        for seed in args.seeds:
            run = trl_run(args.trl_python, model_dir, seed, args.steps, args.eval_every)
            curves["trl"].append(run)
            print(f"  trl seed {seed}: {progress(run)}", flush=True)
    for variant in variants:
        curves[variant] = []
        for seed in args.seeds:
            run = rlbench_run([*base, *VARIANTS[variant]], seed, cache)
            curves[variant].append(run)
            print(f"  {variant} seed {seed}: {progress(run)}", flush=True)
    results = {name: summarise(runs) for name, runs in curves.items()}
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "curves": curves}, indent=1))


if __name__ == "__main__":
    main()
