"""Diagnostics on synthetic series: entropy collapse, grad-norm spikes, loss std, costs, pass@k
(and its curve of pass@j), maj@k."""

from __future__ import annotations

import math
import statistics
from itertools import combinations
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from rlbench.collectives import Collectives
from rlbench.diagnostics import CostMeter, EntropyCollapse, StabilityMonitor, is_spike
from rlbench.evaluation import (
    Evaluator,
    majority_correct,
    pass_at_k,
    pass_curve_ks,
    pass_metric,
    sampled_eval,
)
from rlbench.policy import load_policy, resolve_model_path
from rlbench.rollout import Rollout, RolloutBackend, SamplingParams, completion_mask
from rlbench.task import Prompt
from tasks.arithmetic import Arithmetic, ArithmeticConfig


class FakeModule:
    """What the callbacks read from RLModule: the step's metrics, the step counter, the logger."""

    def __init__(self) -> None:
        self.last_metrics: dict[str, float] = {}
        self.rollout_step = 0
        self.logged: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.setdefault(step, {}).update(metrics)

    def step(self, callbacks: list[Any], **metrics: float) -> dict[str, float]:
        self.last_metrics = {f"train/{k}" if "/" not in k else k: v for k, v in metrics.items()}
        self.rollout_step += 1
        for callback in callbacks:
            callback.on_train_batch_end(None, self, None, None, 0)
        return self.logged.get(self.rollout_step - 1, {})


def test_collapse_is_the_first_step_below_the_threshold_of_the_first_entropy(recwarn):
    detector, module = EntropyCollapse(0.1), FakeModule()
    series = [2.0, 1.5, 0.9, 0.5, 0.21, 0.19, 0.25, 0.05]  # 0.19 / 2.0 < 0.1: step 5
    logged = [module.step([detector], entropy=h) for h in series]
    assert [round(m["train/entropy_ratio"], 3) for m in logged] == [round(h / 2.0, 3) for h in series]
    assert detector.collapse_step == 5
    assert [s for s, m in enumerate(logged) if "train/collapse_step" in m] == [5]  # logged once
    assert logged[5]["train/collapse_step"] == 5.0
    warnings = [str(w.message) for w in recwarn if "entropy collapse" in str(w.message)]
    assert len(warnings) == 1 and "step 5" in warnings[0] and "collapse_threshold=0.1" in warnings[0]


def test_collapse_detector_waits_for_a_measured_entropy_and_resumes_from_its_state():
    detector, module = EntropyCollapse(0.5), FakeModule()
    module.step([detector], reward_mean=0.5)  # no entropy this step (DPO off the eval schedule)
    module.step([detector], entropy=1.0)
    assert detector.first_entropy == 1.0 and detector.collapse_step is None
    resumed = EntropyCollapse(0.5)
    resumed.load_state_dict(detector.state_dict())
    module.step([resumed], entropy=0.4)
    assert resumed.collapse_step == 2


def test_no_collapse_means_none():
    detector, module = EntropyCollapse(0.1), FakeModule()
    for h in [1.0, 0.8, 0.9, 0.5]:
        module.step([detector], entropy=h)
    assert detector.collapse_step is None


def test_spike_rule():
    window = [1.0, 1.2, 0.8, 1.0]
    mean, std = statistics.fmean(window), statistics.pstdev(window)
    assert is_spike(mean + 4.01 * std, window, 4.0)
    assert not is_spike(mean + 3.99 * std, window, 4.0)
    assert not is_spike(100.0, [1.0, 1.0, 1.0], 4.0)  # no spread: nothing to compare against
    assert not is_spike(100.0, [1.0, 2.0], 4.0)  # too short a window


def test_spike_counter_and_loss_std_over_a_trailing_window():
    monitor, module = StabilityMonitor(window=5, sigmas=4.0), FakeModule()
    norms = [1.0, 1.1, 0.9, 1.0, 1.05, 9.0, 1.0, 1.1, 0.95, 12.0]
    losses = [0.5, 0.4, 0.6, 0.5, 0.3, 0.2, 0.4, 0.1, 0.6, 0.2]
    logged = [module.step([monitor], grad_norm=g, loss=x) for g, x in zip(norms, losses)]
    spikes = [m["train/grad_norm_spikes"] for m in logged]
    # step 5 (9.0) is a spike against 1.0..1.05; step 9 (12.0) against a window that holds 9.0
    expected, count = [], 0
    for i, g in enumerate(norms):
        count += is_spike(g, norms[max(0, i - 5) : i], 4.0)
        expected.append(float(count))
    assert spikes == expected and spikes[5] == 1.0
    for i, m in enumerate(logged):
        assert m["train/loss_std"] == pytest.approx(statistics.pstdev(losses[max(0, i - 4) : i + 1]))
    resumed = StabilityMonitor(window=5, sigmas=4.0)
    resumed.load_state_dict(monitor.state_dict())
    assert list(resumed.grad_norms) == norms[-5:] and resumed.spikes == monitor.spikes


def test_cost_meter_accumulates_per_step_counts_and_wall_time_across_a_resume():
    meter, module = CostMeter(), FakeModule()
    meter.on_train_start(None, module)
    first = {"perf/samples": 64.0, "perf/tokens_generated": 300.0, "perf/tokens_trained": 600.0}
    module.step([meter], **first)
    logged = module.step([meter], **{"perf/samples": 64.0, "perf/tokens_generated": 200.0})
    assert logged["cost/samples"] == 128.0 and logged["cost/tokens_generated"] == 500.0
    assert logged["cost/tokens_trained"] == 600.0 and logged["cost/wall_s"] >= 0.0
    saved = meter.state_dict()
    resumed = CostMeter()
    resumed.load_state_dict(saved)
    resumed.on_train_start(None, module)
    logged = module.step([resumed], **{"perf/samples": 8.0})
    assert logged["cost/samples"] == 136.0 and logged["cost/wall_s"] >= saved["wall_s"]


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (c correct) that hold a correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (5, 2, 3), (8, 3, 4), (6, 6, 2), (7, 1, 7)])
def test_pass_at_k_is_the_closed_form(n: int, c: int, k: int):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n=4, c=5, k=2"):
        pass_at_k(4, 5, 2)


def test_majority_vote_over_extracted_answers():
    task = Arithmetic(ArithmeticConfig())
    prompt = Prompt("12+34=", "46")
    assert majority_correct(task, prompt, ["46", "The answer is 46.", "47"], [False] * 3)  # 46 twice
    assert not majority_correct(task, prompt, ["47", "47.0", "46"], [False] * 3)  # 47 and 47.0 agree
    assert majority_correct(task, prompt, ["46", "47"], [False, False])  # a tie: the first answer
    assert not majority_correct(task, prompt, ["46", "46", "47"], [True, True, False])  # invalid: no vote
    assert not majority_correct(task, prompt, ["no", "answer"], [False, False])


@pytest.mark.parametrize(
    ("k", "ks"), [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])]
)
def test_pass_curve_is_one_the_powers_of_two_below_k_and_k(k: int, ks: list[int]):
    assert pass_curve_ks(k) == ks


def test_pass_curve_needs_a_sample():
    with pytest.raises(ValueError, match="k=0"):
        pass_curve_ks(0)


def test_pass_metric_names_the_curve():
    assert [pass_metric(j, 8) for j in pass_curve_ks(8)] == [
        "eval/pass@1",
        "eval/pass@2",
        "eval/pass@4",
        "eval/pass@k",  # the published name, not eval/pass@8
    ]
    assert [pass_metric(j, 6) for j in pass_curve_ks(6)] == [
        "eval/pass@1",
        "eval/pass@2",
        "eval/pass@4",
        "eval/pass@k",
    ]
    assert (pass_metric(1, 1), pass_metric(8, 16), pass_metric(2, 2)) == (
        "eval/pass@1",
        "eval/pass@8",
        "eval/pass@k",
    )
    for j, k in [(3, 8), (6, 16), (0, 8), (16, 8)]:  # not logged with eval.samples=k
        with pytest.raises(ValueError, match=f"pass@{j} is not logged"):
            pass_metric(j, k)


class FixedRows(RolloutBackend):
    """A sampler that returns given completions (token rows), the first ``len(prompt_ids)``."""

    def __init__(self, rows: list[list[int]], eos: int) -> None:
        self.ids, self.eos = torch.tensor(rows), eos

    def generate(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        seeds: list[int],
        params: SamplingParams,
    ) -> Rollout:
        ids = self.ids[: len(prompt_ids)]
        return Rollout(ids, completion_mask(ids, self.eos), torch.zeros(ids.shape))


def test_pass_curve_from_the_same_k_samples(tmp_path_factory: pytest.TempPathFactory):
    """k = 8 samples: the first prompt has c = 3 correct, the second none."""
    cache = tmp_path_factory.mktemp("presets")
    model, tok = load_policy(resolve_model_path("tiny-llama", Arithmetic.alphabet, 0, cache))
    task = Arithmetic(ArithmeticConfig())
    prompts = [Prompt("12+34=", "46"), Prompt("1+1=", "2")]
    eos = tok.eos_token_id

    def row(text: str) -> list[int]:
        return [*tok.convert_tokens_to_ids(list(text)), eos]

    rows = [row("46")] * 3 + [row("47")] * 5 + [row("33")] * 8  # prompt i's samples: rows 8i .. 8i+7
    pass2, pass4 = 1 - math.comb(5, 2) / math.comb(8, 2), 1 - math.comb(5, 4) / math.comb(8, 4)
    assert (pass2, pass4) == (pytest.approx(1 - 10 / 28), pytest.approx(1 - 5 / 70))

    backend, params = FixedRows(rows, eos), SamplingParams(3)
    seeds = [list(range(8)), list(range(8, 16))]
    sums = sampled_eval(model, tok, task, prompts, backend, params, 8, seeds)
    assert sums.pass_at_j == {2: pytest.approx(pass2), 4: pytest.approx(pass4)}
    assert (sums.pass_at_1, sums.pass_at_k, sums.maj_at_k) == (pytest.approx(3 / 8), 1.0, 0.0)
    # a shard without prompts still holds every j, so all processes sum the same figures
    assert sampled_eval(model, tok, task, [], backend, params, 8, []).pass_at_j == {2: 0.0, 4: 0.0}

    dist = Collectives(pl.LightningModule())  # no trainer: one process
    evaluator = Evaluator(task, tok, backend, prompts, params, 8, 0, dist)
    metrics = evaluator.metrics(model, step=0, rank=0)
    assert set(metrics) == {"eval/accuracy", "eval/maj@k"} | {pass_metric(j, 8) for j in pass_curve_ks(8)}
    curve = [metrics[pass_metric(j, 8)] for j in pass_curve_ks(8)]  # mean over the two prompts
    assert curve == pytest.approx([3 / 16, pass2 / 2, pass4 / 2, 1 / 2])
    assert curve == sorted(curve)
