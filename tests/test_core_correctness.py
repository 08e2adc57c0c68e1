"""Regression tests for the core-loop defects of issue 13; each failed on the code before the fix.

Numbered as in the issue: 1 invisible tokens, 2 warm start selected on the eval set, 3 dropout
in rollouts, 4 filtered sampling and the inverse-CDF draw, 6 bf16-true reference, 7 checkpoint
cadence with mu, 8 robustness (concurrent builds, restartable runs, process state, the cache
argument), and the duplicated pi_old forward. (5, the DDP hang, is in ``test_ddp.py``; SIGTERM in
``test_stopping.py`` and ``test_sigterm_run``.)
"""

from __future__ import annotations

import csv
import multiprocessing
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_steps
from torch import nn

from rlbench.algorithm import RolloutBatch
from rlbench.cache import build_once
from rlbench.errors import RLBenchError
from rlbench.evaluation import greedy_correct, special_token_rows
from rlbench.forward import completion_logprobs
from rlbench.module import RLModule
from rlbench.policy import (
    char_tokenizer,
    load_policy,
    real_vocab_size,
    resolve_model_path,
)
from rlbench.prompting import encode_prompts
from rlbench.registry import TASKS
from rlbench.rollout import (
    DecodeLoop,
    Rollout,
    RolloutBackend,
    SamplingParams,
    completion_mask,
    sample_tokens,
)
from rlbench.run import train
from rlbench.task import Prompt
from rlbench.warmstart import WarmStartModule, held_out_demonstrations
from tasks.arithmetic import Arithmetic

ALPHABET = Arithmetic.alphabet


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return resolve_model_path("tiny-llama", ALPHABET, 0, tmp_path_factory.mktemp("presets"))


def module_for(config: Any) -> RLModule:
    from rlbench.warmstart import base_model_path

    return RLModule(config, base_model_path(config, TASKS.get(config.task.name)(config.task.options)))


def csv_metric(run: Path, name: str) -> dict[int, float]:
    rows = csv.DictReader((run / "csv" / "metrics.csv").open())
    return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}


# ---------------------------------------------------------------- 1. invisible tokens


class UnusedRowsWin(nn.Module):
    """A policy whose unused logit rows (ids past the tokenizer) dominate every distribution."""

    def __init__(self, model: nn.Module, first_unused: int) -> None:
        super().__init__()
        self.model, self.first_unused = model, first_unused

    def forward(self, cache: Any = None, **kwargs: Any) -> Any:
        out = self.model(cache=cache, **kwargs)
        out.logits[..., self.first_unused :] += 50.0
        return out


def test_unused_logit_rows_are_never_sampled_nor_scored(preset: str):
    model, tokenizer = load_policy(preset)
    size = real_vocab_size(tokenizer, model)
    assert size == len(tokenizer) == 18 and model.config.vocab_size == 32  # 14 ids decode to nothing
    policy = UnusedRowsWin(model.eval(), size)
    ids, mask = encode_prompts(tokenizer, ["12+34=", "7+5="] * 4, torch.device("cpu"))
    loop = DecodeLoop(tokenizer.eos_token_id, tokenizer.pad_token_id, size)
    sampled = loop.generate(policy, ids, mask, list(range(8)), SamplingParams(6))
    greedy = loop.generate(policy, ids, mask, [0] * 8, SamplingParams(6, temperature=0.0))
    assert int(sampled.completion_ids.max()) < size and int(greedy.completion_ids.max()) < size
    # the loss scores the same distribution the sampler drew from: pass-0 ratio 1 exactly
    with torch.no_grad():
        teacher, _ = completion_logprobs(
            policy, ids, mask, sampled.completion_ids, sampled.completion_mask, vocab_size=size
        )
    gap = ((teacher - sampled.logprobs) * sampled.completion_mask).abs().max()
    assert float(gap) < 1e-4


class FixedCompletions(RolloutBackend):
    """A sampler that returns given token rows (to score exactly what was 'generated')."""

    def __init__(self, rows: list[list[int]], eos: int) -> None:
        self.ids, self.eos = torch.tensor(rows), eos

    def generate(
        self, model: nn.Module, prompt_ids: Any, prompt_mask: Any, seeds: Any, params: Any
    ) -> Rollout:
        ids = self.ids[: len(prompt_ids)]
        return Rollout(ids, completion_mask(ids, self.eos), torch.zeros(ids.shape))


def test_special_token_before_eos_scores_zero_and_is_never_correct(make_config):
    module = module_for(make_config("algorithm.grpo.group_size=4", "rollout.prompts_per_step=1"))
    tok = module.tokenizer
    four, five, eos = tok.convert_tokens_to_ids("4"), tok.convert_tokens_to_ids("5"), tok.eos_token_id
    pad, unk, bos = tok.pad_token_id, tok.unk_token_id, tok.bos_token_id
    rows = [[four, five, eos, pad], [four, pad, five, eos], [four, unk, five, eos], [bos, four, five, eos]]
    assert tok.batch_decode(rows, skip_special_tokens=True) == ["45"] * 4  # all read as "45"
    mask = completion_mask(torch.tensor(rows), eos)
    assert special_token_rows(tok, torch.tensor(rows), mask).tolist() == [False, True, True, True]
    module.rollouts.backend = FixedCompletions(rows, eos)
    prompt = Prompt("12+33=", "45")
    batch, metrics = sample_one(module, prompt)
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert metrics["train/special_token_frac"] == 0.75
    task = module.task
    assert greedy_correct(module.policy, tok, task, [prompt] * 4, FixedCompletions(rows, eos), 4) == 1


def sample_one(module: RLModule, prompt: Prompt) -> tuple[RolloutBatch, dict[str, float]]:
    from rlbench.data import PromptBatch

    return module.rollouts.sample(module.policy, PromptBatch(0, 0, [prompt], [0]))


# ---------------------------------------------------------------- 2. warm start selection


def test_warm_start_selects_on_a_validation_slice_of_train_never_on_eval(make_config, preset: str):
    config = make_config("warmstart.validation_prompts=64", "eval.num_prompts=200")
    task = TASKS.get("arithmetic")(config.task.options)
    model, tokenizer = load_policy(preset)
    module = WarmStartModule(model, tokenizer, task, config)
    eval_texts = {p.text for p in task.prompts("eval", 200, config.seed)}
    validation = {p.text for p in module.validation_prompts}
    assert len(module.validation_prompts) == 64
    assert not validation & eval_texts  # the eval split is only for reporting
    assert all(not task.is_eval(parse(p)) for p in module.validation_prompts)  # train split
    demos = held_out_demonstrations(task, 512, 3, module.held_out)
    assert len(demos) == 512 and not {d[0] for d in demos} & validation  # held out of training


def test_a_validation_slice_that_leaves_no_demonstrations_is_a_clear_error(make_config):
    # 1-digit addition: 100 problems, 20 in eval; 2000 validation draws cover all 80 of train
    config = make_config("task.digits=1", "task.eval_size=20", "warmstart.validation_prompts=2000")
    task = TASKS.get("arithmetic")(config.task.options)
    from rlbench.warmstart import validation_prompts

    held_out = {p.text for p in validation_prompts(task, config)}
    with pytest.raises(
        RLBenchError,
        match=r"validation slice holds 80 distinct train prompts.* lower warmstart.validation_prompts",
    ):
        held_out_demonstrations(task, 8, 0, held_out)


def parse(prompt: Prompt) -> tuple[tuple[int, ...], tuple[str, ...]]:
    a, b = prompt.text.rstrip("=").split("+")
    return (int(a), int(b)), ("+",)


# ---------------------------------------------------------------- 3. dropout


def dropout_model(tmp_path: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer(ALPHABET)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_dropout=0.1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dropout")
    tokenizer.save_pretrained(tmp_path / "dropout")
    return str(tmp_path / "dropout")


def test_dropout_is_off_so_sampler_and_loss_see_one_policy(make_config, tmp_path: Path):
    config = make_config(
        "algorithm.grpo.mu=2", "rollout.max_new_tokens=6", "model.lora.r=2", "model.lora.dropout=0.1"
    )
    module = RLModule(config, dropout_model(tmp_path))
    ratios: list[tuple[float, float]] = []
    loss = module.algorithm.loss

    def recording_loss(logprobs: torch.Tensor, batch: RolloutBatch, scale: Any, hidden: Any = None) -> Any:
        out = loss(logprobs, batch, scale, hidden)
        ratios.append((float(out[1]["ratio_min"]), float(out[1]["ratio_max"])))
        return out

    module.algorithm.loss = recording_loss  # type: ignore[method-assign]
    metrics = run_steps(module, 1)
    assert ratios[0] == (1.0, 1.0)  # the first pass: pi_theta is pi_old
    assert metrics["train/behaviour_logprob_gap"] < 1e-4  # the sampler's log-probs are pi_old's
    batch, _, _ = module.rollouts.collect(module.policy, 1)
    module.policy.train()
    first, _ = module.policy_logprobs(batch)
    again, _ = module.policy_logprobs(batch)
    assert torch.equal(first, again)  # training forwards are deterministic: no dropout


def test_dropout_stays_in_training_forwards_when_asked(make_config, tmp_path: Path):
    module = RLModule(make_config("model.disable_dropout=false"), dropout_model(tmp_path))
    batch, _, _ = module.rollouts.collect(module.policy, 0)
    module.policy.train()
    first, _ = module.policy_logprobs(batch)
    again, _ = module.policy_logprobs(batch)
    assert not torch.equal(first, again)  # the option is honoured: dropout still acts


# ---------------------------------------------------------------- 4. sampling


def test_inverse_cdf_never_draws_a_zero_probability_token():
    log_dist = torch.log(torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    assert sample_tokens(log_dist, torch.tensor([0.0, 0.0])).tolist() == [1, 2]  # u = 0: first with mass
    just_below_one = torch.tensor([1 - 2**-24, 1 - 2**-24])
    assert sample_tokens(log_dist, just_below_one).tolist() == [2, 2]  # never the trailing zeros
    u = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    drawn = sample_tokens(log_dist[:1].expand(2000, -1), u)
    assert set(drawn.tolist()) == {1, 2} and abs(float((drawn == 1).float().mean()) - 0.5) < 0.05


def test_behaviour_logprob_gap_is_logged_and_zero(make_config):
    config = make_config("logging.mlflow=false", "trainer.max_steps=2", "algorithm.grpo.mu=2")
    train(config, progress_bar=False)
    gaps = csv_metric(Path(config.output_dir), "train/behaviour_logprob_gap")
    assert sorted(gaps) == [0, 1] and max(gaps.values()) < 1e-4


# ---------------------------------------------------------------- 6. bf16-true reference


def test_reference_runs_in_the_policy_precision(make_config):
    config = make_config("logging.mlflow=false", "trainer.max_steps=1", "trainer.precision=bf16-true")
    train(config, progress_bar=False)
    assert csv_metric(Path(config.output_dir), "train/kl") == {0: 0.0}


# ---------------------------------------------------------------- 7. checkpoint cadence


class CheckpointSpy:
    """Records the periodic checkpoint on disk after every rollout step."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.seen = directory, []

    def as_callback(self) -> Any:
        import lightning.pytorch as pl

        spy = self

        class Spy(pl.Callback):
            def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
                spy.seen.append(sorted(p.name for p in spy.directory.glob("*.ckpt")))

        return Spy()


def test_checkpoints_and_max_steps_count_rollout_steps_with_mu(make_config):
    config = make_config(
        "logging.mlflow=false", "algorithm.grpo.mu=3", "trainer.max_steps=7", "trainer.checkpoint_every=5"
    )
    spy = CheckpointSpy(Path(config.output_dir) / "checkpoints")
    summary = train(config, progress_bar=False, callbacks=[spy.as_callback()])
    assert summary["steps"] == 7 and summary["optimizer_steps"] == 21
    assert spy.seen[3] == [] and spy.seen[4] == ["last.ckpt", "step-5.ckpt"]  # after rollout step 5
    assert spy.seen[-1] == ["last.ckpt", "step-7.ckpt"]  # the last step, not a multiple of 5
    state = torch.load(Path(config.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["rlbench_state"]["rollout_step"] == 7 and state["global_step"] == 21


# ---------------------------------------------------------------- 8. robustness


def _build_preset_at_once(barrier: Any, cache: str, out: Any) -> None:
    barrier.wait()
    try:
        out.put(resolve_model_path("tiny-llama", ALPHABET, 5, Path(cache)))
    except Exception as err:  # reported to the test
        out.put(f"error: {err!r}")


def test_concurrent_preset_builds_do_not_collide(tmp_path: Path):
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_preset_at_once, args=(barrier, str(tmp_path), out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1] and not results[0].startswith("error"), results
    assert (Path(results[0]) / "config.json").is_file()
    assert sorted(p.name for p in Path(results[0]).parent.iterdir() if ".tmp" in p.name) == []


def test_build_once_builds_once_and_never_exposes_a_partial_entry(tmp_path: Path):
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "data").write_text("whole")

    def failing(tmp: Path) -> None:
        (tmp / "data").write_text("half")
        raise RuntimeError("crashed mid-build")

    entry = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        build_once(entry, failing, complete=Path.is_dir)
    assert not entry.exists()  # a crashed build leaves nothing that looks complete
    assert build_once(entry, build, complete=Path.is_dir) == entry
    assert build_once(entry, build, complete=Path.is_dir) == entry
    assert len(calls) == 1 and (entry / "data").read_text() == "whole"


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_died_before_its_first_checkpoint_can_start_again(make_config, resume: bool, capsys):
    config = make_config("logging.mlflow=false", "trainer.max_steps=1")
    out = Path(config.output_dir)
    (out / "csv").mkdir(parents=True)
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "csv" / "metrics.csv").write_text("step,train/loss\n0,123.0\n")
    (out / "mlflow_run_id").write_text("stale")
    summary = train(config, resume=resume, progress_bar=False)
    assert "its run stopped before the first checkpoint; starting it again" in capsys.readouterr().out
    assert summary["steps"] == 1 and (out / "checkpoints" / "last.ckpt").is_file()
    assert csv_metric(out, "train/loss")[0] != 123.0  # the stale log was not mixed in


def test_a_run_restores_process_wide_state(make_config):
    torch.set_num_threads(2)
    random.seed(11)
    torch.manual_seed(11)
    filters = list(warnings.filters)
    expected_python, expected_torch = random.random(), torch.rand(1)
    random.seed(11)
    torch.manual_seed(11)
    train(
        make_config("logging.mlflow=false", "trainer.max_steps=1", "trainer.num_threads=1"),
        progress_bar=False,
    )
    assert torch.get_num_threads() == 2
    assert warnings.filters == filters
    assert random.random() == expected_python and torch.equal(torch.rand(1), expected_torch)


def test_decode_loop_uses_the_cache_argument_without_deprecation_warnings(preset: str):
    model, tokenizer = load_policy(preset)
    ids, mask = encode_prompts(tokenizer, ["12+34=", "7+5="], torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DecodeLoop(tokenizer.eos_token_id, tokenizer.pad_token_id).generate(
            model.eval(), ids, mask, [1, 2], SamplingParams(4)
        )
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message)] == []


# ---------------------------------------------------------------- pi_old without an extra forward


def test_pi_old_costs_no_extra_forward(make_config):
    module = module_for(
        make_config("algorithm.grpo.mu=2", "algorithm.grpo.beta=0", "train.micro_batch_size=8")
    )
    calls: list[int] = []
    score = module.policy_forward
    module.policy_forward = lambda batch, **kw: (calls.append(len(batch)), score(batch, **kw))[1]  # type: ignore[method-assign]
    run_steps(module, 1)
    # 16 rows in micro-batches of 8, mu = 2 passes: 4 forwards; pi_old is pass 0's, not a 5th-6th
    assert calls == [8, 8, 8, 8]
