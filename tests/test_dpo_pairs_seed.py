"""DPO's pairs follow the run's seed (``pairs_seed: null``) or one fixed seed, are cached per
seed and numerics, are scored in the precision training runs in, and show a progress bar."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from algorithms.dpo import DPO, DPOConfig
from algorithms.grpo import GRPO, GRPOConfig
from rlbench.algorithm import RolloutBatch
from rlbench.data import StepTicks
from rlbench.module import RLModule
from rlbench.pair_source import PAIRS_FILE, pairs_cache_dir
from rlbench.pairs import read_pairs
from rlbench.policy import resolve_model_path
from rlbench.progress import counted
from tasks.arithmetic import Arithmetic


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return resolve_model_path("tiny-llama", Arithmetic.alphabet, 0, tmp_path_factory.mktemp("presets"))


@pytest.fixture
def odd_first_digit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reward a random-weight model earns about half the time, so most prompts give a pair."""
    monkeypatch.setattr(
        Arithmetic, "reward", lambda self, prompt, completion: float(completion[:1] in set("13579"))
    )


def dpo_module(make_config: Any, preset: str, *overrides: str) -> RLModule:
    config = make_config(
        f"model.name_or_path={preset}", "algorithm.name=dpo", "algorithm.dpo.num_prompts=32", *overrides
    )
    return RLModule(config, preset)


def built_pairs(make_config: Any, preset: str, cache: Path, *overrides: str) -> tuple[Path, bytes]:
    """Builds the pairs of a fresh module under ``cache``; their cache entry and file bytes."""
    module = dpo_module(make_config, preset, f"warmstart.cache_dir={cache}", *overrides)
    module.experience.setup(module.policy, 0, 0, 1)
    entry = module.experience.cache
    return entry, (entry / PAIRS_FILE).read_bytes()


# ---------------------------------------------------------------- what a seed varies


def test_null_pairs_seed_draws_each_run_seed_its_own_pairs(odd_first_digit, make_config, preset, tmp_path):
    assert DPOConfig().pairs_seed is None  # the default
    entry0, pairs0 = built_pairs(make_config, preset, tmp_path / "a", "seed=0")
    entry1, pairs1 = built_pairs(make_config, preset, tmp_path / "a", "seed=1")
    assert entry0.name != entry1.name  # the run seed is in the cache key
    prompts0 = {p.prompt for p in read_pairs(entry0 / PAIRS_FILE)}
    prompts1 = {p.prompt for p in read_pairs(entry1 / PAIRS_FILE)}
    # 32 prompts of 2-digit sums drawn from other seeds: other prompts, not a reordering
    assert prompts0 and prompts1 and prompts0 != prompts1
    # the same seed, built afresh under another cache directory: byte-identical pairs
    again, pairs0_again = built_pairs(make_config, preset, tmp_path / "b", "seed=0")
    assert again.name == entry0.name and pairs0_again == pairs0 != pairs1


def test_an_integer_pairs_seed_shares_one_pair_set_across_run_seeds(
    odd_first_digit, make_config, preset, tmp_path
):
    shared = "algorithm.dpo.pairs_seed=3"
    entry0, pairs0 = built_pairs(make_config, preset, tmp_path / "a", "seed=0", shared)
    entry1, pairs1 = built_pairs(make_config, preset, tmp_path / "b", "seed=1", shared)
    assert entry0.name == entry1.name and pairs0 == pairs1  # built apart, identical
    # and pairs_seed=3 is the run seed 3's own pair set: the seed, not where it came from, counts
    entry3, pairs3 = built_pairs(make_config, preset, tmp_path / "c", "seed=3")
    assert entry3.name == entry0.name and pairs3 == pairs0


def test_seed_varies_says_what_a_seed_draws() -> None:
    assert GRPO(GRPOConfig()).seed_varies == "prompts, samples and reward noise"
    assert DPO(DPOConfig()).seed_varies.startswith("pair prompts, samples and reward noise")
    shared = DPO(DPOConfig(pairs_seed=7)).seed_varies
    assert shared.startswith("only the order") and "pairs_seed=7" in shared
    assert "pairs_file" in DPO(DPOConfig(pairs_file="p.jsonl")).seed_varies
    assert "refreshed pairs" in DPO(DPOConfig(pairs_seed=7, refresh_every=5)).seed_varies


# ---------------------------------------------------------------- numerics


def test_cache_key_holds_dtype_precision_lora_and_the_live_numerics(make_config, preset) -> None:
    def entry(*overrides: str, numerics: dict[str, str | None] | None = None) -> str:
        config = make_config(f"model.name_or_path={preset}", "algorithm.name=dpo", *overrides)
        return pairs_cache_dir(config, preset, config.algorithm.options, numerics).name

    base = entry()
    assert entry() == base  # stable
    others = [
        entry("trainer.precision=bf16-mixed"),
        entry("model.dtype=bfloat16"),
        entry("model.lora.r=4"),
        entry(numerics={"weights": "torch.float32", "autocast": "torch.bfloat16"}),
        entry("algorithm.dpo.beta=0.5"),  # a loss option: shares the pairs
    ]
    assert len({base, *others[:4]}) == 5 and others[4] == base


def test_bf16_mixed_log_ratios_are_zero_at_step_0(make_config, preset, tmp_path) -> None:
    """The cached reference log-probs are the policy's own at step 0, to 1e-5, under bf16-mixed;
    scored in fp32 outside autocast (how they were scored before) they are ~1e-3 apart."""
    path = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "12+30=", "chosen": "42", "rejected": "41"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "57+8=", "chosen": "65", "rejected": "75"},
        {"prompt": "9+90=", "chosen": "99", "rejected": "9"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    module = RLModule(
        make_config(
            f"model.name_or_path={preset}",
            "algorithm.name=dpo",
            f"algorithm.dpo.pairs_file={path}",
            "trainer.precision=bf16-mixed",
            "eval.num_prompts=4",
        ),
        preset,
    )
    seen: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    loss = module.algorithm.loss

    def spy(logprobs: torch.Tensor, batch: RolloutBatch, *args: Any) -> Any:
        if not seen:  # step 0: the policy is still the reference
            assert batch.ref_sequence_logprobs is not None
            ratio = (logprobs.detach() * batch.completion_mask).sum(-1) - batch.ref_sequence_logprobs
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                fp32 = (module.policy_forward(replace(batch)).logprobs * batch.completion_mask).sum(-1)
            seen.append((ratio, fp32 - batch.ref_sequence_logprobs, torch.is_autocast_enabled("cpu")))
        return loss(logprobs, batch, *args)

    module.algorithm.loss = spy  # type: ignore[method-assign]
    module.config.trainer.max_steps = 1
    trainer = pl.Trainer(
        max_steps=10,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=StepTicks())
    ratio, fp32_gap, autocast = seen[0]
    assert autocast  # training's forward really ran in bf16: the check is not vacuous
    assert ratio.shape == (8,)  # 4 pairs: chosen rows 0::2, rejected rows 1::2
    assert float(ratio[0::2].abs().max()) <= 1e-5  # the chosen completions' log-ratios
    assert float(ratio.abs().max()) <= 1e-5  # and the rejected ones'
    assert float(fp32_gap.abs().max()) > 1e-4  # what scoring outside autocast would have cached


# ---------------------------------------------------------------- progress


def test_counted_bar_shows_a_count_and_eta_only_when_asked_or_on_a_terminal(capsys, monkeypatch) -> None:
    with counted(10, "work", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    with counted(10, "work") as bar:  # stderr is pytest's capture, not a terminal: quiet
        bar.update(3)
    assert capsys.readouterr().err == ""
    with counted(10, "work", enabled=True) as bar:
        bar.update(10)
    assert re.search(r"work: +\d+%.*\b0/10 \[00:00<\?", capsys.readouterr().err)  # count, then ETA


def test_building_pairs_shows_its_progress_on_a_terminal(
    odd_first_digit, make_config, preset, capsys, monkeypatch
):
    module = dpo_module(make_config, preset, "algorithm.dpo.num_prompts=16")
    module.experience.setup(module.policy, 0, 0, 1)
    assert "sampling pairs" not in capsys.readouterr().err  # no terminal, no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    fresh = dpo_module(make_config, preset, "algorithm.dpo.num_prompts=16", "seed=9")
    fresh.experience.setup(fresh.policy, 0, 0, 1)
    err = capsys.readouterr().err
    assert "sampling pairs" in err and "/128 [" in err  # 16 prompts x 8 samples, counted
    assert "scoring pairs" in err
