"""Config loading: every bad value is refused at load time with a message naming it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rlbench.cli import main
from rlbench.config import RunConfig, dump_yaml, load_config
from rlbench.config_help import describe, field_docs, help_text
from rlbench.errors import ConfigError, RLBenchError
from rlbench.registry import ALGORITHMS


def error_of(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises((ConfigError, RLBenchError)) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_defaults_and_required_key_names():
    flat = load_config(None).flat()
    for key in (
        "output_dir",
        "seed",
        "model.name_or_path",
        "task.name",
        "algorithm.name",
        "algorithm.grpo.beta",
        "trainer.max_steps",
        "trainer.devices",
        "trainer.precision",
        "logging.mlflow_tracking_uri",
    ):
        assert key in flat, key
    assert flat["algorithm.name"] == "grpo" and flat["task.name"] == "arithmetic"


def test_overrides_are_typed():
    config = load_config(None, ["algorithm.grpo.beta=0", "optim.lr=1e-4", "trainer.devices=auto", "seed=7"])
    assert config.algorithm.options.beta == 0.0 and isinstance(config.algorithm.options.beta, float)
    assert config.optim.lr == 1e-4  # YAML reads "1e-4" as a string; the float field converts it
    assert config.trainer.devices == "auto" and config.seed == 7


def test_unknown_algorithm_lists_choices():
    message = error_of("algorithm.name=grpoo")
    assert "algorithm.name='grpoo'" in message
    assert (
        "did you mean 'grpo'?" in message and f"valid algorithms: {', '.join(ALGORITHMS.names())}" in message
    )


def test_unknown_task_lists_choices():
    message = error_of("task.name=additon")
    assert "task.name='additon'" in message and "valid tasks: arithmetic" in message


def test_unknown_field_suggests_the_close_one():
    message = error_of("algorithm.grpo.betta=0.1")
    assert "algorithm.grpo.betta=0.1" in message and "unknown field (did you mean 'beta'?)" in message
    assert "valid fields of algorithm.grpo: group_size," in message
    assert "unknown field (did you mean 'max_steps'?)" in error_of("trainer.max_step=3")


def test_negative_group_size():
    message = error_of("algorithm.grpo.group_size=-2")
    assert message.startswith("algorithm.grpo.group_size=-2 is invalid")


def test_eps_out_of_range():
    assert error_of("algorithm.grpo.eps_low=1.5").startswith("algorithm.grpo.eps_low=1.5 is invalid")


def test_wrong_types_name_the_field():
    assert error_of("trainer.max_steps=abc") == "trainer.max_steps='abc' is invalid: an integer"
    assert "one of '32-true'" in error_of("trainer.precision=fp8")
    assert (
        error_of("algorithm.grpo.scale_rewards=maybe")
        == "algorithm.grpo.scale_rewards='maybe' is invalid: true or false"
    )


def test_yaml_syntax_error_gives_the_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nalgorithm:\n  name: grpo\n  grpo:\n    beta: [0.1\n")
    message = error_of(path=path)
    assert "YAML syntax error at line" in message and str(path) in message


def test_yaml_that_is_not_a_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "must hold a mapping" in error_of(path=path)


def test_missing_file():
    assert "does not exist" in error_of(path=Path("/nonexistent/run.yaml"))


def test_every_field_is_documented():
    for name, _default, doc in describe(RunConfig):
        assert doc, f"{name} has no docstring"
    assert "algorithm.grpo.beta" in help_text() and "task.digits" in help_text()
    assert "0 loads no reference model" in field_docs(type(load_config(None).algorithm.options))["beta"]


def test_cli_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "run.yaml"
    config.write_text("algorithm:\n  name: grpo\n  grpo:\n    group_size: -1\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "algorithm.grpo.group_size=-1 is invalid" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_train_help_lists_fields(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "rollout.max_new_tokens = 8" in out and "algorithm.grpo.eps_high" in out


# ---------------------------------------------------------------- the algorithm's own sections


def test_algorithm_option_outside_its_section_names_the_new_key(tmp_path: Path):
    """The old flat syntax (``algorithm.beta``) fails, naming where the option goes now."""
    hint = "unknown algorithm section (options go in the algorithm's own section: algorithm.grpo.beta)"
    valid = f"valid: name, {', '.join(ALGORITHMS.names())}"
    assert error_of("algorithm.beta=0.0") == f"algorithm.beta=0.0 is invalid: {hint}; {valid}"
    path = tmp_path / "flat.yaml"
    path.write_text("algorithm:\n  name: grpo\n  group_size: 4\n")
    message = error_of(path=path)
    assert message.startswith("algorithm.group_size=4 is invalid: unknown algorithm section")
    assert "algorithm.grpo.group_size" in message


def test_misspelt_algorithm_section_suggests_the_name():
    message = error_of("algorithm.grop.beta=0")
    assert message.startswith("algorithm.grop={'beta': 0} is invalid")
    assert "unknown algorithm section (did you mean 'grpo'?); valid: name, " in message
    assert message.endswith(", ".join(ALGORITHMS.names()))
    assert "(did you mean" not in error_of("algorithm.zzz.beta=0")  # nothing close: no guess


def test_typo_inside_the_selected_algorithm_section(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  name: grpo\n  grpo:\n    group_size: 4\n    betta: 0.1\n")
    message = error_of(path=path)
    assert message.startswith("algorithm.grpo.betta=0.1 is invalid: unknown field (did you mean 'beta'?)")
    assert "valid fields of algorithm.grpo:" in message


@dataclass
class _OtherConfig:
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1:
            raise ConfigError("gamma", self.gamma, "a number in (0, 1]")


class _Other:
    """A stand-in second algorithm: only its ``Config`` is used while grpo is selected."""

    Config = _OtherConfig


@pytest.fixture
def other_algorithm(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers ``test-other`` for one test only (``ALGORITHMS.names()`` is back to grpo after)."""
    monkeypatch.setitem(ALGORITHMS._items, "test-other", _Other)
    return "test-other"


def test_sections_of_algorithms_not_selected_are_validated(other_algorithm: str, tmp_path: Path):
    """A typo in a section is refused at load even when that algorithm is not the one selected
    (stand-in algorithm until a second real one, e.g. ppo, is registered)."""
    path = tmp_path / "run.yaml"
    path.write_text(f"algorithm:\n  name: grpo\n  {other_algorithm}:\n    gama: 0.9\n")
    message = error_of(path=path)
    assert message.startswith(
        f"algorithm.{other_algorithm}.gama=0.9 is invalid: unknown field (did you mean 'gamma'?)"
    )
    assert error_of(f"algorithm.{other_algorithm}.gamma=2").startswith(
        f"algorithm.{other_algorithm}.gamma=2.0 is invalid: a number in (0, 1]"
    )
    config = load_config(None, [f"algorithm.{other_algorithm}.gamma=0.5", "algorithm.grpo.beta=0"])
    assert config.algorithm.name == "grpo" and config.algorithm.options.beta == 0.0
    assert config.algorithm.sections[other_algorithm] == _OtherConfig(gamma=0.5)
    flat = config.flat()
    assert flat["algorithm.grpo.beta"] == 0.0
    assert not any(key.startswith(f"algorithm.{other_algorithm}.") for key in flat)  # not in effect


def test_cli_exits_2_on_an_algorithm_option_outside_its_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    output_dir = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text("algorithm:\n  name: grpo\n  beta: 0.0\n")
    argv = ["train", "--config", str(config), f"output_dir={output_dir}", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "algorithm.beta=0.0 is invalid: unknown algorithm section" in err and "Traceback" not in err
    assert "algorithm.grpo.beta" in err
    config.write_text("algorithm:\n  name: grpo\n")
    assert main([*argv, "algorithm.grop.beta=0"]) == 2  # the same mistake as an override
    err = capsys.readouterr().err
    assert "algorithm.grop=" in err and "did you mean 'grpo'?" in err and "Traceback" not in err
    assert not output_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_flat_holds_the_selected_algorithm_section():
    flat = load_config(None, ["algorithm.grpo.beta=0.0", "algorithm.grpo.mu=2"]).flat()
    assert flat["algorithm.name"] == "grpo"
    assert flat["algorithm.grpo.beta"] == 0.0 and flat["algorithm.grpo.mu"] == 2
    assert "algorithm.beta" not in flat and "algorithm.mu" not in flat
    algorithm_keys = {key for key in flat if key.startswith("algorithm.")}
    assert algorithm_keys == {"algorithm.name"} | {
        f"algorithm.grpo.{f.name}" for f in dataclasses.fields(ALGORITHMS.get("grpo").Config)
    }


def test_dump_yaml_round_trips_the_algorithm_sections(tmp_path: Path):
    config = load_config(
        None,
        ["algorithm.grpo.beta=0.0", "algorithm.grpo.mu=2", "algorithm.grpo.group_size=4", "seed=3"],
    )
    text = dump_yaml(config)
    data = yaml.safe_load(text)
    assert data["algorithm"]["name"] == "grpo" and set(data["algorithm"]) == {"name", "grpo"}
    assert data["algorithm"]["grpo"]["beta"] == 0.0 and data["algorithm"]["grpo"]["mu"] == 2
    path = tmp_path / "config.yaml"
    path.write_text(text)
    loaded = load_config(path)
    assert loaded == config
    assert loaded.to_dict() == config.to_dict() and loaded.flat() == config.flat()
    assert loaded.algorithm.sections == {"grpo": loaded.algorithm.options}


def test_readme_documents_every_algorithm_option_from_the_field_docs():
    """The README's option tables are generated (``python -m rlbench.config_help``), so they
    cannot drift from the config dataclasses."""
    from rlbench.config_help import readme_with_options

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert readme_with_options(readme) == readme, "run: python -m rlbench.config_help"
    for name in ALGORITHMS.names():
        assert f"**`{name}`**" in readme


# ---------------------------------------------------------------- smaller steps

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_a_smaller_step_keeps_a_micro_batch_set_for_a_larger_one():
    """examples/smollm2_addition.yaml generates its 32-completion step in one micro-batch of 32;
    halving the step must not be refused over that micro-batch: it is still the whole batch."""
    example = EXAMPLES / "smollm2_addition.yaml"
    assert load_config(example).rollout.micro_batch_size == 0  # 32 of 4 prompts x 8: the whole batch
    config = load_config(example, ["rollout.prompts_per_step=2"])  # 2 x 8 = 16 completions
    assert config.rollout.micro_batch_size == 0
    # DPO samples its pairs 32 at a time, as the example's comment says
    assert load_config(example, ["algorithm.name=dpo"]).rollout.micro_batch_size == 32
    config = load_config(example, ["rollout.prompts_per_step=2", "train.micro_batch_size=64"])
    assert config.train.micro_batch_size == 0
    # below the batch it is a real bound and stays as set
    assert load_config(example, ["rollout.micro_batch_size=8"]).rollout.micro_batch_size == 8
    # stored as 0, the config written into the run directory reads back the same
    assert load_config(None, ["rollout.micro_batch_size=1000"]) == load_config(None)


def test_a_pair_algorithm_keeps_its_micro_batches_as_set():
    """DPO's micro-batches bound passes larger than its step (the pair-building samples, the
    reference's log-probs of every pair): above the step they are kept, not dropped to 0."""
    config = load_config(
        None,
        [
            "algorithm.name=dpo",
            "rollout.prompts_per_step=4",
            "rollout.micro_batch_size=64",
            "train.micro_batch_size=64",
        ],
    )
    assert (config.rollout.micro_batch_size, config.train.micro_batch_size) == (64, 64)


@pytest.mark.parametrize("field", ["rollout.micro_batch_size", "train.micro_batch_size"])
def test_a_negative_micro_batch_is_still_refused(field: str):
    with pytest.raises(ConfigError) as err:
        load_config(EXAMPLES / "smollm2_addition.yaml", ["rollout.prompts_per_step=2", f"{field}=-1"])
    assert str(err.value) == f"{field}=-1 is invalid: an integer >= 0"
    with pytest.raises(ConfigError, match=rf"^{field}='all' is invalid: an integer"):
        load_config(None, [f"{field}=all"])
