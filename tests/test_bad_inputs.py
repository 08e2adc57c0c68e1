"""A catalogue of bad inputs and how the command line answers each one.

Every case must end with exit status 2 and one line on stderr that names the field or file (and
what is allowed), with no traceback, and must leave an existing run directory exactly as it was.
A NaN reward is not here: it is a fault of a running step, handled by the NaN guard
(``tests/test_faults.py``: the update is skipped, and a run of them stops naming the cause).
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rlbench.cli import main
from rlbench.registry import TASKS
from rlbench.task import Prompt
from tasks.arithmetic import Arithmetic

# ---------------------------------------------------------------- tasks with broken reward functions


@TASKS.register("test-bad-reward-count")
class RewardCountTask(Arithmetic):
    """Returns one reward too many."""

    def rewards(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        return [0.0] * (len(completions) + 1)


@TASKS.register("test-bad-reward-string")
class RewardStringTask(Arithmetic):
    """Returns the reward as text."""

    def rewards(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        return ["1.0"] * len(completions)  # type: ignore[list-item]


@TASKS.register("test-bad-reward-tensor")
class RewardTensorTask(Arithmetic):
    """Returns a tensor of the right length instead of a list."""

    def rewards(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        return torch.zeros(len(completions))  # type: ignore[return-value]


# ---------------------------------------------------------------- the catalogue

#: A run that takes seconds: the config file of every case unless the case brings its own.
TINY = """\
warmstart:
  enabled: false
rollout:
  prompts_per_step: 2
  max_new_tokens: 2
algorithm:
  grpo:
    group_size: 2
trainer:
  max_steps: 1
eval:
  num_prompts: 4
logging:
  mlflow: false
"""
MISSING = "<no such file>"  # config: a path that does not exist
NO_CONFIG = "<no --config>"  # config: the flag left out
#: A split of 50 one-digit sums with 10 eval problems, and more eval prompts than that.
EVAL_TOO_LARGE = "task.digits=1 task.eval_size=10 eval.num_prompts=50"
WARMSTART_ON = "warmstart.enabled=true"  # the default: a bad model fails in the warm start


@dataclass(frozen=True)
class Bad:
    args: str
    """Flags and overrides after ``COMMAND --config FILE``, space-separated; ``{existing}``,
    ``{fresh}``... are filled in (see ``paths``). The base argv already points output_dir at
    ``{existing}``, a directory holding a run with a checkpoint; a later ``output_dir=`` wins."""
    expect: tuple[str, ...]
    """Fragments of the one error line, filled in like ``args``."""
    config: str = TINY
    command: str = "train"


def case(id: str, args: str, *expect: str, config: str = TINY, command: str = "train", xfail: str = ""):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(Bad(args, expect, config, command), id=id, marks=marks)


CASES = [
    # ------------------------------------------------ unknown names
    case(
        "unknown-algorithm",
        "algorithm.name=grpoo",
        "algorithm.name='grpoo'",
        "did you mean 'grpo'?",
        "valid algorithms: dpo, grpo, ppo, rloo",
    ),
    case("unknown-task", "task.name=additon", "task.name='additon'", "valid tasks:", "arithmetic"),
    case(
        "model-path-does-not-exist",
        f"model.name_or_path=./no/such/dir output_dir={{fresh}} {WARMSTART_ON}",
        "model.name_or_path='./no/such/dir': no such directory",
        "tiny-llama, small-llama, medium-llama",
    ),
    case(
        "model-preset-misspelt",
        f"model.name_or_path=tiny-lama output_dir={{fresh}} {WARMSTART_ON}",
        "model.name_or_path='tiny-lama'",
        "did you mean 'tiny-llama'?",
    ),
    case(
        "unknown-top-level-field",
        "seedd=1",
        "seedd=1 is invalid: unknown field (did you mean 'seed'?)",
        "valid fields: output_dir, seed, model,",
    ),
    case(
        "unknown-nested-field",
        "optim.lrr=0.001",
        "optim.lrr=0.001 is invalid: unknown field (did you mean 'lr'?)",
        "valid fields of optim: lr, weight_decay",
    ),
    case(
        "unknown-plugin-option",
        "algorithm.grpo.betta=0.1",
        "algorithm.grpo.betta=0.1 is invalid: unknown field (did you mean 'beta'?)",
        "valid fields of algorithm.grpo: group_size",
    ),
    case(
        "algorithm-option-outside-its-section",
        "algorithm.beta=0.0",
        "algorithm.beta=0.0 is invalid: unknown algorithm section",
        "(options go in the algorithm's own section: algorithm.grpo.beta)",
        "valid: name, ",
    ),
    case(
        "algorithm-option-outside-its-section-in-yaml",
        "",
        "algorithm.group_size=2 is invalid: unknown algorithm section",
        "algorithm.grpo.group_size",
        config=TINY.replace("  grpo:\n    group_size: 2\n", "  group_size: 2\n"),
    ),
    case(
        "misspelt-algorithm-section",
        "algorithm.grop.beta=0",
        "algorithm.grop=",
        "unknown algorithm section (did you mean 'grpo'?)",
    ),
    case("unknown-section", "bogus.x=1", "bogus=", "unknown field", "valid fields: output_dir, seed"),
    case("misspelt-section", "rollot.max_new_tokens=2", "rollot=", "did you mean 'rollout'?"),
    # ------------------------------------------------ wrong types
    case("int-given-string", "trainer.max_steps=abc", "trainer.max_steps='abc' is invalid: an integer"),
    case("int-given-fraction", "seed=1.5", "seed=1.5 is invalid: an integer"),
    case("plugin-int-given-string", "task.digits=two", "task.digits='two' is invalid: an integer"),
    case(
        "bool-given-maybe",
        "algorithm.grpo.scale_rewards=maybe",
        "algorithm.grpo.scale_rewards='maybe' is invalid: true or false",
    ),
    case("float-given-list", "optim.lr=[1,2]", "optim.lr=[1, 2] is invalid: a number"),
    case("list-given-scalar", "optim.betas=0.9", "optim.betas=0.9 is invalid: a list"),
    case("string-given-number", "logging.experiment=5", "logging.experiment=5 is invalid: a string"),
    case("devices-zero", "trainer.devices=0", "trainer.devices=0 is invalid: an integer >= 1 or 'auto'"),
    case(
        "devices-two",
        "trainer.devices=two",
        "trainer.devices='two' is invalid: an integer or one of 'auto'",
    ),
    case(
        "devices-bool",
        "trainer.devices=true",
        "trainer.devices=True is invalid: an integer or one of 'auto'",
    ),
    # ------------------------------------------------ out of range
    case(
        "group-size-negative",
        "algorithm.grpo.group_size=-2",
        "algorithm.grpo.group_size=-2 is invalid",
        ">= 1",
    ),
    case("eps-low-above-1", "algorithm.grpo.eps_low=1.5", "algorithm.grpo.eps_low=1.5 is invalid", "(0, 1)"),
    case("beta-negative", "algorithm.grpo.beta=-1", "algorithm.grpo.beta=-1.0 is invalid", ">= 0"),
    case("temperature-zero", "rollout.temperature=0", "rollout.temperature=0.0 is invalid: a number > 0"),
    case("top-p-zero", "rollout.top_p=0", "rollout.top_p=0.0 is invalid: must be 1.0: training rollouts"),
    case("top-p-filtered", "rollout.top_p=0.9", "rollout.top_p=0.9 is invalid: must be 1.0", "temperature"),
    case("top-k-negative", "rollout.top_k=-1", "rollout.top_k=-1 is invalid: must be 0"),
    case("top-k-filtered", "rollout.top_k=5", "rollout.top_k=5 is invalid: must be 0", "importance ratio"),
    case("lr-zero", "optim.lr=0", "optim.lr=0.0 is invalid: a finite number > 0"),
    case("lr-nan", "optim.lr=nan", "optim.lr=nan is invalid: a finite number > 0"),
    case("max-steps-zero", "trainer.max_steps=0", "trainer.max_steps=0 is invalid: an integer >= 1"),
    case(
        "target-accuracy-one",
        "warmstart.target_accuracy=1.0",
        "warmstart.target_accuracy=1.0 is invalid: a number in (0, 1)",
    ),
    case("eval-prompts-zero", "eval.num_prompts=0", "eval.num_prompts=0 is invalid: an integer >= 1"),
    case(
        "precision-fp8",
        "trainer.precision=fp8",
        "trainer.precision='fp8' is invalid: one of '32-true', 'bf16-mixed', 'bf16-true', '16-mixed'",
    ),
    case("mu-zero", "algorithm.grpo.mu=0", "algorithm.grpo.mu=0 is invalid", ">= 1"),
    case(
        "kl-estimator-k4",
        "algorithm.grpo.kl_estimator=k4",
        "algorithm.grpo.kl_estimator='k4'",
        "'k1', 'k2', 'k3'",
    ),
    case(
        "loss-aggregation-sum",
        "algorithm.grpo.loss_aggregation=sum",
        "algorithm.grpo.loss_aggregation='sum' is invalid",
        "'seq_mean_token_mean', 'token_mean', 'seq_mean_token_sum_norm'",
    ),
    # ------------------------------------------------ contradictory options
    case(
        "group-of-one-with-scaled-rewards",
        "algorithm.grpo.group_size=1 algorithm.grpo.scale_rewards=true",
        "algorithm.grpo.group_size=1 is invalid",
        "set scale_rewards false or group_size >= 2",
    ),
    # a micro-batch above the step's batch is the whole batch (tests/test_config.py); below 0
    # it means nothing
    case(
        "train-micro-batch-negative",
        "train.micro_batch_size=-1",
        "train.micro_batch_size=-1 is invalid: an integer >= 0",
    ),
    case(
        "rollout-micro-batch-negative",
        "rollout.micro_batch_size=-4",
        "rollout.micro_batch_size=-4 is invalid: an integer >= 0",
    ),
    case(
        "verifier-unknown",
        "task.verifier=sympy",
        "task.verifier='sympy' is invalid",
        "'extractor', 'math_verify'",
    ),
    case(
        "prompts-not-divisible-by-devices",
        "rollout.prompts_per_step=3 trainer.devices=2",
        "rollout.prompts_per_step=3 is invalid: a multiple of the 2 processes",
    ),
    case(
        "eval-prompts-above-eval-split",
        f"{EVAL_TOO_LARGE} output_dir={{fresh}}",
        "eval.num_prompts=50 is invalid",
        "task.eval_size=10",
    ),
    case(
        "eval-prompts-above-eval-split-on-resume",
        f"{EVAL_TOO_LARGE} --resume",
        "eval.num_prompts=50 is invalid",
        "task.eval_size=10",
    ),
    case(
        "eval-prompts-above-eval-split-with-warm-start",
        # a short warm start: the check comes after it, whatever it reaches
        f"{EVAL_TOO_LARGE} output_dir={{fresh}} {WARMSTART_ON} warmstart.max_steps=20",
        "eval.num_prompts=50 is invalid",
        "task.eval_size=10",
    ),
    case(
        "warmstart-command-no-validation-prompts",
        "warmstart.validation_prompts=0",
        "warmstart.validation_prompts=0 is invalid: an integer >= 1",
        command="warmstart",
    ),
    # ------------------------------------------------ trainer options only Lightning checks
    case(
        "accelerator-unknown",
        "trainer.accelerator=cpuu output_dir={fresh}",
        "trainer.accelerator='cpuu'",
        "cpu",
    ),
    case(
        "strategy-unknown",
        "trainer.strategy=bogus output_dir={fresh}",
        "trainer.strategy='bogus'",
    ),
    # ------------------------------------------------ files and the command line
    case("config-file-missing", "", "config file '{config}' does not exist", config=MISSING),
    case(
        "config-file-missing-config-command",
        "--show",
        "config file '{config}' does not exist",
        config=MISSING,
        command="config",
    ),
    case(
        "yaml-syntax-error",
        "",
        "config file '{config}': YAML syntax error at line 4",
        "mapping values are not allowed here",
        config="seed: 1\nrollout:\n  max_new_tokens: 2\n   top_k: 3\n",
    ),
    case(
        "yaml-tab-indent",
        "",
        "config file '{config}': YAML syntax error at line 2",
        config="rollout:\n\tmax_new_tokens: 3\n",
    ),
    case(
        "yaml-unclosed-list",
        "",
        "config file '{config}': YAML syntax error at line 6",
        "(while parsing a flow sequence at line 5)",
        config="seed: 1\nalgorithm:\n  name: grpo\n  grpo:\n    beta: [0.1\n",
    ),
    case(
        "yaml-is-a-list",
        "",
        "config file '{config}' must hold a mapping of sections",
        "not a list",
        config="- a\n- b\n",
    ),
    case(
        "yaml-section-is-a-scalar",
        "",
        "rollout=5 is invalid: a mapping of RolloutConfig fields",
        config="rollout: 5\n",
    ),
    case(
        "yaml-plugin-section-is-a-scalar",
        "",
        "algorithm=5 is invalid: a mapping with 'name' and one sub-section per algorithm",
        config="algorithm: 5\n",
    ),
    case(
        "yaml-algorithm-options-are-a-scalar",
        "",
        "algorithm.grpo=5 is invalid: a mapping of GRPOConfig fields",
        config="algorithm:\n  grpo: 5\n",
    ),
    case(
        "override-without-equals",
        "algorithm.grpo.beta",
        "algorithm.grpo.beta=",
        "overrides are written dotted.key=value",
    ),
    case("config-flag-missing", "", "the following arguments are required: --config", config=NO_CONFIG),
    # ------------------------------------------------ models that are not causal LMs
    case(
        "model-dir-empty",
        f"model.name_or_path={{empty_model}} --resume {WARMSTART_ON}",
        "model.name_or_path='{empty_model}': the directory holds no model (no config.json)",
    ),
    case(
        "model-dir-config-not-json",
        f"model.name_or_path={{text_model}} --resume {WARMSTART_ON}",
        "model.name_or_path='{text_model}'",
        "config.json is not a JSON model config",
    ),
    case(
        "model-dir-config-not-a-model",
        f"model.name_or_path={{json_model}} --resume {WARMSTART_ON}",
        "model.name_or_path='{json_model}'",
        "config.json has no 'model_type'",
    ),
    case(
        "model-dir-empty-on-resume-without-warm-start",
        "model.name_or_path={empty_model} --resume",
        "model.name_or_path='{empty_model}'",
    ),
    # ------------------------------------------------ run directories
    case(
        "output-dir-holds-a-run",
        "",
        "output_dir='{existing}' already holds a run; pass --resume",
    ),
    case(
        "resume-without-checkpoint",
        "output_dir={unfinished} --resume",
        "--resume: no checkpoint at '{unfinished}/checkpoints/last.ckpt'",
    ),
    case(
        "resume-into-a-new-directory",
        "output_dir={fresh} --resume",
        "--resume: no checkpoint at '{fresh}/checkpoints/last.ckpt'",
    ),
    case(
        "resume-from-a-corrupt-checkpoint",
        "output_dir={corrupt} --resume",
        "--resume: '{corrupt}/checkpoints/last.ckpt' is not a readable checkpoint (corrupt or truncated)",
    ),
    # ------------------------------------------------ preference pairs (DPO)
    case(
        "dpo-pairs-file-malformed",
        "algorithm.name=dpo algorithm.dpo.pairs_file={bad_pairs} output_dir={fresh}",
        "{bad_pairs}: line 2: missing field 'rejected'",
    ),
    case(
        "dpo-pairs-all-identical",
        "algorithm.name=dpo algorithm.dpo.pairs_file={same_pairs} output_dir={fresh}",
        "every pair has chosen == rejected",
        "nothing to prefer",
    ),
    case(
        "dpo-pairs-file-missing",
        "algorithm.name=dpo algorithm.dpo.pairs_file={tmp}/nope.jsonl output_dir={fresh}",
        "nope.jsonl: no such preference-pairs file",
    ),
    case(
        "dpo-unknown-loss-type",
        "algorithm.name=dpo algorithm.dpo.loss_type=ipoo",
        "algorithm.dpo.loss_type='ipoo' is invalid",
        "(did you mean 'ipo'?)",
    ),
    case(
        "ppo-typo-in-a-section-not-selected",
        "algorithm.ppo.gama=0.9",
        "algorithm.ppo.gama=0.9 is invalid",
        "did you mean 'gamma'?",
    ),
    # ------------------------------------------------ reward functions
    case(
        "reward-count-wrong",
        "task.name=test-bad-reward-count output_dir={fresh}",
        "task 'test-bad-reward-count': rewards() returned 5 values for 4 completions",
    ),
    case(
        "reward-not-a-number",
        "task.name=test-bad-reward-string output_dir={fresh}",
        "task 'test-bad-reward-string': rewards() returned a non-number '1.0'",
    ),
    case(
        "reward-tensor-instead-of-list",
        "task.name=test-bad-reward-tensor output_dir={fresh}",
        "task 'test-bad-reward-tensor': rewards() returned",
        "list",
    ),
]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by every case, so the tiny preset model is built once for the whole file."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def paths(tmp_path: Path, cache_dir: Path) -> dict[str, str]:
    runs = tmp_path / "runs"
    existing = runs / "existing"  # a finished run: its files must survive every bad command
    (existing / "checkpoints").mkdir(parents=True)
    # a well-formed archive, so that the checks that come after the checkpoint check are reached
    torch.save({"not": "a Lightning checkpoint"}, existing / "checkpoints" / "last.ckpt")
    corrupt = runs / "corrupt"  # a run whose last checkpoint is torn
    (corrupt / "checkpoints").mkdir(parents=True)
    (corrupt / "checkpoints" / "last.ckpt").write_text("not a real checkpoint")
    (existing / "config.yaml").write_text("seed: 0\n")
    (existing / "sentinel.txt").write_text("do not touch")
    unfinished = runs / "unfinished"  # a directory with files but no checkpoint
    unfinished.mkdir()
    (unfinished / "sentinel.txt").write_text("do not touch")
    empty_model = tmp_path / "models" / "empty"
    empty_model.mkdir(parents=True)
    text_model = tmp_path / "models" / "text"
    text_model.mkdir()
    (text_model / "config.json").write_text("this is not a model config\n")
    json_model = tmp_path / "models" / "json"
    json_model.mkdir()
    (json_model / "config.json").write_text('{"colour": "blue"}\n')
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    good = '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}'
    (pairs / "malformed.jsonl").write_text(good + '\n{"prompt": "2+2=", "chosen": "4"}\n')
    (pairs / "identical.jsonl").write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "2"}\n' * 3)
    return {
        "bad_pairs": str(pairs / "malformed.jsonl"),
        "same_pairs": str(pairs / "identical.jsonl"),
        "tmp": str(tmp_path),
        "runs": str(runs),
        "existing": str(existing),
        "unfinished": str(unfinished),
        "corrupt": str(corrupt),
        "fresh": str(tmp_path / "fresh"),
        "cache": str(cache_dir),
        "empty_model": str(empty_model),
        "text_model": str(text_model),
        "json_model": str(json_model),
    }


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub name must fail at once, not wait on the network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and directory under ``root`` with its mtime (and a file's bytes)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in sorted(root.rglob("*"))
    }


def argv_of(bad: Bad, paths: dict[str, str]) -> list[str]:
    config = Path(paths["tmp"]) / "run.yaml"
    if bad.config == MISSING:
        config = config.with_name("missing.yaml")
    elif bad.config != NO_CONFIG:
        config.write_text(bad.config)
    paths["config"] = str(config)
    argv = [bad.command]
    if bad.config != NO_CONFIG:
        argv += ["--config", str(config)]
    if bad.command != "config":
        argv += [f"warmstart.cache_dir={paths['cache']}", f"output_dir={paths['existing']}"]
    if bad.command == "train":
        argv.append("--no-progress")
    return argv + [arg.format(**paths) for arg in bad.args.split()]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    """``main(argv)``'s exit status and what a user would see on stderr, warnings included."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code: object = main(argv)
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
        except Exception:  # escapes main(): the real CLI prints a traceback and exits with 1
            code = 1
            print(traceback.format_exc(), file=sys.stderr)
    err = capsys.readouterr().err
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    for w in caught:
        if not issubclass(w.category, hidden):  # what Python shows by default
            err += warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
    return code, err


def message_lines(err: str) -> list[str]:
    """The non-empty stderr lines, less argparse's usage block in front of its error line."""
    lines = [line for line in err.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):
        lines = lines[next((i for i, line in enumerate(lines) if "error:" in line), 0) :]
    return lines


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_refused_with_one_message(
    bad: Bad, paths: dict[str, str], capsys: pytest.CaptureFixture[str]
):
    argv = argv_of(bad, paths)
    runs = Path(paths["runs"])
    before = snapshot(runs)
    code, err = run_cli(argv, capsys)
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = message_lines(err)
    assert len(lines) == 1, f"expected one message on stderr, got:\n{err}"
    assert lines[0].startswith(f"rlbench {bad.command}: error: "), lines[0]
    for fragment in bad.expect:
        assert fragment.format(**paths) in lines[0], lines[0]
    assert snapshot(runs) == before, "the bad command wrote into an existing run directory"


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(EVAL_TOO_LARGE, id="eval-prompts-above-eval-split"),
        pytest.param("model.name_or_path={empty_model}", id="model-dir-empty"),
        pytest.param("model.lora.r=2 model.lora.target_modules=[nope]", id="lora-target-not-in-model"),
        pytest.param("trainer.accelerator=cpuu", id="accelerator-unknown"),
        pytest.param("algorithm.beta=0.0", id="algorithm-option-outside-its-section"),
        pytest.param("algorithm.grop.beta=0", id="misspelt-algorithm-section"),
        pytest.param(f"model.name_or_path=./no/such/dir {WARMSTART_ON}", id="model-path-does-not-exist"),
        pytest.param(f"{EVAL_TOO_LARGE} --resume", id="resume-into-a-new-directory"),
    ],
)
def test_a_refused_start_leaves_no_partial_run(
    args: str, paths: dict[str, str], capsys: pytest.CaptureFixture[str]
):
    """Refused before training starts, a new output_dir holds nothing afterwards; otherwise
    rerunning the corrected command fails with 'already holds a run' (and --resume finds no
    checkpoint), so the user has to delete the directory first."""
    bad = Bad(f"output_dir={{fresh}} {args}", ())
    code, err = run_cli(argv_of(bad, paths), capsys)
    assert code == 2, err
    fresh = Path(paths["fresh"])
    left = sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*")) if fresh.exists() else []
    assert left == [], f"left behind in a new output_dir: {left}"


def test_real_process_prints_one_line(paths: dict[str, str]):
    """The same contract seen from outside: exit status and the whole stderr of a real process,
    for an error found at load time and one found only when the run's module is built."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, expected in (
        ("optim.lrr=0.001", "optim.lrr=0.001 is invalid: unknown field (did you mean 'lr'?)"),
        (f"{EVAL_TOO_LARGE} output_dir={{fresh}}", "eval.num_prompts=50 is invalid"),
    ):
        argv = argv_of(Bad(args, ()), paths)
        before = snapshot(Path(paths["runs"]))
        done = subprocess.run(
            [sys.executable, "-m", "rlbench.cli", *argv],
            cwd=paths["tmp"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("rlbench train: error: "), done.stderr
        assert expected in lines[0]
        assert snapshot(Path(paths["runs"])) == before
