"""Lightning DDP on the CPU (gloo): 2 processes give the same result as 1 with the same global batch."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RLBENCH = str(Path(sys.executable).parent / "rlbench")
CONFIG = Path(__file__).parents[1] / "configs" / "grpo_addition.yaml"


#: One warm-start cache for the whole file: every run starts from the same weights, built once.
WARM_START_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def shared_warm_start(tmp_path_factory: pytest.TempPathFactory) -> None:
    WARM_START_CACHE["dir"] = tmp_path_factory.mktemp("warmstart")
    yield
    WARM_START_CACHE.clear()


def run_cli(
    tmp_path: Path, name: str, *overrides: str, timeout: float = 600
) -> tuple[dict[str, torch.Tensor], dict]:
    out = tmp_path / name
    cmd = [
        RLBENCH,
        "train",
        "--config",
        str(CONFIG),
        "--no-progress",
        f"output_dir={out}",
        f"warmstart.cache_dir={WARM_START_CACHE.get('dir', tmp_path / 'cache')}",
        "warmstart.target_accuracy=0.1",
        "rollout.prompts_per_step=4",
        "algorithm.grpo.group_size=4",
        "rollout.max_new_tokens=4",
        "trainer.max_steps=3",
        "eval.num_prompts=16",
        "eval.every_n_steps=2",
        "logging.mlflow=false",
        "optim.lr=1e-3",
        *overrides,
    ]
    # DDP re-runs the command per process: as a subprocess of the CLI, not of pytest. Its own
    # session, so a hung run's other ranks are killed with it instead of outliving the test.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{name}: no result after {timeout} s (hung?)")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return state, json.loads((out / "summary.json").read_text())


def matches_one_process(tmp_path: Path, *overrides: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Runs ``overrides`` as 1 process and as a 2-process DDP run (gloo, CPU); asserts both
    ran 3 steps and ended with the same parameters. Returns the 1-process state, and both
    summaries."""
    one, one_summary = run_cli(tmp_path, "one", *overrides)
    two, two_summary = run_cli(tmp_path, "two", *overrides, "trainer.devices=2", "trainer.strategy=ddp")
    assert two_summary["steps"] == one_summary["steps"] == 3
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert torch.allclose(two[name], value, atol=1e-5), name
    return one, one_summary, two_summary


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path: Path):
    one, one_summary, two_summary = matches_one_process(tmp_path)
    from transformers import AutoModelForCausalLM

    # both start from one warm start (rank 0 builds it before the second process starts)
    initial = AutoModelForCausalLM.from_pretrained(one_summary["model_path"]).state_dict()
    assert two_summary["model_path"] == one_summary["model_path"]
    assert any(not torch.allclose(one[f"policy.{k}"], v) for k, v in initial.items())  # it trained
    # eval runs once per evaluation, on shards that add up to the whole eval set
    assert [s for s, _ in two_summary["eval_history"]] == [s for s, _ in one_summary["eval_history"]]
    assert [a for _, a in two_summary["eval_history"]] == pytest.approx(
        [a for _, a in one_summary["eval_history"]]
    )
    # only rank 0 writes: one CSV log, one summary
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


@pytest.mark.slow
def test_dynamic_sampling_with_micro_batches_matches_one_process(tmp_path: Path):
    """Issue 13 (5): with dynamic sampling and no refills, the processes keep different numbers
    of groups; each backward is an all-reduce, so unequal micro-batch counts used to hang the
    run before its first step. Now the processes select the groups one process would, pad with
    zero-weight micro-batches, and end with the 1-process parameters."""
    common = (
        "algorithm.grpo.dynamic_sampling=true",
        "algorithm.grpo.max_resample_rounds=0",
        "rollout.prompts_per_step=8",
        "train.micro_batch_size=4",
        "algorithm.grpo.beta=0",
    )
    matches_one_process(tmp_path, *common)
    kept = [kept_groups(tmp_path / run) for run in ("one", "two")]
    assert kept[0] == kept[1] and min(kept[0]) < 8  # groups were dropped, the same ones


@pytest.mark.slow
def test_token_budget_micro_batches_match_one_process(tmp_path: Path):
    """Packed by length under a token budget, each process splits its share into its own
    number of micro-batches (its completions' lengths differ from the other's); zero-weight
    padding keeps the backward all-reduces in step, and the run ends with the 1-process
    parameters."""
    common = (
        "rollout.prompts_per_step=8",
        "rollout.max_new_tokens=12",  # a random-weight model ends some completions early
        "train.micro_batch_tokens=60",
        "algorithm.grpo.beta=0",
    )
    matches_one_process(tmp_path, *common)


def kept_groups(run: Path) -> list[float]:
    rows = csv.DictReader((run / "csv" / "metrics.csv").open())
    return [float(r["train/kept_groups"]) for r in rows if r.get("train/kept_groups")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm",
    [
        # PPO: a value head (a submodule whose gradients DDP averages too), whitening over
        # both processes' tokens, and an adaptive KL coefficient updated from global metrics
        (
            "algorithm.name=ppo",
            "algorithm.ppo.group_size=2",
            "algorithm.ppo.adaptive_kl=true",
            "algorithm.ppo.critic_lr=1e-2",
        ),
        # DPO: pairs built once (by rank 0, under the cache lock), each process a share of a step's pairs
        ("algorithm.name=dpo", "algorithm.dpo.num_prompts=256"),
    ],
    ids=["ppo", "dpo"],
)
def test_two_process_ddp_matches_one_process_for_other_algorithms(tmp_path: Path, algorithm: tuple[str, ...]):
    one, _, _ = matches_one_process(tmp_path, *algorithm)
    if "algorithm.name=ppo" in algorithm:
        head = one["algorithm_modules.value_head.linear.weight"]
        assert head.abs().sum() > 0  # the zero-initialised value head trained
