"""Reward noise: the observed flip rate, its own seeded stream, Gaussian noise, and noisy pairs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from rlbench.config import RewardNoiseConfig
from rlbench.errors import ConfigError
from rlbench.noise import add_noise
from rlbench.pairs import build_pairs
from rlbench.run import train

SEEDS = list(range(20_000))


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_observed_flip_rate_is_within_three_standard_errors(p: float):
    clean = (torch.arange(len(SEEDS)) % 2).float()
    noisy, flipped = add_noise(clean, SEEDS, RewardNoiseConfig(flip_prob=p))
    rate = flipped.float().mean().item()
    assert abs(rate - p) < 3 * math.sqrt(p * (1 - p) / len(SEEDS))
    assert torch.equal(noisy[flipped], 1 - clean[flipped]) and torch.equal(noisy[~flipped], clean[~flipped])


def test_noise_is_a_pure_function_of_the_sample_seeds():
    clean = torch.zeros(1000)
    config = RewardNoiseConfig(flip_prob=0.3, gaussian_std=0.5)
    first, flips = add_noise(clean, SEEDS[:1000], config)
    again, flips_again = add_noise(torch.ones(1000), SEEDS[:1000], config)
    assert torch.equal(flips, flips_again)  # which rewards flip does not depend on the rewards
    assert torch.equal(add_noise(clean, SEEDS[:1000], config)[0], first)
    # a completion's noise is its own: the same seed gives the same noise in any batch
    assert torch.equal(add_noise(clean[500:], SEEDS[500:1000], config)[0], first[500:])
    assert not torch.equal(add_noise(clean, SEEDS[1000:2000], config)[1], flips)


def test_gaussian_noise_has_the_configured_spread():
    clean = torch.full((len(SEEDS),), 0.5)
    noisy, flipped = add_noise(clean, SEEDS, RewardNoiseConfig(gaussian_std=0.3))
    noise = noisy - clean
    assert not bool(flipped.any())
    assert abs(noise.mean().item()) < 3 * 0.3 / math.sqrt(len(SEEDS))
    assert noise.std().item() == pytest.approx(0.3, rel=0.03)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("flip_prob", 1.5, "a probability in \\[0, 1\\]"), ("gaussian_std", -1.0, "a finite number >= 0")],
)
def test_bad_noise_settings_name_the_field(field: str, value: float, message: str):
    with pytest.raises(ConfigError, match=f"{field}={value}.*{message}"):
        RewardNoiseConfig(**{field: value})


def test_noisy_pairs_record_their_clean_labels():
    # one prompt, two completions: noise says "b" is better, the verifier says "a"
    pairs = build_pairs(["q"], [["a", "b"]], [[0.0, 1.0]], seed=0, clean_rewards=[[1.0, 0.0]])
    assert len(pairs) == 1 and pairs[0].chosen == "b" and pairs[0].mislabelled
    clean = build_pairs(["q"], [["a", "b"]], [[1.0, 0.0]], seed=0, clean_rewards=[[1.0, 0.0]])
    assert clean[0].chosen == "a" and clean[0].mislabelled is False
    assert build_pairs(["q"], [["a", "b"]], [[1.0, 0.0]], seed=0)[0].mislabelled is None


def metric_series(output_dir: Path, name: str) -> list[float]:
    path = next(output_dir.rglob("metrics.csv"))
    return [float(row[name]) for row in csv.DictReader(path.open()) if row.get(name)]


def test_a_noisy_run_logs_clean_and_noisy_rewards_and_repeats_exactly(make_config, tmp_path: Path):
    runs = []
    for name in ("a", "b"):
        config = make_config(
            f"output_dir={tmp_path / name}",
            "reward_noise.flip_prob=0.3",
            "logging.mlflow=false",
            "trainer.max_steps=4",
        )
        train(config, progress_bar=False)
        runs.append(Path(config.output_dir))
    seen, clean, rate = (
        metric_series(runs[0], n)
        for n in ("train/reward_mean", "train/reward_clean_mean", "train/reward_noise_rate")
    )
    assert len(seen) == len(clean) == len(rate) == 4
    assert seen != clean and 0.0 < sum(rate) / len(rate) < 0.7
    assert metric_series(runs[1], "train/reward_mean") == seen  # the same flips, run again
