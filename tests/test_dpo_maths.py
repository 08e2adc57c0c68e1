"""DPO and IPO losses against hand-computed values (THEORY sections 4 and 9)."""

from __future__ import annotations

import math

import pytest
import torch

from rlbench.preference import LOSS_TYPES, preference_loss

NAN, INF = float("nan"), float("inf")


def one_pair(chosen_extra: float = 0.0) -> dict[str, torch.Tensor]:
    """A pair whose masked positions hold garbage that a correct loss never reads.

    Chosen: 2 completion tokens, -0.25 - 0.75 = -1.0, then 2 padded positions.
    Rejected: 3 completion tokens, -0.5 - 1.0 - 0.5 = -2.0, then 1 padded position.
    Reference sums: -1.5 and -1.5. So chosen_logratio = +0.5, rejected_logratio = -0.5, h = 1.0.
    """
    return {
        "chosen_logps": torch.tensor([[-0.25 + chosen_extra, -0.75, NAN, -INF]], dtype=torch.float64),
        "chosen_mask": torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64),
        "rejected_logps": torch.tensor([[-0.5, -1.0, -0.5, 1e6]], dtype=torch.float64),
        "rejected_mask": torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64),
        "ref_chosen_logps": torch.tensor([-1.5], dtype=torch.float64),
        "ref_rejected_logps": torch.tensor([-1.5], dtype=torch.float64),
    }


def test_dpo_sigmoid_by_hand() -> None:
    # beta * h = 0.1 * 1.0; -log sigmoid(0.1) = log(1 + e^-0.1) = log1p(0.904837) = 0.644397
    loss, _ = preference_loss(**one_pair(), beta=0.1, loss_type="sigmoid")
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-12)
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)


def test_dpo_label_smoothing_by_hand() -> None:
    # s = 0.1: 0.9 * log1p(e^-0.1) + 0.1 * log1p(e^0.1) = 0.9 * 0.644397 + 0.1 * 0.744397 = 0.654397
    # (log1p(e^x) = x + log1p(e^-x), so the smoothed loss is the plain one plus s * beta * h = 0.01).
    loss, _ = preference_loss(**one_pair(), beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.654397, abs=1e-6)


def test_ipo_averages_log_ratios_over_tokens() -> None:
    # Chosen: 2 tokens summing to -1.0, ref -1.5 -> logratio +0.5, per token +0.25.
    # Rejected: 4 tokens summing to -2.0, ref -1.2 -> logratio -0.8, per token -0.2.
    # h = 0.25 - (-0.2) = 0.45; beta = 0.5 -> target 1 / (2 * 0.5) = 1; loss = (0.45 - 1)^2 = 0.3025.
    # With sequence log-ratios h would be 0.5 + 0.8 = 1.3 and the loss (1.3 - 1)^2 = 0.09.
    loss, _ = preference_loss(
        chosen_logps=torch.tensor([[-0.4, -0.6, 7.0, 7.0]], dtype=torch.float64),
        chosen_mask=torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64),
        rejected_logps=torch.tensor([[-0.5, -0.5, -0.5, -0.5, NAN]], dtype=torch.float64),
        rejected_mask=torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64),
        ref_chosen_logps=torch.tensor([-1.5], dtype=torch.float64),
        ref_rejected_logps=torch.tensor([-1.2], dtype=torch.float64),
        beta=0.5,
        loss_type="ipo",
    )
    assert loss.item() == pytest.approx(0.3025, abs=1e-12)
    assert loss.item() != pytest.approx(0.09, abs=1e-3)


def test_masked_positions_are_ignored_in_loss_and_gradient() -> None:
    # one_pair() holds nan, -inf and 1e6 at padded positions; zeroing them changes nothing.
    for loss_type in LOSS_TYPES:
        garbage = one_pair()
        clean = one_pair()
        for key in ("chosen_logps", "rejected_logps"):
            mask = clean[key.replace("logps", "mask")]
            clean[key] = torch.where(mask > 0, clean[key], 0.0)
        garbage["chosen_logps"].requires_grad_(True)
        loss, metrics = preference_loss(**garbage, beta=0.1, loss_type=loss_type)
        expected, expected_metrics = preference_loss(**clean, beta=0.1, loss_type=loss_type)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.detach(), expected)
        torch.testing.assert_close(metrics, expected_metrics)
        loss.backward()
        grad = garbage["chosen_logps"].grad
        assert torch.isfinite(grad).all()
        assert grad[0, 2:].eq(0).all()


def test_gradient_raises_chosen_and_lowers_rejected() -> None:
    pair = one_pair()
    pair["chosen_logps"].requires_grad_(True)
    pair["rejected_logps"].requires_grad_(True)
    loss, _ = preference_loss(**pair, beta=0.1, loss_type="sigmoid")
    loss.backward()
    # d loss / d chosen logp = -beta * sigmoid(-beta * h) = -0.1 * sigmoid(-0.1) = -0.047502 per token.
    expected = -0.1 / (1 + math.exp(0.1))
    torch.testing.assert_close(
        pair["chosen_logps"].grad, torch.tensor([[expected, expected, 0.0, 0.0]], dtype=torch.float64)
    )
    assert (pair["rejected_logps"].grad[0, :3] > 0).all()
    # And without autograd: a more likely chosen completion has a lower loss.
    higher, _ = preference_loss(**one_pair(chosen_extra=0.3), beta=0.1, loss_type="sigmoid")
    assert higher.item() < loss.item()


def test_ipo_gradient_pushes_margin_towards_target() -> None:
    # Per token: chosen +0.5 / 2 = 0.25, rejected -0.5 / 3 = -0.1667, so h = 0.4167 is below the target
    # 1 / (2 * 0.1) = 5 and the loss falls as the chosen completion becomes more likely.
    pair = one_pair()
    pair["chosen_logps"].requires_grad_(True)
    loss, _ = preference_loss(**pair, beta=0.1, loss_type="ipo")
    loss.backward()
    assert (pair["chosen_logps"].grad[0, :2] < 0).all()


def random_batch(num: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    chosen_mask = (torch.rand(num, 6, generator=gen) < 0.8).double()
    rejected_mask = (torch.rand(num, 9, generator=gen) < 0.8).double()
    return {
        "chosen_logps": -torch.rand(num, 6, generator=gen, dtype=torch.float64) * 2,
        "chosen_mask": chosen_mask,
        "rejected_logps": -torch.rand(num, 9, generator=gen, dtype=torch.float64) * 2,
        "rejected_mask": rejected_mask,
        "ref_chosen_logps": -torch.rand(num, generator=gen, dtype=torch.float64) * 6,
        "ref_rejected_logps": -torch.rand(num, generator=gen, dtype=torch.float64) * 9,
    }


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_losses_add_up_to_the_whole_batch(loss_type: str) -> None:
    batch = random_batch(4, seed=0)
    whole, _ = preference_loss(**batch, beta=0.2, loss_type=loss_type)
    halves = [
        preference_loss(
            **{key: value[part] for key, value in batch.items()}, beta=0.2, loss_type=loss_type, num_pairs=4
        )[0]
        for part in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(halves[0] + halves[1], whole)
    # num_pairs equal to the batch's own pair count is the mean.
    same, _ = preference_loss(**batch, beta=0.2, loss_type=loss_type, num_pairs=4)
    torch.testing.assert_close(same, whole)


def test_metrics_by_hand() -> None:
    # Pair 1 is one_pair(): chosen_logratio +0.5, rejected_logratio -0.5, margin 0.1 * 1.0 = +0.1.
    # Pair 2 swaps the sums: chosen -2.0 - (-1.5) = -0.5, rejected -1.0 - (-1.5) = +0.5, margin -0.1.
    # reward_accuracy = 1/2; margin = (0.1 - 0.1) / 2 = 0; chosen_logratio = 0; rejected_logratio = 0.
    # A third pair with chosen -1.0 - (-2.0) = +1.0, rejected -2.0 - (-1.8) = -0.2, margin 0.12, makes
    # reward_accuracy 2/3, margin 0.12 / 3 = 0.04, chosen 1.0 / 3, rejected -0.2 / 3.
    mask = torch.ones(3, 2, dtype=torch.float64)
    loss, metrics = preference_loss(
        chosen_logps=torch.tensor([[-0.5, -0.5], [-1.0, -1.0], [-0.5, -0.5]], dtype=torch.float64),
        chosen_mask=mask,
        rejected_logps=torch.tensor([[-1.0, -1.0], [-0.5, -0.5], [-1.0, -1.0]], dtype=torch.float64),
        rejected_mask=mask,
        ref_chosen_logps=torch.tensor([-1.5, -1.5, -2.0], dtype=torch.float64),
        ref_rejected_logps=torch.tensor([-1.5, -1.5, -1.8], dtype=torch.float64),
        beta=0.1,
        loss_type="sigmoid",
    )
    assert set(metrics) == {"reward_accuracy", "margin", "chosen_logratio", "rejected_logratio"}
    assert metrics["reward_accuracy"].item() == pytest.approx(2 / 3)
    assert metrics["margin"].item() == pytest.approx(0.04)
    assert metrics["chosen_logratio"].item() == pytest.approx(1.0 / 3)
    assert metrics["rejected_logratio"].item() == pytest.approx(-0.2 / 3)
    assert all(value.dim() == 0 and not value.requires_grad for value in metrics.values())


def test_equal_implicit_rewards_do_not_count_as_accurate() -> None:
    mask = torch.ones(1, 1)
    logps, ref = torch.tensor([[-1.0]]), torch.tensor([-1.0])
    _, metrics = preference_loss(logps, mask, logps, mask, ref, ref, beta=0.1, loss_type="sigmoid")
    assert metrics["reward_accuracy"].item() == 0.0


def test_unknown_loss_type_names_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        preference_loss(**one_pair(), beta=0.1, loss_type="sigmod")
    message = str(info.value)
    assert "'sigmod'" in message
    assert "did you mean 'sigmoid'?" in message
    assert "sigmoid, ipo" in message


def test_ipo_rejects_label_smoothing() -> None:
    with pytest.raises(ValueError, match=r"label_smoothing=0\.1 .*'sigmoid' only"):
        preference_loss(**one_pair(), beta=0.1, loss_type="ipo", label_smoothing=0.1)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"label_smoothing": 0.5}, "label_smoothing must be in [0, 0.5)"),
        ({"num_pairs": 0}, "num_pairs=0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, fragment: str) -> None:
    args = {"beta": 0.1, "loss_type": "sigmoid", **kwargs}
    with pytest.raises(ValueError) as info:
        preference_loss(**one_pair(), **args)
    assert fragment in str(info.value)


def test_mismatched_shapes_are_named() -> None:
    pair = one_pair()
    pair["ref_rejected_logps"] = torch.tensor([-1.5, -1.5])
    with pytest.raises(ValueError, match=r"ref_rejected_logps must have P=1 entries .* got shape \(2,\)"):
        preference_loss(**pair, beta=0.1, loss_type="sigmoid")
