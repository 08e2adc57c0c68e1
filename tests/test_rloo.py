"""RLOO's maths by hand: the published sequence form (REINFORCE on each completion's log-prob,
k1 in the reward, leave-one-out baseline), its clipped ratio with mu > 1, and the token form."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.grpo import GRPO, GRPOConfig
from algorithms.rloo import RLOO, RLOOConfig, sequence_policy_loss
from rlbench.algorithm import LossScale, RolloutBatch
from rlbench.errors import ConfigError

# One prompt, G = 3 completions of 3, 2 and 1 tokens. Padding log-probs (-7, -9) must not count.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
LOGPROBS = torch.tensor([[-0.5, -1.0, -0.25], [-2.0, -0.5, -7.0], [-1.5, -9.0, -9.0]], dtype=torch.float64)
REF = torch.tensor([[-0.75, -1.0, -0.5], [-1.5, -0.75, -7.0], [-1.0, -9.0, -9.0]], dtype=torch.float64)
REWARDS = [1.0, 0.0, 1.0]
SCALE = LossScale(num_sequences=3, num_tokens=6, max_len=3)
# k1 = log pi_old - log pi_ref per token (pi_old = these log-probs: pass 0)
#   row 0: [0.25, 0, 0.25] -> sum 0.5;  row 1: [-0.5, 0.25] -> -0.25;  row 2: [-0.5] -> -0.5
# beta = 0.1: R = [1 - 0.05, 0 + 0.025, 1 + 0.05] = [0.95, 0.025, 1.05]
# A_0 = 0.95 - (0.025 + 1.05) / 2 = 0.4125;  A_1 = 0.025 - (0.95 + 1.05) / 2 = -0.975
# A_2 = 1.05 - (0.95 + 0.025) / 2 = 0.5625
ADVANTAGES = [0.4125, -0.975, 0.5625]
# log pi(o_i) = [-1.75, -2.5, -1.5]


def batch(**fields: torch.Tensor) -> RolloutBatch:
    return RolloutBatch(
        prompt_ids=torch.zeros(3, 2, dtype=torch.long),
        prompt_mask=torch.ones(3, 2, dtype=torch.long),
        completion_ids=torch.zeros(3, 3, dtype=torch.long),
        completion_mask=MASK,
        rewards=torch.tensor(REWARDS, dtype=torch.float64),
        group_size=3,
        **fields,
    )


def loss_and_grad(algo: RLOO | GRPO, prepared: RolloutBatch) -> tuple[float, torch.Tensor, dict[str, float]]:
    logprobs = LOGPROBS.clone().requires_grad_()
    loss, metrics = algo.loss(logprobs, prepared, SCALE)
    loss.backward()
    assert logprobs.grad is not None
    return float(loss), logprobs.grad, {name: float(value) for name, value in metrics.items()}


def test_the_defaults_are_the_published_rloo():
    cfg = RLOOConfig()
    assert (cfg.form, cfg.kl_in, cfg.kl_estimator, cfg.mu) == ("sequence", "reward", "k1", 1)
    algo = RLOO(cfg)
    assert algo.needs_reference and algo.needs_scores  # pi_old and pi_ref exist before prepare


def test_sequence_form_loss_and_gradient_by_hand():
    algo = RLOO(RLOOConfig(group_size=3, beta=0.1))
    prepared = algo.prepare(batch(old_logprobs=LOGPROBS, ref_logprobs=REF))
    assert prepared.advantages.tolist() == pytest.approx(ADVANTAGES, abs=1e-12)
    loss, grad, metrics = loss_and_grad(algo, prepared)
    # L = -1/3 * (0.4125 * -1.75 + -0.975 * -2.5 + 0.5625 * -1.5)
    #   = -1/3 * (-0.721875 + 2.4375 - 0.84375) = -0.871875 / 3 = -0.290625
    assert loss == pytest.approx(-0.290625, abs=1e-12)
    # dL / d log pi(o_{i,t}) = -A_i / 3 on each of o_i's tokens, whatever its length; 0 on padding
    expected = torch.tensor(
        [[-0.1375, -0.1375, -0.1375], [0.325, 0.325, 0.0], [-0.1875, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    # one pass: the ratio is 1, so no clip fraction or ratio is logged
    assert set(metrics) == {"loss", "advantage_abs_mean", "kl"}
    # mean |A| over the 6 tokens: (3 * 0.4125 + 2 * 0.975 + 0.5625) / 6 = 3.75 / 6
    assert metrics["advantage_abs_mean"] == pytest.approx(0.625, abs=1e-12)
    # the reward's KL, per token: (0.25 + 0 + 0.25 - 0.5 + 0.25 - 0.5) / 6
    assert metrics["kl"] == pytest.approx(-0.25 / 6, abs=1e-12)


def test_sequence_form_loss_adds_up_over_micro_batches():
    algo = RLOO(RLOOConfig(group_size=3, beta=0.1))
    prepared = algo.prepare(batch(old_logprobs=LOGPROBS, ref_logprobs=REF))
    whole, _ = algo.loss(LOGPROBS, prepared, SCALE)
    # the step-wide N = 3 in every micro-batch: the parts sum to the whole
    parts = [algo.loss(LOGPROBS[rows], prepared.rows(rows), SCALE)[0] for rows in (slice(0, 2), slice(2, 3))]
    assert float(sum(parts)) == pytest.approx(float(whole), abs=1e-12)


def test_sequence_form_clips_the_sequence_ratio_when_mu_above_1():
    advantages = torch.tensor(ADVANTAGES, dtype=torch.float64)
    # pi_old differs on the first token: log pi_theta(o_i) - log pi_old(o_i) = [0.5, -0.1, -0.5]
    old = LOGPROBS.clone()
    old[:, 0] -= torch.tensor([0.5, -0.1, -0.5], dtype=torch.float64)
    logprobs = LOGPROBS.clone().requires_grad_()
    loss, metrics = sequence_policy_loss(
        logprobs, batch(old_logprobs=old, advantages=advantages), SCALE, clip=True, eps_low=0.2, eps_high=0.2
    )
    loss.backward()
    assert logprobs.grad is not None
    # row 0: rho = e^0.5 > 1.2 with A > 0: clipped, 1.2 * 0.4125 = 0.495, no gradient
    # row 1: rho = e^-0.1 in [0.8, 1.2]: rho * A = -0.975 e^-0.1
    # row 2: rho = e^-0.5 < 0.8 with A > 0: min(rho A, 0.8 A) = rho A = 0.5625 e^-0.5
    objective = [0.495, -0.975 * math.exp(-0.1), 0.5625 * math.exp(-0.5)]
    assert float(loss) == pytest.approx(-sum(objective) / 3, abs=1e-12)  # 0.0153477
    # d(rho A)/d log pi_theta(o_{i,t}) = rho A: every token of row i gets -rho_i A_i / 3
    expected = torch.tensor(
        [[0.0, 0.0, 0.0], [-objective[1] / 3] * 2 + [0.0], [-objective[2] / 3, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-12, rtol=0)
    # row 0's 3 tokens of the 6 are clipped; the ratios are per completion
    assert float(metrics["clip_frac"]) == pytest.approx(0.5)
    assert float(metrics["ratio_min"]) == pytest.approx(math.exp(-0.5))
    assert float(metrics["ratio_max"]) == pytest.approx(math.exp(0.5))


def test_sequence_form_with_mu_above_1_is_reinforce_at_pass_0():
    algo = RLOO(RLOOConfig(group_size=3, beta=0.1, mu=2))
    assert algo.passes_per_batch == 2
    prepared = algo.prepare(batch(old_logprobs=LOGPROBS, ref_logprobs=REF))
    loss, grad, metrics = loss_and_grad(algo, prepared)
    # rho = 1: the loss is -1/3 sum_i A_i = 0 (leave-one-out advantages sum to 0 in a group)
    # and the gradient is REINFORCE's, -A_i / 3
    assert loss == pytest.approx(0.0, abs=1e-12)
    reinforce = -torch.tensor(ADVANTAGES, dtype=torch.float64).unsqueeze(-1) / 3 * MASK
    torch.testing.assert_close(grad, reinforce, atol=1e-12, rtol=0)
    assert metrics["clip_frac"] == 0.0 and metrics["ratio_min"] == metrics["ratio_max"] == 1.0


def test_token_form_keeps_todays_loss():
    """``form: token`` with its defaults (KL in the loss, k3, seq_mean_token_mean) is the loss
    RLOO had before the sequence form: GRPO's clipped surrogate with leave-one-out advantages."""
    cfg = RLOOConfig(group_size=3, beta=0.1, form="token")
    assert (cfg.kl_in, cfg.kl_estimator, cfg.loss_aggregation) == ("loss", "k3", "seq_mean_token_mean")
    algo = RLOO(cfg)
    assert not algo.needs_scores  # the KL is in the loss: nothing fixed before prepare
    prepared = algo.prepare(batch(ref_logprobs=REF))
    # no KL in the reward: A = r_i - mean of the others = [1 - 0.5, 0 - 1, 1 - 0.5]
    assert prepared.advantages.tolist() == pytest.approx([0.5, -1.0, 0.5])
    loss, grad, metrics = loss_and_grad(algo, prepared)

    # k3 = e^d - 1 - d with d = log ref - log pi: row 0 d = [-0.25, 0, -0.25], row 1 [0.5, -0.25],
    # row 2 [0.5]. At pass 0 rho = 1, so per completion the mean over its tokens of A_i - 0.1 * k3:
    def k3(d: float) -> float:
        return math.exp(d) - 1 - d

    per_completion = [
        0.5 - 0.1 * (2 * k3(-0.25)) / 3,
        -1.0 - 0.1 * (k3(0.5) + k3(-0.25)) / 2,
        0.5 - 0.1 * k3(0.5),
    ]
    assert loss == pytest.approx(-sum(per_completion) / 3, abs=1e-12)  # 0.0085561
    # dL/d log pi = -(A_i - 0.1 * (1 - r_t)) / (3 |o_i|), with r = e^d (d k3 / d log pi = 1 - r)
    d = REF - LOGPROBS
    lengths = MASK.sum(-1, keepdim=True)
    advantages = torch.tensor([[0.5], [-1.0], [0.5]], dtype=torch.float64)
    expected = -(advantages - 0.1 * (1 - d.exp())) / (3 * lengths) * MASK
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    assert {"clip_frac", "ratio_min", "ratio_max", "kl", "loss", "advantage_abs_mean"} == set(metrics)


def test_token_form_is_dr_grpo_times_g_over_g_minus_1():
    # the measured reason the sequence form is the default: the token form only rescales GRPO
    rloo = RLOO(RLOOConfig(group_size=3, beta=0.0, form="token"))
    grpo = GRPO(GRPOConfig(group_size=3, beta=0.0, scale_rewards=False))
    rloo_loss, rloo_grad, _ = loss_and_grad(rloo, rloo.prepare(batch()))
    grpo_loss, grpo_grad, _ = loss_and_grad(grpo, grpo.prepare(batch()))
    assert rloo_loss == pytest.approx(1.5 * grpo_loss, abs=1e-12)
    torch.testing.assert_close(rloo_grad, 1.5 * grpo_grad, atol=1e-12, rtol=0)


def test_token_form_with_the_kl_in_the_reward_uses_k1_as_documented():
    cfg = RLOOConfig(group_size=3, beta=0.1, form="token", kl_in="reward")
    assert cfg.kl_estimator == "k1"
    algo = RLOO(cfg)
    prepared = algo.prepare(batch(old_logprobs=LOGPROBS, ref_logprobs=REF))
    # the same shaped rewards and advantages as the sequence form's
    assert prepared.advantages.tolist() == pytest.approx(ADVANTAGES, abs=1e-12)
    # k3 stays available, by name
    k3 = RLOO(RLOOConfig(group_size=3, beta=0.1, form="token", kl_in="reward", kl_estimator="k3"))
    assert k3.prepare(batch(old_logprobs=LOGPROBS, ref_logprobs=REF)).advantages.tolist() != pytest.approx(
        ADVANTAGES
    )


def test_contradictory_options_are_refused():
    with pytest.raises(ConfigError, match="kl_in='loss' is invalid: the sequence form folds the KL"):
        RLOOConfig(kl_in="loss")
    with pytest.raises(ConfigError, match="form='tokens' is invalid"):
        RLOOConfig(form="tokens")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="kl_estimator='k1' is invalid: with the KL in the loss"):
        RLOOConfig(form="token", kl_estimator="k1")
    RLOOConfig(form="token", beta=0.0, kl_estimator="k1")  # no KL term at all: nothing to refuse
