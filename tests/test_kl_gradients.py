"""Which KL each estimator descends in a loss, by exact enumeration, and k1 refused in a loss.

A loss differentiates an estimator at the sampled tokens, the samples held fixed. Over a
categorical ``pi = softmax(logits)`` the expected gradient is then, exactly,
``sum_x pi(x) * grad est(x)`` with ``pi(x)`` a constant weight. Since ``grad log r = -grad log pi``:

    k1:       E[grad log pi]                   = 0
    k2:       E[(log pi - log ref) grad log pi] = grad KL(pi || ref)
    k3:       E[(1 - ref/pi) grad log pi]       = -sum_x ref(x) grad log pi(x) = grad KL(ref || pi)
    k1+, k3+: k2's gradient                     = grad KL(pi || ref)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from algorithms.grpo import GRPOConfig
from algorithms.rloo import RLOOConfig
from rlbench.cli import main
from rlbench.errors import ConfigError
from rlbench.estimators import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k3

# 6 outcomes; arbitrary logits (float64: the identities hold to rounding, ~1e-16)
LOGITS = [0.3, -1.2, 0.8, 0.0, -0.4, 1.5]
REF_LOGITS = [-0.5, 0.7, 0.1, 1.1, -1.0, 0.2]


def policy_and_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor(REF_LOGITS, dtype=torch.float64), -1)
    return logits, torch.log_softmax(logits, -1), ref_logp


def expected_pathwise_gradient(name: str) -> torch.Tensor:
    """``sum_x pi(x) * d est(x) / d logits``, each outcome x a fixed sample, as the loss sees it."""
    logits, logp, ref_logp = policy_and_reference()
    weights = logp.detach().exp()  # the sampling probabilities: not differentiated
    (grad,) = torch.autograd.grad((weights * kl_estimate(name, logp, ref_logp)).sum(), logits)
    return grad


def analytic_gradients() -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd of the exact KL(pi || ref) and KL(ref || pi) over the 6 outcomes."""
    logits, logp, ref_logp = policy_and_reference()
    reverse = (logp.exp() * (logp - ref_logp)).sum()
    forward = (ref_logp.exp() * (ref_logp - logp)).sum()
    (grad_reverse,) = torch.autograd.grad(reverse, logits, retain_graph=True)
    (grad_forward,) = torch.autograd.grad(forward, logits)
    return grad_reverse, grad_forward


def test_the_two_kls_have_different_gradients_here():
    # otherwise the tests below could not tell which KL an estimator descends
    grad_reverse, grad_forward = analytic_gradients()
    assert float((grad_reverse - grad_forward).abs().max()) > 0.05


@pytest.mark.parametrize("name", ["k2", "k1+", "k3+"])
def test_k2_k1plus_k3plus_descend_kl_pi_to_ref(name: str):
    grad_reverse, _ = analytic_gradients()
    torch.testing.assert_close(expected_pathwise_gradient(name), grad_reverse, atol=1e-6, rtol=0)


def test_k1_expected_gradient_is_zero():
    # sum_x pi(x) grad log pi(x) = grad sum_x pi(x) = grad 1 = 0
    torch.testing.assert_close(
        expected_pathwise_gradient("k1"), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_k3_descends_the_forward_kl_ref_to_pi():
    _, grad_forward = analytic_gradients()
    torch.testing.assert_close(expected_pathwise_gradient("k3"), grad_forward, atol=1e-6, rtol=0)


def test_k1plus_and_k3plus_have_the_values_of_k1_and_k3():
    _, logp, ref_logp = policy_and_reference()
    assert torch.equal(kl_estimate("k1+", logp, ref_logp), kl_k1(logp, ref_logp))
    assert torch.equal(kl_estimate("k3+", logp, ref_logp), kl_k3(logp, ref_logp))
    # so their expected values are the exact KL(pi || ref), as k1's and k3's are
    pi = logp.detach().exp()
    exact = float((pi * (logp - ref_logp)).sum())
    for name in ("k1+", "k3+"):
        assert float((pi * kl_estimate(name, logp, ref_logp)).sum()) == pytest.approx(exact, abs=1e-12)


def test_k1plus_by_hand_on_one_token():
    # log pi = -1, log ref = -1.5: log r = -0.5. k1 = 0.5, k2 = 0.125, k3 = e^-0.5 - 1 + 0.5 = 0.106531.
    # d k2 / d log pi = -(log r) = 0.5: the gradient k1+ and k3+ pass on (k1's would be 1).
    for name, value in (("k1+", 0.5), ("k3+", math.exp(-0.5) - 0.5)):
        logp = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
        est = kl_estimate(name, logp, torch.tensor([-1.5], dtype=torch.float64))
        est.sum().backward()
        assert float(est) == pytest.approx(value, abs=1e-12)
        assert logp.grad is not None and float(logp.grad) == pytest.approx(0.5, abs=1e-12)


def test_kl_in_the_reward_gives_the_whole_sequence_kl_gradient():
    """Why RLOO's sequence form puts k1 in the reward: over 2-token sequences, REINFORCE with
    ``sum_t k1_t`` as a (negative) reward has the exact gradient of the sequences' KL(pi || ref),
    while k2 per token in a loss differentiates each token's KL at its sampled prefix only."""
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)
    second = torch.randn(3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    ref_first = torch.log_softmax(torch.randn(3, dtype=torch.float64, generator=generator), -1)
    ref_second = torch.log_softmax(torch.randn(3, 3, dtype=torch.float64, generator=generator), -1)
    logp_first, logp_second = torch.log_softmax(first, -1), torch.log_softmax(second, -1)
    # [x1, x2]: log pi(x1) + log pi(x2 | x1), all 9 sequences
    sequence_logp = logp_first[:, None] + logp_second
    sequence_ref = ref_first[:, None] + ref_second
    pi = sequence_logp.detach().exp()
    exact = torch.autograd.grad(
        (sequence_logp.exp() * (sequence_logp - sequence_ref)).sum(), (first, second), retain_graph=True
    )
    k1_sum = (sequence_logp - sequence_ref).detach()  # sum_t k1_t of each sequence
    reinforce = torch.autograd.grad((pi * k1_sum * sequence_logp).sum(), (first, second), retain_graph=True)
    for got, want in zip(reinforce, exact, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    k2_tokens = 0.5 * (logp_first - ref_first)[:, None].square() + 0.5 * (logp_second - ref_second).square()
    per_token = torch.autograd.grad((pi * k2_tokens).sum(), (first, second))
    torch.testing.assert_close(per_token[1], exact[1], atol=1e-12, rtol=0)  # the last token: the same
    assert float((per_token[0] - exact[0]).abs().max()) > 1e-3  # the prefix: its effect on later KL is missed


# ---------------------------------------------------------------- k1 refused in a loss


def test_k1_is_refused_where_the_kl_is_in_the_loss():
    with pytest.raises(
        ConfigError, match=r"kl_estimator='k1' is invalid: with the KL in the loss, k1's expected"
    ):
        GRPOConfig(beta=0.04, kl_estimator="k1")
    with pytest.raises(ConfigError, match="Use k2, k1\\+ or k3\\+"):
        RLOOConfig(form="token", kl_in="loss", kl_estimator="k1")
    # no KL term, or the KL in a reward (where only its value counts): k1 is fine
    GRPOConfig(beta=0.0, kl_estimator="k1")
    RLOOConfig(kl_estimator="k1")
    RLOOConfig(form="token", kl_in="reward", kl_estimator="k1")
    for name in ("k2", "k3", "k1+", "k3+"):
        GRPOConfig(beta=0.04, kl_estimator=name)  # type: ignore[arg-type]
        RLOOConfig(form="token", kl_in="loss", kl_estimator=name)  # type: ignore[arg-type]
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "k1+", "k3+"}


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.grpo.kl_estimator=k1"],
        ["algorithm.name=rloo", "algorithm.rloo.form=token", "algorithm.rloo.kl_estimator=k1"],
    ],
    ids=["grpo", "rloo-token"],
)
def test_the_cli_refuses_k1_in_the_loss_with_exit_status_2(overrides, capsys):
    config = Path(__file__).parents[1] / "configs" / "grpo_addition.yaml"
    code = main(["config", "--config", str(config), "--show", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "kl_estimator='k1' is invalid: with the KL in the loss" in err
    assert "k2, k1+ or k3+" in err and "k3 (gradient of the forward KL" in err
    # and the same command with k3+ resolves
    fixed = [o.replace("=k1", "=k3+") for o in overrides]
    assert main(["config", "--config", str(config), "--show", *fixed]) == 0
