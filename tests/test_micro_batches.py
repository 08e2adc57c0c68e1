"""Micro-batches bound memory without changing the maths: same loss, same update."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlbench.algorithm import RolloutBatch
from rlbench.config import load_config
from rlbench.errors import ConfigError
from rlbench.microbatch import merge, minibatches, plan, scatter, take
from rlbench.run import train
from tasks.arithmetic import Arithmetic


def final_state(config) -> tuple[dict[str, torch.Tensor], list[float]]:
    train(config, progress_bar=False)
    out = Path(config.output_dir)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    rows = csv.DictReader((out / "csv" / "metrics.csv").open())
    return state, [float(r["train/loss"]) for r in rows if r["train/loss"]]


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize(
    "split",
    [("train.micro_batch_size=3", "rollout.micro_batch_size=5"), ("train.micro_batch_tokens=30",)],
    ids=["rows", "token-budget"],
)
def test_loss_and_update_do_not_depend_on_micro_batch_sizes(
    make_config, tmp_path: Path, aggregation: str, split: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
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
    split_state, split_loss = final_state(make_config(*common, f"output_dir={tmp_path / 'split'}", *split))
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


def test_a_micro_batch_larger_than_the_batch_means_the_whole_batch():
    """A step made smaller must not trip over a micro-batch size the user did not touch."""
    config = load_config(None, ["train.micro_batch_size=100", "rollout.micro_batch_size=100"])
    assert (config.train.micro_batch_size, config.rollout.micro_batch_size) == (0, 0)
    with pytest.raises(ConfigError, match=r"rollout.micro_batch_size=-1 is invalid: an integer >= 0"):
        load_config(None, ["rollout.micro_batch_size=-1"])


def test_a_pair_algorithm_may_sample_more_at_once_than_a_step_holds():
    """DPO's sampler builds its pairs from num_prompts x samples_per_prompt completions, far
    more than its step's pairs: the rollout micro-batch bounds that pass, not the step."""
    config = load_config(
        None, ["algorithm.name=dpo", "rollout.prompts_per_step=4", "rollout.micro_batch_size=64"]
    )
    assert config.rollout.micro_batch_size == 64
    dpo = ["algorithm.name=dpo", "rollout.prompts_per_step=4", "train.micro_batch_size=64"]
    assert load_config(None, dpo).train.micro_batch_size == 64


def test_a_negative_logprob_chunk_is_refused():
    with pytest.raises(ConfigError, match=r"train.logprob_chunk_tokens=-1 is invalid: an integer >= 0"):
        load_config(None, ["train.logprob_chunk_tokens=-1"])


def batch_of(lengths: list[int], width: int = 6, prompt_width: int = 4, group_size: int = 1) -> RolloutBatch:
    """Rows whose completions have the given lengths (row i's tokens are i + 1, pad 0 after)."""
    rows = len(lengths)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).float()
    ids = (torch.arange(rows)[:, None] + 1) * mask.long()
    return RolloutBatch(
        prompt_ids=torch.ones(rows, prompt_width, dtype=torch.long),
        prompt_mask=torch.ones(rows, prompt_width, dtype=torch.long),
        completion_ids=ids,
        completion_mask=mask,
        rewards=torch.arange(rows, dtype=torch.float),
        group_size=group_size,
        behaviour_logprobs=-mask,
    )


def test_a_token_budget_packs_rows_shortest_first_and_trims_each_micro_batch():
    batch = batch_of([6, 1, 3, 2, 6, 1])
    # budget 16: rows x (4 prompt + longest completion) <= 16
    chunks = plan(batch, unit=1, max_rows=0, max_tokens=16)
    assert [c.tolist() for c in chunks] == [[1, 5], [3, 2], [0], [4]]  # 2x5, 2x7, 1x10, 1x10
    parts = [take(batch, c) for c in chunks]
    assert [p.completion_ids.shape[1] for p in parts] == [1, 3, 6, 6]
    assert all(len(p) * (4 + p.completion_ids.shape[1]) <= 16 or len(p) == 1 for p in parts)
    assert parts[1].completion_ids.tolist() == [[4, 4, 0], [3, 3, 3]]
    assert parts[1].behaviour_logprobs.tolist() == [[-1, -1, 0], [-1, -1, -1]]  # per-token, trimmed
    assert parts[1].rewards.tolist() == [3.0, 2.0]  # per-row fields travel with their rows
    # a row cap applies too, and 0 keeps the plain row slices
    assert [len(c) for c in plan(batch, unit=1, max_rows=2, max_tokens=100)] == [2, 2, 2]
    assert plan(batch, unit=1, max_rows=4, max_tokens=0) == [slice(0, 4), slice(4, 6)]


def test_a_token_budget_never_splits_a_pair():
    batch = batch_of([1, 6, 2, 2, 1, 1], group_size=2)  # pairs (0, 1), (2, 3), (4, 5)
    chunks = plan(batch, unit=2, max_rows=0, max_tokens=12)
    assert [c.tolist() for c in chunks] == [[4, 5], [2, 3], [0, 1]]  # pair widths 1, 2, 6


def test_results_per_micro_batch_go_back_to_their_rows():
    batch = batch_of([6, 1, 3, 2, 6, 1])
    chunks = plan(batch, unit=1, max_rows=0, max_tokens=16)
    parts = [take(batch, c) for c in chunks]
    # a per-token result computed per micro-batch (here: the ids themselves) lands where it was
    back = scatter([p.completion_ids.float() for p in parts], chunks, batch.completion_mask)
    assert torch.equal(back, batch.completion_ids.float())
    # a scoring pass that adds a per-token field: merged in row order and at full width
    scored = [replace(p, old_logprobs=p.completion_mask * 2) for p in parts]
    merged = merge(scored, chunks, batch)
    assert torch.equal(merged.old_logprobs, batch.completion_mask * 2)
    assert torch.equal(merged.completion_ids, batch.completion_ids)
    assert torch.equal(merged.rewards, batch.rewards)


def test_minibatches_deal_whole_groups_round_robin():
    batch = batch_of([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6], group_size=2)  # 6 groups of 2 rows
    parts = minibatches(batch, k=3, group_size=2)
    # group g goes to minibatch g mod 3: groups (0, 3), (1, 4), (2, 5)
    assert [p.rewards.tolist() for p in parts] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert [p.group_size for p in parts] == [2, 2, 2]
    assert minibatches(batch, k=1, group_size=2) == [batch]


def test_a_negative_token_budget_is_refused():
    with pytest.raises(ConfigError, match=r"train.micro_batch_tokens=-1 is invalid: an integer >= 0"):
        load_config(None, ["train.micro_batch_tokens=-1"])
