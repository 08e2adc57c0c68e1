"""KL and advantage estimators against hand-computed values (THEORY sections 1, 2 and 9)."""

from __future__ import annotations

import math

import pytest
import torch

from rlbench.estimators import (
    KL_ESTIMATORS,
    exact_kl,
    group_advantages,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    leave_one_out_advantages,
    process_advantages,
)

# THEORY section 1 worked example: mean 0.625, population std 0.26810, sample std 0.30957.
REWARDS = torch.tensor([[0.8, 0.6, 0.2, 0.9]], dtype=torch.float64)


def test_group_advantages_population_std() -> None:
    # (0.8 - 0.625) / 0.26810 = +0.6528, (0.6 - 0.625) / 0.26810 = -0.0933, ...
    expected = torch.tensor([[0.6528, -0.0933, -1.5853, 1.0258]], dtype=torch.float64)
    got = group_advantages(REWARDS, std="population", eps=1e-8)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_group_advantages_sample_std() -> None:
    # (0.8 - 0.625) / 0.30957 = +0.5653, ... (torch.std, as TRL and verl)
    expected = torch.tensor([[0.5653, -0.0808, -1.3729, 0.8883]], dtype=torch.float64)
    got = group_advantages(REWARDS, std="sample", eps=1e-8)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # The default eps = 1e-4 moves each value by at most |A| * eps / std ~ 5e-4.
    torch.testing.assert_close(group_advantages(REWARDS), expected, atol=1e-3, rtol=0)


def test_group_advantages_without_std_scaling_is_centred_reward() -> None:
    # Dr. GRPO: r - 0.625 = [+0.175, -0.025, -0.425, +0.275]
    expected = torch.tensor([[0.175, -0.025, -0.425, 0.275]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(REWARDS, scale_by_std=False), expected)


def test_group_advantages_are_per_group_and_equal_rewards_give_zero() -> None:
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    got = group_advantages(rewards, std="population", eps=1e-8)
    # Group 0: mean 0.5, population std 0.5 -> [+1, -1]; group 1: all equal -> 0 / (0 + eps) = 0.
    torch.testing.assert_close(got, torch.tensor([[1.0, -1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("std", ["sample", "population"])
def test_group_of_one_gives_zero_not_nan(std: str) -> None:
    # The sample std of one value is undefined (torch.std gives NaN); r - mean = 0 anyway.
    got = group_advantages(torch.tensor([[0.7], [0.1]]), std=std)  # type: ignore[arg-type]
    assert torch.equal(got, torch.zeros(2, 1))


def test_leave_one_out_advantages_hand_example() -> None:
    # r = [1, 0, 0, 1]: A_0 = 1 - (0 + 0 + 1)/3 = 2/3, A_1 = 0 - (1 + 0 + 1)/3 = -2/3, ...
    got = leave_one_out_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]]))
    # Second group: A_0 = 3 - (1+2+2)/3 = 4/3, A_1 = 1 - 7/3 = -4/3, A_2 = A_3 = 2 - 6/3 = 0.
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [4 / 3, -4 / 3, 0.0, 0.0]])
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_advantages(torch.tensor([[1.0]]))


def test_process_advantages_hand_example() -> None:
    """THEORY section 5: step rewards normalised over the group, each token's advantage the sum
    of the normalised rewards of the steps ending at or after it."""
    # Group of G = 2 completions, 5 tokens each. Completion 0: steps end at tokens 1 (reward 1)
    # and 3 (reward 0); completion 1: at tokens 2 (reward 0) and 3 (reward 1).
    # R = [1, 0, 0, 1]: mean 0.5, population std 0.5, so r~ = [1, -1, -1, 1].
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    ends = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    got = process_advantages(rewards, ends, group_size=2, std="population", eps=0.0)
    # completion 0: tokens 0-1 see both steps (1 - 1 = 0), tokens 2-3 the second (-1), token 4 none
    # completion 1: tokens 0-2 see both (-1 + 1 = 0), token 3 the second (+1), token 4 none
    expected = torch.tensor([[0.0, 0.0, -1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    # sample std: sqrt(1/3) -> r~ = +-0.5 / 0.57735 = +-0.86603
    sample = process_advantages(rewards, ends, group_size=2, std="sample", eps=0.0)
    torch.testing.assert_close(sample, expected * 0.5 / math.sqrt(1 / 3))
    # Dr. GRPO style (no std): centred rewards +-0.5
    torch.testing.assert_close(process_advantages(rewards, ends, 2, scale_by_std=False), expected * 0.5)
    # two groups are normalised separately; a group whose step rewards are all equal gets 0
    # (eps keeps 0 / 0 away)
    both = process_advantages(torch.cat([rewards, ends]), torch.cat([ends, ends]), 2, std="population")
    torch.testing.assert_close(both[:2], expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(both[2:], torch.zeros(2, 5, dtype=torch.float64))


# Two categorical distributions: q = policy (sampled from), p = reference.
Q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
P = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
# KL(q||p) = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.3)
#          = 0.45815 - 0.15325 - 0.08109 = 0.22380
EXACT_KL = sum(q * math.log(q / p) for q, p in zip(Q.tolist(), P.tolist(), strict=True))


def _samples(n: int = 200_000) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.multinomial(Q, n, replacement=True, generator=generator)
    return Q.log()[x], P.log()[x]


def test_exact_kl_constant_matches_hand_value() -> None:
    assert EXACT_KL == pytest.approx(0.22380, abs=1e-5)


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_unbiased_estimators_converge_to_exact_kl(name: str) -> None:
    logp, ref_logp = _samples()
    mean = kl_estimate(name, logp, ref_logp).mean().item()
    assert mean == pytest.approx(EXACT_KL, rel=0.02)


def test_k2_and_k3_are_nonnegative_on_every_sample() -> None:
    logp, ref_logp = _samples()
    assert (kl_k2(logp, ref_logp) >= 0).all()
    assert (kl_k3(logp, ref_logp) >= 0).all()
    # k1 is not: a token more likely under p than q (x = 1, 2) gives -log r < 0.
    assert (kl_k1(logp, ref_logp) < 0).any()


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_estimators_are_zero_for_equal_distributions(name: str) -> None:
    logp, _ = _samples(1000)
    assert torch.equal(kl_estimate(name, logp, logp.clone()), torch.zeros_like(logp))


def test_k3_is_finite_for_extreme_log_ratios() -> None:
    # log r = +-1e4 would overflow exp; the clamp keeps k3 finite and non-negative.
    logp = torch.tensor([0.0, 0.0])
    ref_logp = torch.tensor([1e4, -1e4])
    k3 = kl_k3(logp, ref_logp)
    assert torch.isfinite(k3).all() and (k3 >= 0).all()


def test_k3_plus_is_finite_for_extreme_log_ratios() -> None:
    # k3+'s k2 part uses k3's clamped log r: finite value and gradient where k3 is finite
    logp = torch.tensor([0.0, 0.0], requires_grad=True)
    k3_plus = kl_estimate("k3+", logp, torch.tensor([1e4, -1e4]))
    k3_plus.sum().backward()
    assert torch.isfinite(k3_plus).all() and logp.grad is not None and torch.isfinite(logp.grad).all()


def test_plus_estimators_by_hand() -> None:
    # log q = [-1, -2], log p = [-1.5, -1]: log r = [-0.5, 1]
    # k1 = [0.5, -1], k3 = [e^-0.5 - 0.5, e - 2] = [0.106531, 0.718282]; k2's gradient -log r = [0.5, -1]
    ref_logp = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    for name, value in (("k1+", [0.5, -1.0]), ("k3+", [math.exp(-0.5) - 0.5, math.e - 2])):
        logp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
        est = kl_estimate(name, logp, ref_logp)
        est.sum().backward()
        torch.testing.assert_close(est.detach(), torch.tensor(value, dtype=torch.float64))
        assert logp.grad is not None
        torch.testing.assert_close(logp.grad, torch.tensor([0.5, -1.0], dtype=torch.float64))


def test_unknown_estimator_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"k1, k2, k3, k1\+, k3\+"):
        kl_estimate("k4", torch.zeros(1), torch.zeros(1))


def test_exact_kl_from_logits_matches_formula() -> None:
    # Logits = log-probs + an arbitrary per-row shift (softmax is shift-invariant).
    logits_q = torch.stack([Q.log() + 3.0, P.log()])
    logits_p = torch.stack([P.log() - 1.0, P.log() + 2.0])
    got = exact_kl(logits_q, logits_p)
    torch.testing.assert_close(got, torch.tensor([EXACT_KL, 0.0], dtype=torch.float64))
