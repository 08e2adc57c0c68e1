"""PPO's critic-side maths against hand-computed values (THEORY sections 3 and 9).

Every test uses gamma = 0.99, lam = 0.95 where GAE is involved, so gamma * lam = 0.9405.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlbench.estimators import gae, kl_shaped_rewards
from rlbench.losses import clipped_value_loss, explained_variance, whiten

GAMMA, LAM = 0.99, 0.95


# --- GAE ------------------------------------------------------------------------------------


def test_gae_hand_computed_five_tokens() -> None:
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=torch.float64)
    mask = torch.ones(1, 5)
    # delta_t = R_t + 0.99 * V_{t+1} - V_t, V_5 = 0:
    #   delta_4 = 1 + 0.99 * 0   - 0.5 = 0.5
    #   delta_3 = 0 + 0.99 * 0.5 - 0.4 = 0.495 - 0.4 = 0.095
    #   delta_2 = 0 + 0.99 * 0.4 - 0.3 = 0.396 - 0.3 = 0.096
    #   delta_1 = 0 + 0.99 * 0.3 - 0.2 = 0.297 - 0.2 = 0.097
    #   delta_0 = 0 + 0.99 * 0.2 - 0.1 = 0.198 - 0.1 = 0.098
    # A_t = delta_t + 0.9405 * A_{t+1}:
    #   A_4 = 0.5
    #   A_3 = 0.095 + 0.9405 * 0.5          = 0.095 + 0.47025          = 0.56525
    #   A_2 = 0.096 + 0.9405 * 0.56525      = 0.096 + 0.531617625      = 0.627617625
    #   A_1 = 0.097 + 0.9405 * 0.627617625  = 0.097 + 0.5902743763125  = 0.6872743763125
    #   A_0 = 0.098 + 0.9405 * 0.6872743763125 = 0.098 + 0.64638155092 = 0.74438155092
    expected = torch.tensor(
        [[0.74438155092, 0.6872743763125, 0.627617625, 0.56525, 0.5]], dtype=torch.float64
    )
    advantages, returns = gae(rewards, values, mask, GAMMA, LAM)
    torch.testing.assert_close(advantages, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(returns, advantages + values)
    # returns = A + V = [0.84438155092, 0.8872743763125, 0.927617625, 0.96525, 1.0]
    torch.testing.assert_close(
        returns,
        torch.tensor([[0.84438155092, 0.8872743763125, 0.927617625, 0.96525, 1.0]], dtype=torch.float64),
        atol=1e-10,
        rtol=0,
    )


def test_gae_terminal_reward_zero_values_is_discounted_reward() -> None:
    # With V = 0 every delta is the reward, so A_t = 0.9405^(T-1-t) * r.
    r = 2.0
    rewards = torch.tensor([[0.0, 0.0, 0.0, r]], dtype=torch.float64)
    values = torch.zeros(1, 4, dtype=torch.float64)
    expected = torch.tensor([[0.9405**3 * r, 0.9405**2 * r, 0.9405 * r, r]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, torch.ones(1, 4), GAMMA, LAM)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected)  # V = 0


def test_gae_padded_row_ignores_masked_values_and_all_masked_row_is_zero() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0, 5.0], [3.0, 3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    # 1e6 on the padding: bootstrapping from it would blow the advantages up.
    values = torch.tensor([[0.1, 0.2, 0.3, 1e6, 1e6], [1e6] * 5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    # Row 0, last unmasked token t = 2 bootstraps from 0:
    #   delta_2 = 1 + 0.99 * 0   - 0.3 = 0.7
    #   delta_1 = 0 + 0.99 * 0.3 - 0.2 = 0.097
    #   delta_0 = 0 + 0.99 * 0.2 - 0.1 = 0.098
    #   A_2 = 0.7
    #   A_1 = 0.097 + 0.9405 * 0.7     = 0.097 + 0.65835     = 0.75535
    #   A_0 = 0.098 + 0.9405 * 0.75535 = 0.098 + 0.710406675 = 0.808406675
    expected_adv = torch.tensor([[0.808406675, 0.75535, 0.7, 0.0, 0.0], [0.0] * 5], dtype=torch.float64)
    expected_ret = torch.tensor([[0.908406675, 0.95535, 1.0, 0.0, 0.0], [0.0] * 5], dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, GAMMA, LAM)
    torch.testing.assert_close(advantages, expected_adv, atol=1e-10, rtol=0)
    torch.testing.assert_close(returns, expected_ret, atol=1e-10, rtol=0)


def test_gae_detaches_values() -> None:
    values = torch.tensor([[0.1, 0.2]], requires_grad=True)
    advantages, returns = gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2), GAMMA, LAM)
    assert not advantages.requires_grad and not returns.requires_grad


def test_gae_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"gae needs token_rewards, values and mask of one shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), GAMMA, LAM)


# --- KL-shaped rewards ----------------------------------------------------------------------

# Rows of length 3, 2 and 0; the padding's log-probs are garbage that must not leak in.
KL_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
KL_LOGP = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.2, -0.3, -50.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
KL_REF = torch.tensor([[-1.5, -1.0, -0.5, 3.0], [-0.2, -0.1, 0.0, -50.0], [-2.0, -2.0, -2.0, -2.0]])
KL_REWARDS = torch.tensor([1.0, -0.5, 3.0])


def test_kl_shaped_rewards_k1() -> None:
    # k1 = logp - ref: row 0 [0.5, -1.0, 0.0], row 1 [0.0, -0.2]; masked 0.
    # R_t = -0.1 * k1, plus the outcome reward on the last unmasked token:
    #   row 0: [-0.05, +0.1, -0.0 + 1.0, 0]
    #   row 1: [-0.0, +0.02 - 0.5, 0, 0] = [0, -0.48, 0, 0]
    #   row 2: no unmasked token, so no reward at all (not even the 3.0).
    token_rewards, kl = kl_shaped_rewards(KL_REWARDS, KL_LOGP, KL_REF, KL_MASK, kl_coef=0.1)
    expected_kl = torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.0, -0.2, 0.0, 0.0], [0.0] * 4])
    expected_rewards = torch.tensor([[-0.05, 0.1, 1.0, 0.0], [0.0, -0.48, 0.0, 0.0], [0.0] * 4])
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(token_rewards, expected_rewards)


def test_kl_shaped_rewards_k3() -> None:
    # log r = ref - logp; k3 = exp(log r) - 1 - log r:
    #   row 0: log r = [-0.5, 1.0, 0.0] -> [e^-0.5 - 1 + 0.5, e - 1 - 1, 0] = [0.1065307, 0.7182818, 0]
    #   row 1: log r = [0.0, 0.2]       -> [0, e^0.2 - 1.2]               = [0, 0.0214028]
    k3_00, k3_01, k3_11 = math.exp(-0.5) - 0.5, math.e - 2.0, math.exp(0.2) - 1.2
    token_rewards, kl = kl_shaped_rewards(KL_REWARDS, KL_LOGP, KL_REF, KL_MASK, 0.1, estimator="k3")
    expected_kl = torch.tensor([[k3_00, k3_01, 0.0, 0.0], [0.0, k3_11, 0.0, 0.0], [0.0] * 4])
    expected_rewards = torch.tensor(
        [[-0.1 * k3_00, -0.1 * k3_01, 1.0, 0.0], [0.0, -0.1 * k3_11 - 0.5, 0.0, 0.0], [0.0] * 4]
    )
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(token_rewards, expected_rewards)


def test_kl_shaped_rewards_zero_kl_puts_reward_on_last_token_only() -> None:
    # logp == ref: all KL is 0, so each row's only nonzero entry is its reward at length - 1.
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    logp = torch.full((3, 5), -0.7)
    token_rewards, kl = kl_shaped_rewards(torch.tensor([2.0, 3.0, 4.0]), logp, logp, mask, 0.5)
    expected = torch.tensor([[0, 0, 0, 0, 2.0], [3.0, 0, 0, 0, 0], [0, 0, 4.0, 0, 0]])
    torch.testing.assert_close(token_rewards, expected)
    assert torch.equal(kl, torch.zeros(3, 5))


def test_kl_shaped_rewards_unknown_estimator_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k9'; valid estimators: k1, k2, k3"):
        kl_shaped_rewards(KL_REWARDS, KL_LOGP, KL_REF, KL_MASK, 0.1, estimator="k9")


# --- Value loss -----------------------------------------------------------------------------


def test_clipped_value_loss_by_hand() -> None:
    # c = 0.2, V_old = 0 everywhere, so clip(V) = clamp(V, -0.2, 0.2).
    values = torch.tensor([[0.5, 0.5, 0.1]], requires_grad=True)
    old_values = torch.zeros(1, 3)
    returns = torch.tensor([[1.0, 0.0, 1.0]])
    # token 0: (0.5 - 1)^2 = 0.25 < (0.2 - 1)^2 = 0.64 -> clipped wins: 0.5 * 0.64 = 0.32
    # token 1: (0.5 - 0)^2 = 0.25 > (0.2 - 0)^2 = 0.04 -> unclipped:    0.5 * 0.25 = 0.125
    # token 2: inside the range, clip(V) = V: 0.5 * (0.1 - 1)^2 = 0.5 * 0.81 = 0.405, not active
    loss, clip_active = clipped_value_loss(values, old_values, returns, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.125, 0.405]]))
    assert clip_active.tolist() == [[True, False, False]]
    # Where the clipped term wins V is past the clip, so it gets no gradient; elsewhere V - ret.
    loss.sum().backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5, -0.9]]))


@pytest.mark.parametrize("clip_range", [None, 0.0])
def test_value_loss_without_clip_is_half_squared_error(clip_range: float | None) -> None:
    values = torch.tensor([[0.5, 0.5, 0.1]])
    returns = torch.tensor([[1.0, 0.0, 1.0]])
    # 0.5 * [(-0.5)^2, 0.5^2, (-0.9)^2] = [0.125, 0.125, 0.405]
    loss, clip_active = clipped_value_loss(values, torch.zeros(1, 3), returns, clip_range)
    torch.testing.assert_close(loss, torch.tensor([[0.125, 0.125, 0.405]]))
    assert not clip_active.any()


def test_value_loss_rejects_negative_clip_range() -> None:
    with pytest.raises(ValueError, match=r"clip_range must be None or >= 0, got -0.1"):
        clipped_value_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), -0.1)


# --- Whitening ------------------------------------------------------------------------------

# Unmasked entries 1, 2, 3, 4, 5: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2.
WHITEN_X = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -7.0, 0.0]], dtype=torch.float64)
WHITEN_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_whiten_by_hand() -> None:
    # (x - 3) / sqrt(2) = [-2, -1, 0, 1, 2] / 1.41421356; masked entries 0.
    s = math.sqrt(2.0)
    expected = torch.tensor([[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]], dtype=torch.float64)
    got = whiten(WHITEN_X, WHITEN_MASK, eps=0.0)
    torch.testing.assert_close(got, expected)
    kept = got[WHITEN_MASK.bool()]
    torch.testing.assert_close(kept.mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(kept.var(correction=0), torch.tensor(1.0, dtype=torch.float64))


def test_whiten_without_shift_keeps_the_mean() -> None:
    # (x - 3) / sqrt(2) + 3 = [1.5857864, 2.2928932, 3, 3.7071068, 4.4142136]
    s = math.sqrt(2.0)
    expected = torch.tensor(
        [[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0.0, 0.0]], dtype=torch.float64
    )
    got = whiten(WHITEN_X, WHITEN_MASK, shift_mean=False, eps=0.0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[WHITEN_MASK.bool()].mean(), torch.tensor(3.0, dtype=torch.float64))


def test_whiten_all_masked_is_zero_not_nan() -> None:
    got = whiten(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 3))
    assert torch.equal(got, torch.zeros(2, 3))


def test_whiten_over_two_simulated_processes_equals_whole_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=generator, dtype=torch.float64) * 3 + 1
    # Halves hold different token counts (9 and 6), so per-half statistics would differ.
    lengths = torch.tensor([6, 3, 1, 5])
    mask = (torch.arange(6) < lengths[:, None]).long()
    x_a, x_b, mask_a, mask_b = x[:2], x[2:], mask[:2], mask[2:]

    # Record each "process"'s local sums with an identity all-reduce.
    local: dict[str, torch.Tensor] = {}
    whiten(x_a, mask_a, all_reduce_sum=lambda sums: local.setdefault("a", sums.clone()))
    whiten(x_b, mask_b, all_reduce_sum=lambda sums: local.setdefault("b", sums.clone()))
    assert local["a"][2].item() == 9 and local["b"][2].item() == 6

    # Then each "process" whitens with a fake all-reduce that adds the other's sums.
    out_a = whiten(x_a, mask_a, all_reduce_sum=lambda sums: sums + local["b"])
    out_b = whiten(x_b, mask_b, all_reduce_sum=lambda sums: sums + local["a"])
    whole = whiten(x, mask)
    torch.testing.assert_close(torch.cat([out_a, out_b]), whole)
    # Without the all-reduce, each half would be whitened by its own statistics.
    assert not torch.allclose(whiten(x_a, mask_a), whole[:2])


# --- Explained variance ---------------------------------------------------------------------

EV_RETURNS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
EV_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_explained_variance_perfect_prediction_is_one() -> None:
    values = EV_RETURNS.clone()
    values[~EV_MASK.bool()] = 1e6  # the padding's predictions do not count
    torch.testing.assert_close(explained_variance(values, EV_RETURNS, EV_MASK), torch.tensor(1.0))


def test_explained_variance_constant_mean_prediction_is_zero() -> None:
    # Unmasked returns 1, 2, 3, 4 have mean 2.5; predicting 2.5 leaves all their variance.
    values = torch.full((2, 4), 2.5)
    torch.testing.assert_close(explained_variance(values, EV_RETURNS, EV_MASK), torch.tensor(0.0))


def test_explained_variance_by_hand() -> None:
    # V = [1, 2, 3, 5]: residual ret - V = [0, 0, 0, -1], mean -0.25,
    # Var[residual] = (3 * 0.0625 + 0.5625) / 4 = 0.1875; Var[ret] = 1.25 -> 1 - 0.15 = 0.85.
    values = torch.tensor([[1.0, 2.0, 3.0, -8.0], [5.0, 7.0, 7.0, 7.0]])
    torch.testing.assert_close(explained_variance(values, EV_RETURNS, EV_MASK), torch.tensor(0.85))


def test_explained_variance_of_constant_returns_is_zero_not_nan() -> None:
    returns = torch.full((2, 3), 0.1)  # 0.1 is not exact in binary: a naive ratio is noise / noise
    values = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(explained_variance(values, returns, torch.ones(2, 3)), torch.tensor(0.0))
    assert torch.equal(explained_variance(values, returns, torch.zeros(2, 3)), torch.tensor(0.0))
