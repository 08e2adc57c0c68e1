"""How much of the return's variance a critic *could* explain on this task: PPO's learned critic
beside an oracle critic, on the same states of a PPO run's own rollouts.

    python benchmarks/critic_oracle.py                          # trains configs/ppo_addition.yaml first
    python benchmarks/critic_oracle.py --run runs/ppo_addition  # a finished PPO run's last checkpoint
    python benchmarks/critic_oracle.py --continuations 64 --steps 300 301 302
    python benchmarks/critic_oracle.py --set trainer.max_steps=2     # the warm start's own ceiling

The oracle is the true value of each state under the run's final policy,
``V*(s_t) = P(correct | prompt, o_<t)``, estimated by Monte Carlo: from every state of the
sampled completions (the prompt alone, then each prefix), ``--continuations`` (at least 32)
completions are sampled at the run's temperature and verified. Both critics are then scored by
``rlbench.losses.explained_variance`` against two sets of targets on the same tokens:

- the GAE returns PPO regresses on (``train/value_explained_var`` is this figure for the
  learned critic), computed with the learned critic's values, as in training;
- the Monte-Carlo returns ``sum_{t' >= t} R_t'`` (task reward at the end, minus the KL
  penalty per token), which depend on no critic.

The oracle's figure is the ceiling the task allows: the rest of the return's variance is the
sampling noise of the states' futures. It ignores the (small) KL-to-go in the value, so its
figure is slightly below the true ceiling. States come from prompts of steps the run sampled
from (``--steps``, by default the three after its last), so they are the run's own rollouts
under its final weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def capability() -> str:
    return f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def train_ppo(config_path: Path, out: Path, overrides: list[str]) -> Path:
    from rlbench.config import load_config
    from rlbench.run import train

    train(
        load_config(config_path, [*overrides, f"output_dir={out}", "logging.mlflow=false"]),
        progress_bar=False,
    )
    return out


def load_module(run: Path) -> Any:
    """The run's ``RLModule`` at its last checkpoint (policy, reference, critic)."""
    from rlbench.config import load_config
    from rlbench.module import RLModule

    summary = json.loads((run / "summary.json").read_text())
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    config = load_config(run / "config.yaml")
    module = RLModule(config, summary["model_path"])
    module.load_state_dict(checkpoint["state_dict"])
    module.rollout_step = int(checkpoint["rlbench_state"]["rollout_step"])
    module.algorithm.load_state_dict(checkpoint["rlbench_state"].get("algorithm", {}))
    return module.eval()


@torch.no_grad()
def states_and_targets(module: Any, step: int) -> dict[str, Any]:
    """One step's rollouts: the learned values, GAE and Monte-Carlo returns, per token."""
    from rlbench.estimators import kl_shaped_rewards

    algorithm = module.algorithm
    batch, _ = module.rollouts.sample(module.policy, module.rollouts.source.batch(step))
    batch.ref_logprobs = module.reference_logprobs(batch)
    out = module.policy_forward(batch)
    batch.old_logprobs = out.logprobs
    batch = algorithm.score(batch, out.hidden)
    prepared = algorithm.prepare(batch)
    mask = batch.completion_mask
    token_rewards, _ = kl_shaped_rewards(
        batch.rewards, batch.old_logprobs, batch.ref_logprobs, mask, algorithm.kl_coef,
        algorithm.config.kl_estimator,
    )  # fmt: skip
    mc_returns = token_rewards.flip(-1).cumsum(-1).flip(-1) * mask
    return {
        "batch": batch,
        "values": batch.old_values,
        "gae": prepared.returns,
        "mc": mc_returns,
        "mask": mask,
    }


@torch.no_grad()
def oracle_values(
    module: Any, batch: Any, prompts: list[Any], continuations: int, seed: int, chunk: int = 4096
) -> torch.Tensor:
    """``V*(s_t)`` for every completion position of ``batch``: the verified fraction of
    ``continuations`` samples from the prompt plus the first ``t`` completion tokens (``prompts``:
    row ``b``'s task prompt, for the verifier)."""
    from rlbench.evaluation import read_completions
    from rlbench.rollout import SamplingParams, derive_seed

    mask = batch.completion_mask
    B, T = mask.shape
    sampling = module.rollouts.sampling
    values = torch.zeros(B, T)
    # one decode per prefix length t: the states s_t of every row that reached position t
    for t in range(T):
        rows = [b for b in range(B) if mask[b, t] > 0]
        if not rows:
            continue
        ids = torch.cat([batch.prompt_ids[rows], batch.completion_ids[rows, :t]], dim=1)
        att = torch.cat([batch.prompt_mask[rows], torch.ones(len(rows), t, dtype=batch.prompt_mask.dtype)], 1)
        ids = ids.repeat_interleave(continuations, 0)
        att = att.repeat_interleave(continuations, 0)
        seeds = [derive_seed(seed, t, r, j) for r in rows for j in range(continuations)]
        params = SamplingParams(
            sampling.max_new_tokens - t, sampling.temperature, sampling.top_p, sampling.top_k
        )
        correct = []
        for start in range(0, len(ids), chunk):
            part = slice(start, start + chunk)
            rollout = module.backend.generate(module.policy, ids[part], att[part], seeds[part], params)
            prefix = batch.completion_ids[rows, :t].repeat_interleave(continuations, 0)[part]
            full_ids = torch.cat([prefix, rollout.completion_ids], dim=1)
            full_mask = torch.cat(
                [torch.ones_like(prefix, dtype=rollout.completion_mask.dtype), rollout.completion_mask], 1
            )
            texts, invalid = read_completions(module.tokenizer, full_ids, full_mask)
            row_prompts = [prompts[r] for r in rows for _ in range(continuations)][part]
            reward = module.rollouts.score(row_prompts, texts, torch.device("cpu"))
            correct.append(reward.masked_fill(invalid, 0.0))
        values[rows, t] = torch.cat(correct).view(len(rows), continuations).mean(-1)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="a finished PPO run's directory (default: train one)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ppo_addition.yaml")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="with no --run: overrides of the run trained",
    )
    parser.add_argument("--continuations", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="*", help="rollout steps whose prompts give the states")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.continuations < 32:
        parser.error("--continuations must be at least 32 (the oracle's standard error per state <= 0.09)")
    torch.set_num_threads(args.threads)
    from rlbench.losses import explained_variance

    print(capability())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_ppo(args.config, Path(tmp) / "ppo", args.set)
        module = load_module(run)
        steps = args.steps or [module.rollout_step + i for i in range(3)]
        figures: dict[str, list[float]] = {
            "learned_gae": [],
            "oracle_gae": [],
            "learned_mc": [],
            "oracle_mc": [],
        }
        for step in steps:
            group = module.algorithm.group_size
            prompts = [p for p in module.rollouts.source.batch(step).prompts for _ in range(group)]
            got = states_and_targets(module, step)
            oracle = oracle_values(module, got["batch"], prompts, args.continuations, seed=step)
            mask = got["mask"]
            for critic, values in (("learned", got["values"]), ("oracle", oracle)):
                for target in ("gae", "mc"):
                    figures[f"{critic}_{target}"].append(float(explained_variance(values, got[target], mask)))
            print(
                f"step {step}: {int(mask.sum())} states; explained variance vs GAE returns: "
                f"learned {figures['learned_gae'][-1]:.3f}, oracle {figures['oracle_gae'][-1]:.3f}; "
                f"vs Monte-Carlo returns: learned {figures['learned_mc'][-1]:.3f}, "
                f"oracle {figures['oracle_mc'][-1]:.3f}"
            )
    mean = {k: sum(v) / len(v) for k, v in figures.items()}
    print(
        f"mean over {len(steps)} steps ({capability()}): explained variance vs GAE returns "
        f"learned {mean['learned_gae']:.3f} / oracle {mean['oracle_gae']:.3f}; vs Monte-Carlo returns "
        f"learned {mean['learned_mc']:.3f} / oracle {mean['oracle_mc']:.3f} "
        f"({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
