"""GRPO, PPO, DPO and RLOO on 2-digit addition from one warm start: a table of the results.

    .venv/bin/python examples/compare_algorithms.py               # the shipped configs, 300 steps
    .venv/bin/python examples/compare_algorithms.py --steps 150 --seed 1

Runs ``configs/<algorithm>_addition.yaml`` one after another (same task, model, warm start and
seed; the warm start is built once and cached) and prints a Markdown table: eval accuracy
before and after, steps, and each run's wall time (``summary.json``'s ``wall_s``: training and
evals, plus loading the cached warm start, and for DPO building its pairs when they are not
cached yet). One seed is an anecdote, not a comparison.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rlbench.config import load_config
from rlbench.run import train

ALGORITHMS = ("grpo", "ppo", "dpo", "rloo")
CONFIGS = Path(__file__).parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=None, help="rollout steps (default: the configs' 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in ALGORITHMS:
            overrides = [f"output_dir={Path(out) / name}", f"seed={args.seed}", "logging.mlflow=false"]
            if args.steps:
                overrides.append(f"trainer.max_steps={args.steps}")
            summary = train(load_config(CONFIGS / f"{name}_addition.yaml", overrides), progress_bar=False)
            rows.append((name, summary))
    print(f"\n| algorithm | accuracy before | accuracy after | steps | wall s |  (seed {args.seed})")
    print("|---|---|---|---|---|")
    for name, s in rows:
        before, after = s["accuracy_before"], s["accuracy_after"]
        print(f"| {name} | {before:.3f} | {after:.3f} | {s['steps']} | {s['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
