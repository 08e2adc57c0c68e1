"""Micro-batches bound memory without changing the maths: same loss, same update."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from rlbench.config import load_config
from rlbench.errors import ConfigError
from rlbench.run import train
from tasks.arithmetic import Arithmetic


def final_state(config) -> tuple[dict[str, torch.Tensor], list[float]]:
    train(config, progress_bar=False)
    out = Path(config.output_dir)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    rows = csv.DictReader((out / "csv" / "metrics.csv").open())
    return state, [float(r["train/loss"]) for r in rows if r["train/loss"]]


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_loss_and_update_do_not_depend_on_micro_batch_sizes(
    make_config, tmp_path: Path, aggregation: str, monkeypatch: pytest.MonkeyPatch
):
    # a reward a random-weight model earns about half the time: real advantages, real gradients
    # (with every reward 0 the update would be float noise around zero)
    monkeypatch.setattr(
        Arithmetic, "reward", lambda self, prompt, completion: float(completion[:1] in "13579")
    )
    common = (
        "logging.mlflow=false",
        "trainer.max_steps=2",
        f"algorithm.grpo.loss_aggregation={aggregation}",
        "rollout.max_new_tokens=6",
    )
    whole_state, whole_loss = final_state(make_config(*common, f"output_dir={tmp_path / 'whole'}"))
    split_state, split_loss = final_state(
        make_config(
            *common,
            f"output_dir={tmp_path / 'split'}",
            "train.micro_batch_size=3",
            "rollout.micro_batch_size=5",
        )
    )
    assert split_loss == pytest.approx(whole_loss, abs=1e-6)
    # The same update, up to float summation order. Adam's first steps are nearly sign(g) for
    # any gradient well above its eps (1e-8), so an element whose gradient is ~1e-9 (a token
    # barely used) moves by a fraction of lr depending on that order: such elements are
    # allowed, if rare; a wrongly weighted micro-batch would move many by ~lr.
    lr, moved, total = 1e-4, 0, 0
    for name, value in whole_state.items():
        diff = (split_state[name] - value).abs()
        assert float(diff.max()) <= 2 * lr, name
        moved, total = moved + int((diff > 1e-5).sum()), total + diff.numel()
    assert moved / total < 1e-3, f"{moved} of {total} parameters differ by more than 1e-5"


def test_micro_batch_larger_than_the_batch_is_refused():
    with pytest.raises(
        ConfigError, match=r"train.micro_batch_size=100 is invalid: at most the step's batch of 64"
    ):
        load_config(None, ["train.micro_batch_size=100"])
    with pytest.raises(ConfigError, match=r"rollout.micro_batch_size=-1 is invalid"):
        load_config(None, ["rollout.micro_batch_size=-1"])


def test_a_pair_algorithm_may_sample_more_at_once_than_a_step_holds():
    """DPO's sampler builds its pairs from num_prompts x samples_per_prompt completions, far
    more than its step's pairs: the rollout micro-batch bounds that pass, not the step."""
    config = load_config(
        None, ["algorithm.name=dpo", "rollout.prompts_per_step=4", "rollout.micro_batch_size=64"]
    )
    assert config.rollout.micro_batch_size == 64
    with pytest.raises(
        ConfigError, match=r"train.micro_batch_size=64 is invalid: at most the step's batch of 8"
    ):
        load_config(None, ["algorithm.name=dpo", "rollout.prompts_per_step=4", "train.micro_batch_size=64"])


def test_a_negative_logprob_chunk_is_refused():
    with pytest.raises(ConfigError, match=r"train.logprob_chunk_tokens=-1 is invalid: an integer >= 0"):
        load_config(None, ["train.logprob_chunk_tokens=-1"])
