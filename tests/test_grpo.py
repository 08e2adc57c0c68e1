"""GRPO: clipped surrogate, token aggregation, loss wiring, config errors and registration."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.grpo import GRPO, GRPOConfig
from rlbench.algorithm import LossScale, RolloutBatch
from rlbench.errors import ConfigError
from rlbench.estimators import kl_k3
from rlbench.losses import AGGREGATIONS, aggregate, clipped_surrogate, masked_mean
from rlbench.registry import ALGORITHMS

# ---------------------------------------------------------------- clipped surrogate


def test_clipped_surrogate_gradient_is_zero_exactly_where_clip_is_active() -> None:
    # eps_low = eps_high = 0.2, old_logp = 0, so rho = exp(logp):
    #   token 0: rho = 1.5, A = +1 -> clipped at 1.2 (active), objective 1.2, grad 0
    #   token 1: rho = 0.5, A = -1 -> clipped at 0.8 (active), objective -0.8, grad 0
    #   token 2: rho = 1.5, A = -1 -> unclipped rho*A = -1.5 is smaller, grad = rho*A = -1.5
    #   token 3: rho = 0.5, A = +1 -> unclipped rho*A = 0.5 is smaller, grad = rho*A = 0.5
    #   token 4: rho = 1.0, A = +2 -> inside the range, grad = 2
    #   token 5: rho = 1.0, A = -2 -> inside the range, grad = -2
    rho = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.0, 1.0], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0, -2.0], dtype=torch.float64)
    logp = rho.log().requires_grad_(True)
    objective, clip_active = clipped_surrogate(logp, torch.zeros_like(logp), advantages, 0.2, 0.2)
    objective.sum().backward()
    assert logp.grad is not None
    torch.testing.assert_close(
        objective.detach(), torch.tensor([1.2, -0.8, -1.5, 0.5, 2.0, -2.0], dtype=torch.float64)
    )
    assert clip_active.tolist() == [True, True, False, False, False, False]
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -1.5, 0.5, 2.0, -2.0], dtype=torch.float64))
    # The gradient's sign follows the advantage wherever the clip is inactive.
    active = clip_active
    assert torch.equal(torch.sign(logp.grad[~active]), torch.sign(advantages[~active]))


def test_clipped_surrogate_asymmetric_clip_and_broadcast_advantages() -> None:
    # DAPO clip-higher: eps_low 0.2, eps_high 0.28. Advantages [B] broadcast over T tokens.
    # Row 0 (A=+1): rho = [1.25, 1.3] -> 1.25 inside 1.28, 1.3 clipped to 1.28.
    # Row 1 (A=-1): rho = [0.85, 0.75] -> 0.85 inside 0.8, 0.75 clipped to 0.8.
    rho = torch.tensor([[1.25, 1.3], [0.85, 0.75]], dtype=torch.float64)
    objective, clip_active = clipped_surrogate(
        rho.log(), torch.zeros_like(rho), torch.tensor([1.0, -1.0], dtype=torch.float64), 0.2, 0.28
    )
    torch.testing.assert_close(objective, torch.tensor([[1.25, 1.28], [-0.85, -0.8]], dtype=torch.float64))
    assert clip_active.tolist() == [[False, True], [False, True]]


# ---------------------------------------------------------------- aggregation

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
SCALE = LossScale(num_sequences=2, num_tokens=3, max_len=3)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("seq_mean_token_mean", (1.5 + 4.0) / 2),  # row means (1+2)/2 = 1.5 and 4/1 = 4, over 2 rows
        ("token_mean", 7.0 / 3),  # (1 + 2 + 4) / 3 unmasked tokens
        ("seq_mean_token_sum_norm", 7.0 / (2 * 3)),  # (1 + 2 + 4) / (G=2 * L_max=3)
    ],
)
def test_aggregation_hand_values(mode: str, expected: float) -> None:
    assert aggregate(VALUES, MASK, mode, SCALE).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_sum_to_the_whole_batch(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3, 0, 4, 2])
    mask = (torch.arange(5) < lengths[:, None]).to(torch.float64)
    scale = LossScale(num_sequences=6, num_tokens=int(mask.sum()), max_len=5)
    whole = aggregate(values, mask, mode, scale)
    parts = sum(aggregate(values[s], mask[s], mode, scale) for s in (slice(0, 1), slice(1, 4), slice(4, 6)))
    assert float(parts) == pytest.approx(whole.item(), abs=1e-6)


def test_unknown_aggregation_lists_valid_modes() -> None:
    with pytest.raises(ValueError, match="seq_mean_token_mean, token_mean, seq_mean_token_sum_norm"):
        aggregate(VALUES, MASK, "sum", SCALE)


def test_masked_mean_ignores_padding() -> None:
    assert masked_mean(VALUES, MASK).item() == pytest.approx(7.0 / 3)


# ---------------------------------------------------------------- GRPO loss


def _batch(rewards: list[float], group_size: int, mask: torch.Tensor) -> RolloutBatch:
    b, t = mask.shape
    return RolloutBatch(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2),
        completion_ids=torch.zeros(b, t, dtype=torch.long),
        completion_mask=mask,
        behaviour_logprobs=torch.zeros(b, t),
        rewards=torch.tensor(rewards),
        group_size=group_size,
    )


# Two prompts x G=2; lengths 3, 2, 1, 3.
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
LOSS_SCALE = LossScale(num_sequences=4, num_tokens=9, max_len=3)


def test_prepare_gives_group_normalised_advantages() -> None:
    algo = GRPO(GRPOConfig(group_size=2, std="population", advantage_eps=1e-8))
    batch = algo.prepare(_batch([1.0, 0.0, 0.5, 0.5], 2, LOSS_MASK))
    # Group 0: mean 0.5, population std 0.5 -> [+1, -1]; group 1: equal rewards -> [0, 0].
    assert batch.advantages is not None
    torch.testing.assert_close(batch.advantages, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_grpo_loss_with_ratio_one_is_minus_aggregated_advantage() -> None:
    algo = GRPO(GRPOConfig(group_size=2, beta=0.0, std="population", advantage_eps=1e-8))
    batch = algo.prepare(_batch([1.0, 0.0, 1.0, 0.0], 2, LOSS_MASK))  # advantages [+1, -1, +1, -1]
    logprobs = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    loss, metrics = algo.loss(logprobs, batch, LOSS_SCALE)
    # mu = 1: old = current, rho = 1, objective_{i,t} = A_i; per-row token means are [1, -1, 1, -1],
    # so the seq_mean_token_mean loss is -(1 - 1 + 1 - 1)/4 = 0.
    assert batch.advantages is not None
    broadcast = batch.advantages[:, None].expand(4, 3)
    expected = -aggregate(broadcast, LOSS_MASK, "seq_mean_token_mean", LOSS_SCALE)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-7)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    # The ratio's gradient is not zero: d loss / d logp_{i,t} = -A_i m_{i,t} / (|o_i| * G_total).
    loss.backward()
    lengths = LOSS_MASK.sum(-1, keepdim=True)
    expected_grad = -batch.advantages[:, None] * LOSS_MASK / (lengths * 4)
    assert logprobs.grad is not None
    torch.testing.assert_close(logprobs.grad, expected_grad)
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["ratio_min"].item() == metrics["ratio_max"].item() == 1.0
    assert "kl" not in metrics and set(metrics) == {
        "loss",
        "clip_frac",
        "ratio_min",
        "ratio_max",
        "advantage_abs_mean",
    }


def test_grpo_loss_with_kl_penalty() -> None:
    algo = GRPO(GRPOConfig(group_size=2, beta=0.1, kl_estimator="k3", loss_aggregation="token_mean"))
    batch = algo.prepare(_batch([1.0, 0.0, 1.0, 0.0], 2, LOSS_MASK))
    generator = torch.Generator().manual_seed(1)
    logprobs = (-torch.rand(4, 3, generator=generator)).requires_grad_(True)
    batch.ref_logprobs = -torch.rand(4, 3, generator=generator)
    loss, metrics = algo.loss(logprobs, batch, LOSS_SCALE)
    # loss = -(sum_tokens A - 0.1 * sum_tokens k3) / 9 tokens.
    assert batch.advantages is not None
    k3 = kl_k3(logprobs.detach(), batch.ref_logprobs)
    advantage_sum = (batch.advantages[:, None] * LOSS_MASK).sum()
    expected = -(advantage_sum - 0.1 * (k3 * LOSS_MASK).sum()) / 9
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["kl"].item() >= 0.0
    assert metrics["kl"].item() == pytest.approx(masked_mean(k3, LOSS_MASK).item(), abs=1e-6)


def test_grpo_loss_needs_reference_logprobs_when_beta_positive() -> None:
    algo = GRPO(GRPOConfig(group_size=2, beta=0.04))
    batch = algo.prepare(_batch([1.0, 0.0, 1.0, 0.0], 2, LOSS_MASK))
    with pytest.raises(ValueError, match="ref_logprobs"):
        algo.loss(torch.zeros(4, 3), batch, LOSS_SCALE)


def test_properties_follow_config() -> None:
    algo = GRPO(GRPOConfig(group_size=4, beta=0.0, mu=2, max_resample_rounds=5))
    assert (algo.group_size, algo.needs_reference, algo.passes_per_batch) == (4, False, 2)
    assert algo.max_resample_rounds == 0  # dynamic sampling is off
    assert GRPO(GRPOConfig(dynamic_sampling=True, max_resample_rounds=5)).max_resample_rounds == 5
    assert GRPO(GRPOConfig()).needs_reference  # beta = 0.04 by default


def test_dynamic_sampling_keeps_groups_with_reward_variance() -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    kept = GRPO(GRPOConfig(group_size=3, dynamic_sampling=True)).keep_groups(rewards)
    assert kept.tolist() == [False, True, False]
    assert GRPO(GRPOConfig(group_size=3)).keep_groups(rewards).tolist() == [True, True, True]


# ---------------------------------------------------------------- config and registry


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"group_size": -1}, "group_size=-1 is invalid: must be >= 1"),
        ({"eps_low": 1.5}, "eps_low=1.5 is invalid: must be in (0, 1)"),
        (
            {"group_size": 1, "scale_rewards": True},
            "group_size=1 is invalid: the std of one reward is undefined; "
            "set scale_rewards false or group_size >= 2",
        ),
        ({"eps_high": math.inf}, "eps_high=inf is invalid"),
        ({"beta": -0.1}, "beta=-0.1 is invalid: must be finite and >= 0"),
        ({"mu": 0}, "mu=0 is invalid: must be >= 1"),
        ({"advantage_eps": 0.0}, "advantage_eps=0.0 is invalid: must be > 0"),
    ],
)
def test_config_errors_name_field_value_and_allowed(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        GRPOConfig(**overrides)  # type: ignore[arg-type]
    assert message in str(error.value)


def test_group_of_one_allowed_without_std_scaling() -> None:
    assert GRPOConfig(group_size=1, scale_rewards=False).group_size == 1


def test_registered_under_grpo() -> None:
    import algorithms.grpo

    assert ALGORITHMS.get("grpo") is algorithms.grpo.GRPO is GRPO
