"""PPO, DPO and RLOO through the one algorithm contract: their maths against hand-computed
values, and what the module gives every algorithm (scores before ``prepare``, trainable
modules in the optimiser and guard, algorithm state, losses that add up, generic batches)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from conftest import run_steps
from torch import nn

import rlbench.module
from algorithms.dpo import DPO, DPOConfig, preference_loss
from algorithms.ppo import PPO, PPOConfig
from algorithms.rloo import RLOO, RLOOConfig
from rlbench.algorithm import LossScale, RolloutBatch
from rlbench.data import minibatch_seed
from rlbench.errors import ConfigError, RLBenchError
from rlbench.guard import non_finite_gradient
from rlbench.metrics import combine_micro_batches, reduce_over_processes
from rlbench.microbatch import minibatches, take
from rlbench.module import RLModule
from rlbench.pair_source import PAIRS_FILE
from rlbench.pairs import read_pairs
from rlbench.policy import resolve_model_path
from tasks.arithmetic import Arithmetic


def batch_of(rewards: list[float], group_size: int, width: int = 3, **fields: Any) -> RolloutBatch:
    rows = len(rewards)
    return RolloutBatch(
        prompt_ids=torch.zeros(rows, 2, dtype=torch.long),
        prompt_mask=torch.ones(rows, 2, dtype=torch.long),
        completion_ids=torch.zeros(rows, width, dtype=torch.long),
        completion_mask=fields.pop("completion_mask", torch.ones(rows, width)),
        rewards=torch.tensor(rewards),
        group_size=group_size,
        **fields,
    )


# ---------------------------------------------------------------- RLOO


def test_rloo_baseline_is_the_mean_of_the_others():
    algo = RLOO(RLOOConfig(group_size=4, beta=0.0))
    batch = algo.prepare(batch_of([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], 4))
    # group 1: 1 - (0+0+1)/3 = 2/3, 0 - (1+0+1)/3 = -2/3; group 2: 1 - 2/3 = 1/3, 0 - 1 = -1
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0]
    assert batch.advantages.tolist() == pytest.approx(expected)
    assert not algo.needs_reference and not algo.needs_scores


def test_rloo_with_kl_in_the_reward_by_hand():
    algo = RLOO(RLOOConfig(group_size=2, beta=0.1, kl_in="reward", kl_estimator="k1"))
    assert algo.needs_reference and algo.needs_scores  # pi_old and pi_ref before prepare
    old = torch.tensor([[-1.0, -0.5], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -0.5], [-1.0, -1.0]])
    batch = algo.prepare(batch_of([1.0, 0.0], 2, width=2, old_logprobs=old, ref_logprobs=ref))
    # k1 = log pi_old - log pi_ref: row 0 sums to 0.5 -> reward 1 - 0.1 * 0.5 = 0.95; row 1: 0
    # leave-one-out over 2: A = [0.95 - 0, 0 - 0.95]
    assert batch.advantages.tolist() == pytest.approx([0.95, -0.95])
    scale = LossScale(2, 4, 2)
    _, metrics = algo.loss(old.clone().requires_grad_(), batch, scale)
    # the KL is in the reward, not in the loss, yet logged under the same name: at pi_old, the
    # masked mean of k1 = [0.5, 0, 0, 0] over 4 tokens
    assert float(metrics["kl"]) == pytest.approx(0.125)


def test_rloo_needs_two_completions():
    with pytest.raises(ConfigError, match="group_size=1 is invalid: an integer >= 2"):
        RLOOConfig(group_size=1)


# ---------------------------------------------------------------- PPO


def ppo_batch(**fields: Any) -> RolloutBatch:
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    zeros = torch.zeros(2, 3)
    fields = {"old_logprobs": zeros, "ref_logprobs": zeros, "old_values": zeros, **fields}
    return batch_of([1.0, 0.0], 1, completion_mask=mask, **fields)


def test_ppo_terminal_reward_reaches_every_token_without_discount():
    algo = PPO(PPOConfig(kl_ctl=0.0, gamma=1.0, lam=1.0, whiten_advantages=False))
    batch = algo.prepare(ppo_batch())
    # V = 0, gamma = lam = 1: A_t = the sum of the rewards from t on = the outcome reward
    assert batch.advantages.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert batch.returns.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_ppo_kl_in_the_reward_by_hand():
    algo = PPO(PPOConfig(kl_ctl=0.1, kl_estimator="k1", gamma=1.0, lam=1.0, whiten_advantages=False))
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -1.0, -9.0]])  # row 1's last token is padding
    batch = algo.prepare(ppo_batch(old_logprobs=old, ref_logprobs=ref))
    # row 0: k1 = [0.5, 0, -0.5] -> R = [-0.05, 0, 0.05 + 1] -> A_t = sum_{l >= t} R_l
    assert batch.advantages[0].tolist() == pytest.approx([1.0, 1.05, 1.05])
    # row 1: no KL, reward 0, the padded token counts for nothing
    assert batch.advantages[1].tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_ppo_whitening_is_global_over_processes():
    algo = PPO(PPOConfig(kl_ctl=0.0, gamma=1.0, lam=1.0))
    sums: list[torch.Tensor] = []

    def two_identical_processes(local: torch.Tensor) -> torch.Tensor:
        sums.append(local.clone())
        return 2 * local  # another process with the same batch: mean and variance unchanged

    alone = algo.prepare(ppo_batch()).advantages
    together = algo.prepare(ppo_batch(), two_identical_processes).advantages
    assert sums, "prepare must whiten through the collective"
    assert torch.allclose(alone, together, atol=1e-6)
    mask = ppo_batch().completion_mask.bool()
    assert float(alone[mask].mean()) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_by_hand():
    algo = PPO(PPOConfig(kl_ctl=0.05, adaptive_kl=True, target_kl=0.02, kl_horizon=10000))
    # KL 0.03: error 0.5, clipped to 0.2 -> 0.05 * (1 + 0.2 * 128 / 10000)
    assert algo.end_step({"train/kl": 0.03}, 128) == {"train/kl_coef": pytest.approx(0.050128)}
    # KL 0.019: error -0.05 -> * (1 - 0.05 * 100 / 10000)
    assert algo.end_step({"train/kl": 0.019}, 100)["train/kl_coef"] == pytest.approx(0.050128 * 0.9995)
    saved = algo.state_dict()
    fresh = PPO(PPOConfig(kl_ctl=0.05, adaptive_kl=True))
    fresh.load_state_dict(saved)
    assert fresh.kl_coef == algo.kl_coef != 0.05
    fixed = PPO(PPOConfig(kl_ctl=0.05))
    assert fixed.end_step({"train/kl": 1.0}, 128) == {"train/kl_coef": 0.05}


class LMHeadOnly(nn.Module):
    """The least a value head needs of a model: an output embedding of shape [vocab, hidden]."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, vocab)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_ppo_loss_is_the_sum_of_its_shares_and_they_add_up_over_micro_batches():
    torch.manual_seed(0)
    algo = PPO(PPOConfig(vf_coef=0.5, cliprange_value=0.0))
    algo.build_modules(LMHeadOnly(hidden=4, vocab=7))
    batch = ppo_batch(advantages=torch.randn(2, 3), returns=torch.randn(2, 3))
    hidden = torch.randn(2, 3, 4)
    logprobs = -torch.rand(2, 3)
    scale = LossScale(2, 5, 3)
    loss, whole = algo.loss(logprobs, batch, scale, hidden)
    # minimised together, logged apart: "loss" is the policy's share, like every algorithm's
    assert float(loss) == pytest.approx(float(whole["loss"] + 0.5 * whole["value_loss"]))
    assert "policy_loss" not in whole
    parts = [
        (algo.loss(logprobs[i : i + 1], batch.rows(slice(i, i + 1)), scale, hidden[i : i + 1])[1], n)
        for i, n in ((0, 3.0), (1, 2.0))
    ]
    combined = combine_micro_batches(parts)
    for name in ("loss", "value_loss"):
        assert combined[name] == pytest.approx(float(whole[name]), abs=1e-6), name
    # and over processes: every *_loss adds up, like train/loss
    rows: list[torch.Tensor] = []
    reduced = reduce_over_processes(
        {"train/value_loss": 0.25, "train/kl": 0.1}, 10.0, lambda t: torch.cat([t, t])
    )
    assert reduced == {"train/value_loss": 0.5, "train/kl": pytest.approx(0.1)}
    assert not rows


def test_ppo_without_an_lm_head_says_so():
    class Trunk(nn.Module):
        def get_output_embeddings(self) -> None:
            return None

    with pytest.raises(RLBenchError, match="gives no hidden states to a value head"):
        PPO(PPOConfig()).build_modules(Trunk())


# ---------------------------------------------------------------- the contract's plumbing


def test_concat_keeps_every_per_token_field():
    a = batch_of([1.0], 1, width=2, old_values=torch.ones(1, 2), returns=torch.ones(1, 2))
    b = batch_of([0.0], 1, width=3, old_values=torch.full((1, 3), 2.0), returns=torch.full((1, 3), 2.0))
    joined = RolloutBatch.concat([a, b], pad_token_id=7)
    assert joined.old_values.tolist() == [[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]]
    assert joined.returns.shape == (2, 3) and joined.rewards.tolist() == [1.0, 0.0]
    assert joined.completion_ids[0].tolist() == [0, 0, 7]  # ids pad with the pad token
    with pytest.raises(ValueError, match="only some have old_values"):
        RolloutBatch.concat([a, batch_of([0.0], 1)], pad_token_id=7)


def test_guard_names_a_non_finite_gradient_of_an_algorithm_module():
    holder = nn.Module()
    holder.policy = nn.Linear(2, 2)
    holder.algorithm_modules = nn.ModuleDict({"value_head": nn.Linear(2, 1)})
    for p in holder.parameters():
        p.grad = torch.zeros_like(p)
    holder.algorithm_modules["value_head"].weight.grad[0, 0] = math.nan
    assert non_finite_gradient(holder) == "gradient of algorithm_modules.value_head.weight"


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return resolve_model_path("tiny-llama", Arithmetic.alphabet, 0, tmp_path_factory.mktemp("presets"))


def odd_first(completion: str) -> bool:
    return completion[:1] in set("13579")


@pytest.fixture
def odd_first_digit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards a random-weight model earns about half the time (a completion starting with an
    odd digit), so every algorithm has a learning signal without a warm start."""
    monkeypatch.setattr(Arithmetic, "reward", lambda self, prompt, completion: float(odd_first(completion)))


def module_for(make_config: Any, preset: str, *overrides: str) -> RLModule:
    config = make_config(f"model.name_or_path={preset}", *overrides)
    return RLModule(config, preset)


PPO_RUN = ("algorithm.name=ppo", "algorithm.ppo.group_size=2", "algorithm.ppo.critic_lr=1e-2")


def test_ppo_value_head_is_a_trained_submodule_with_its_own_learning_rate(
    odd_first_digit, make_config, preset
):
    module = module_for(make_config, preset, *PPO_RUN, "optim.lr=1e-3")
    assert "algorithm_modules.value_head.linear.weight" in module.state_dict()
    seen: list[RolloutBatch] = []
    prepare = module.algorithm.prepare
    module.algorithm.prepare = lambda batch, reduce: (seen.append(batch), prepare(batch, reduce))[1]  # type: ignore[method-assign]
    metrics = run_steps(module, 2)
    # one pass per batch, yet pi_old, pi_ref and V_old existed before prepare
    assert all(
        b.old_logprobs is not None and b.ref_logprobs is not None and b.old_values is not None for b in seen
    )
    optimizer = module.optimizers().optimizer
    assert [g["initial_lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    assert module.algorithm_modules["value_head"].linear.weight.abs().sum() > 0  # it trained
    for name in (
        "value_loss",
        "value_grad_norm",
        "grad_norm",
        "value_explained_var",
        "returns_mean",
        "kl",
        "clip_frac",
        "entropy",
    ):
        assert math.isfinite(metrics[f"train/{name}"]), name
    assert metrics["train/kl_coef"] == 0.05


@pytest.mark.parametrize(
    "algorithm",
    [
        # micro-batch 0 scores pi_old and V_old from pass 0's own forward; 3 scores them in a
        # separate no-grad pass first: the two must agree
        (*PPO_RUN, "algorithm.ppo.ppo_epochs=2", "algorithm.ppo.adaptive_kl=true"),
        (*PPO_RUN, "algorithm.ppo.minibatches=2", "algorithm.ppo.ppo_epochs=2"),
        (
            "algorithm.name=rloo",
            "algorithm.rloo.group_size=2",
            "algorithm.rloo.kl_in=reward",
            "algorithm.rloo.mu=2",
        ),
        ("algorithm.name=dpo", "algorithm.dpo.num_prompts=64"),
    ],
    ids=["ppo-one-forward", "ppo-minibatches", "rloo", "dpo"],
)
def test_micro_batches_do_not_change_the_result(odd_first_digit, make_config, preset, algorithm, monkeypatch):
    """The step-wide loss denominators hold for every algorithm: micro-batches of 3 rows (DPO
    rounds them up to whole pairs), and micro-batches packed by a token budget (rows sorted by
    length, each trimmed to its longest completion), end where whole batches do."""
    widths: list[tuple[int, int]] = []  # (micro-batch width, batch width) under the token budget

    def spy(batch: RolloutBatch, rows: Any) -> RolloutBatch:
        part = take(batch, rows)
        widths.append((part.completion_ids.shape[1], batch.completion_ids.shape[1]))
        return part

    states = []
    for split in ("train.micro_batch_size=0", "train.micro_batch_size=3", "train.micro_batch_tokens=40"):
        torch.manual_seed(0)
        # 12 new tokens: a random-weight model ends some completions early, so lengths differ
        module = module_for(
            make_config, preset, *algorithm, split, "optim.lr=1e-3", "rollout.max_new_tokens=12"
        )
        monkeypatch.setattr(rlbench.module, "take", spy if "tokens" in split else take)
        run_steps(module, 2)
        states.append(module.state_dict())
    assert any(width < whole for width, whole in widths), "no micro-batch was trimmed: vacuous"
    # The same update up to float summation order. Adam's first steps are nearly sign(g), so an
    # element whose gradient is ~1e-9 (a token barely used) may move by a fraction of lr either
    # way: such elements are allowed if rare; a wrongly weighted micro-batch moves many.
    for other in states[1:]:
        moved = total = 0
        for name, value in states[0].items():
            diff = (other[name] - value).abs()
            assert float(diff.max()) <= 2e-3, name  # 2 x lr
            moved, total = moved + int((diff > 1e-5).sum()), total + diff.numel()
        assert moved / total < 1e-4, f"{moved} of {total} parameters differ by more than 1e-5"


# ---------------------------------------------------------------- DPO


def test_dpo_pairs_are_built_once_from_the_verifier_and_shared_by_every_seed(
    odd_first_digit, make_config, preset, tmp_path
):
    built = []
    for seed in (0, 1):
        module = module_for(
            make_config,
            preset,
            "algorithm.name=dpo",
            "algorithm.dpo.num_prompts=64",
            "algorithm.dpo.pairs_seed=0",  # a fixed pair seed (null would take the run's)
            f"seed={seed}",
        )
        module.experience.setup(module.policy, 0, 0, 1)
        built.append(module.experience.cache)
    assert built[0] == built[1]  # one cache entry: with pairs_seed fixed the run seed is not in the key
    pairs = read_pairs(built[0] / PAIRS_FILE)
    assert pairs and all(p.chosen_reward > p.rejected_reward for p in pairs)
    assert all(p.ref_chosen_logp is not None and p.ref_rejected_logp is not None for p in pairs)
    # the verifier's choice (a rejected text may look odd-first: a hidden special token scores 0)
    assert all(odd_first(p.chosen) for p in pairs)
    # built anew under another cache directory, the file is byte-identical (deterministic)
    again = module_for(
        make_config,
        preset,
        "algorithm.name=dpo",
        "algorithm.dpo.num_prompts=64",
        "algorithm.dpo.pairs_seed=0",
        "seed=5",
        f"warmstart.cache_dir={tmp_path / 'other-cache'}",
    )
    again.experience.setup(again.policy, 0, 0, 1)
    assert (again.experience.cache / PAIRS_FILE).read_bytes() == (built[0] / PAIRS_FILE).read_bytes()


def test_dpo_trains_on_pairs_and_logs_what_on_policy_runs_log(odd_first_digit, make_config, preset):
    module = module_for(
        make_config, preset, "algorithm.name=dpo", "algorithm.dpo.num_prompts=64", "optim.lr=1e-3"
    )
    assert module.reference is None  # offline pairs carry the reference's log-probs
    metrics = run_steps(module, 3)
    for name in ("loss", "reward_accuracy", "margin", "chosen_logratio", "rejected_logratio", "grad_norm"):
        assert math.isfinite(metrics[f"train/{name}"]), name
    assert metrics["train/margin"] != 0.0  # the policy moved away from the reference
    # step 2 is an eval step (eval.every_n_steps=2): a fresh sample gives entropy and reward
    assert "train/entropy" in metrics and "train/reward_mean" in metrics
    assert "train/behaviour_logprob_gap" not in metrics  # nothing was sampled to train on


def test_dpo_loss_is_reexported_under_its_public_name():
    assert DPO.experience == "pairs" and callable(preference_loss)
    logps = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, metrics = preference_loss(
        logps, mask, logps - 1, mask, torch.tensor([-2.0]), torch.tensor([-4.0]), 0.1, "sigmoid"
    )
    # h = (-2 - -2) - (-4 - -4) = 0: loss = log 2
    assert float(loss) == pytest.approx(math.log(2)) and float(metrics["margin"]) == 0.0


def test_dpo_loss_type_typo_suggests_the_name():
    with pytest.raises(
        ConfigError, match=r"loss_type='ipoo' is invalid: one of sigmoid, ipo \(did you mean 'ipo'\?\)"
    ):
        DPOConfig(loss_type="ipoo")


def test_dpo_on_a_task_without_a_verifier_needs_a_pairs_file(make_config, preset, monkeypatch):
    monkeypatch.setattr(Arithmetic, "verifiable", False)
    with pytest.raises(
        RLBenchError,
        match="no verifier to build preference pairs from; give a JSONL of pairs in algorithm.dpo.pairs_file",
    ):
        module_for(make_config, preset, "algorithm.name=dpo")


def test_dpo_reads_a_users_pairs_file(make_config, preset, tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "12+30=", "chosen": "42", "rejected": "41"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    module = module_for(make_config, preset, "algorithm.name=dpo", f"algorithm.dpo.pairs_file={path}")
    metrics = run_steps(module, 2)
    assert metrics["train/num_pairs"] == 2.0
    cached = read_pairs(module.experience.cache / PAIRS_FILE)
    assert [p.chosen for p in cached] == ["42", "2"] and all(p.ref_chosen_logp is not None for p in cached)
    # the cache is keyed by the file's content: an edited file is read afresh
    path.write_text(json.dumps(lines[0]) + "\n")
    edited = module_for(make_config, preset, "algorithm.name=dpo", f"algorithm.dpo.pairs_file={path}")
    assert edited.experience.cache != module.experience.cache


def test_online_dpo_rebuilds_its_pairs_from_the_current_policy(
    odd_first_digit, make_config, preset, tmp_path
):
    module = module_for(
        make_config,
        preset,
        "algorithm.name=dpo",
        "algorithm.dpo.num_prompts=64",
        "algorithm.dpo.refresh_every=2",
        "optim.lr=1e-3",
    )
    assert module.reference is not None  # refreshed pairs are scored by the frozen reference
    run_steps(module, 3)
    source = module.experience
    refreshed = tmp_path / "run" / "pairs" / "step-2.jsonl"
    assert source.pairs_from == 2 and refreshed.is_file()
    assert read_pairs(refreshed) == source.pairs != read_pairs(source.cache / PAIRS_FILE)
    # a run resumed after step 3 reads the pairs it trained on at step 2; after step 2, the originals
    source.setup(module.policy, 3, 0, 1)
    assert source.pairs_from == 2 and source.pairs == read_pairs(refreshed)
    source.setup(module.policy, 2, 0, 1)
    assert source.pairs_from == 0


def test_ppo_value_head_reads_the_hidden_states_under_lora(odd_first_digit, make_config, preset):
    """The LM head's input is captured through the peft wrapper: the value head trains on the
    adapted trunk, and only adapters and the head are trainable."""
    module = module_for(make_config, preset, *PPO_RUN, "model.lora.r=4")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("algorithm_modules.value_head") for n in trainable)
    metrics = run_steps(module, 2)
    assert module.algorithm_modules["value_head"].linear.weight.abs().sum() > 0
    assert math.isfinite(metrics["train/value_loss"])


def test_ppo_separate_critic_model_trains_its_own_trunk(odd_first_digit, make_config, preset):
    module = module_for(make_config, preset, *PPO_RUN, "algorithm.ppo.critic=model", "optim.lr=1e-3")
    critic = module.algorithm_modules["critic"]
    assert not module.algorithm.needs_hidden_states  # the critic runs its own forward
    assert not any(p.requires_grad for p in critic.get_output_embeddings().parameters())
    start = critic.get_input_embeddings().weight.detach().clone()
    metrics = run_steps(module, 2)
    trained = critic.get_input_embeddings().weight.detach()
    assert not torch.equal(trained, start)  # the critic's trunk learned (at critic_lr)
    assert not torch.equal(trained, module.policy.get_input_embeddings().weight.detach())  # not the policy's
    for name in ("value_loss", "values_mean", "value_clip_frac", "value_explained_var"):
        assert math.isfinite(metrics[f"train/{name}"]), name


# PPO's critic is trained as PPO's name promises: several epochs over reshuffled minibatches,
# an optional critic-only warm-up with the policy frozen, an optional stop-gradient into the
# shared trunk, and gradient norms and losses logged apart from the policy's.


def test_minibatches_are_reshuffled_every_epoch_and_reproducible():
    batch = batch_of(list(range(16)), group_size=2)  # 8 groups of 2 rows
    epochs = [minibatches(batch, k=2, group_size=2, seed=minibatch_seed(0, 5, e)) for e in range(3)]
    splits = [[sorted(p.rewards.tolist()) for p in parts] for parts in epochs]
    for parts in epochs:
        rows = sorted(r for p in parts for r in p.rewards.tolist())
        assert rows == list(range(16))  # every row once per epoch
        for p in parts:  # whole groups: rows 2g and 2g+1 travel together
            r = p.rewards.tolist()
            assert all(r[i] // 2 == r[i + 1] // 2 and r[i] % 2 == 0 for i in range(0, len(r), 2))
    assert splits[0] != splits[1] or splits[1] != splits[2]  # a new split each epoch
    # a resumed run (same seed, step and epoch) splits alike; another step differently
    again = minibatches(batch, k=2, group_size=2, seed=minibatch_seed(0, 5, 1))
    assert [p.rewards.tolist() for p in again] == [p.rewards.tolist() for p in epochs[1]]
    assert minibatch_seed(0, 5, 1) != minibatch_seed(0, 6, 1) != minibatch_seed(1, 5, 1)


def test_value_head_detach_keeps_the_value_loss_out_of_the_trunk():
    torch.manual_seed(0)
    scale = LossScale(2, 5, 3)
    batch = ppo_batch(advantages=torch.zeros(2, 3), returns=torch.randn(2, 3))
    logprobs = torch.zeros(2, 3)  # no policy gradient: only the value loss reaches the hidden states
    for detach, reaches_trunk in ((False, True), (True, False)):
        algo = PPO(PPOConfig(value_head_detach=detach, vf_coef=1.0))
        algo.build_modules(LMHeadOnly(hidden=4, vocab=7))
        assert algo.value_head is not None
        with torch.no_grad():  # a head past its zero start (at 0 no gradient flows back anyway)
            algo.value_head.linear.weight.fill_(0.5)
        hidden = torch.randn(2, 3, 4, requires_grad=True)
        loss, _ = algo.loss(logprobs, batch, scale, hidden)
        loss.backward()
        assert algo.value_head.linear.bias.grad is not None
        assert float(algo.value_head.linear.bias.grad.abs()) > 0  # the head learns either way
        trunk = 0.0 if hidden.grad is None else float(hidden.grad.abs().sum())
        assert (trunk > 0) is reaches_trunk, detach


def test_critic_warmup_trains_the_critic_alone_then_both(odd_first_digit: Any, make_config: Any, preset: str):
    module = module_for(make_config, preset, *PPO_RUN, "algorithm.ppo.critic_warmup_steps=2")
    policy_before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    head = module.algorithm_modules["value_head"].linear
    head_before = head.weight.clone()
    metrics = run_steps(module, 2)
    assert all(torch.equal(policy_before[k], v) for k, v in module.policy.state_dict().items())
    assert not torch.equal(head.weight, head_before)  # the critic trained
    assert "train/grad_norm" not in metrics and metrics["train/value_grad_norm"] > 0
    module.config.trainer.max_steps = 3
    metrics = run_steps(module, 3)  # step 2: past the warm-up, the policy moves too
    assert any(not torch.equal(policy_before[k], v) for k, v in module.policy.state_dict().items())
    assert metrics["train/grad_norm"] > 0 and metrics["train/value_grad_norm"] > 0


def test_grad_norm_and_loss_are_the_policys_alone(odd_first_digit: Any, make_config: Any, preset: str):
    """The critic's gradient norm is logged apart; with the value head detached, the
    policy's norm is exactly what the policy loss alone gives (the same run with vf_coef 0)."""
    runs = {}
    for vf in ("0.0", "1.0"):
        torch.manual_seed(0)
        module = module_for(make_config, preset, *PPO_RUN, "algorithm.ppo.value_head_detach=true",
                            f"algorithm.ppo.vf_coef={vf}", "optim.grad_clip=1000")  # fmt: skip
        runs[vf] = run_steps(module, 1)
    assert runs["0.0"]["train/grad_norm"] == pytest.approx(runs["1.0"]["train/grad_norm"], rel=1e-5)
    assert runs["0.0"]["train/loss"] == pytest.approx(runs["1.0"]["train/loss"], rel=1e-5)
    assert runs["1.0"]["train/value_grad_norm"] > 0 and runs["1.0"]["train/value_loss"] > 0
