"""Config loading: every bad value is refused at load time with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlbench.cli import main
from rlbench.config import RunConfig, load_config
from rlbench.config_help import describe, field_docs, help_text
from rlbench.errors import ConfigError, RLBenchError


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
        "trainer.max_steps",
        "trainer.devices",
        "trainer.precision",
        "logging.mlflow_tracking_uri",
    ):
        assert key in flat, key
    assert flat["algorithm.name"] == "grpo" and flat["task.name"] == "arithmetic"


def test_overrides_are_typed():
    config = load_config(None, ["algorithm.beta=0", "optim.lr=1e-4", "trainer.devices=auto", "seed=7"])
    assert config.algorithm.options.beta == 0.0 and isinstance(config.algorithm.options.beta, float)
    assert config.optim.lr == 1e-4  # YAML reads "1e-4" as a string; the float field converts it
    assert config.trainer.devices == "auto" and config.seed == 7


def test_unknown_algorithm_lists_choices():
    message = error_of("algorithm.name=grpoo")
    assert "algorithm.name='grpoo'" in message
    assert "did you mean 'grpo'?" in message and "valid algorithms: grpo" in message


def test_unknown_task_lists_choices():
    message = error_of("task.name=additon")
    assert "task.name='additon'" in message and "valid tasks: arithmetic" in message


def test_unknown_field_suggests_the_close_one():
    message = error_of("algorithm.betta=0.1")
    assert "algorithm.betta=0.1" in message and "unknown field (did you mean 'beta'?)" in message
    assert "unknown field (did you mean 'max_steps'?)" in error_of("trainer.max_step=3")


def test_negative_group_size():
    message = error_of("algorithm.group_size=-2")
    assert message.startswith("algorithm.group_size=-2 is invalid")


def test_eps_out_of_range():
    assert error_of("algorithm.eps_low=1.5").startswith("algorithm.eps_low=1.5 is invalid")


def test_wrong_types_name_the_field():
    assert error_of("trainer.max_steps=abc") == "trainer.max_steps='abc' is invalid: an integer"
    assert "one of '32-true'" in error_of("trainer.precision=fp8")
    assert (
        error_of("algorithm.scale_rewards=maybe")
        == "algorithm.scale_rewards='maybe' is invalid: true or false"
    )


def test_yaml_syntax_error_gives_the_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nalgorithm:\n  name: grpo\n  beta: [0.1\n")
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
    assert "algorithm.beta" in help_text() and "task.digits" in help_text()
    assert "0 loads no reference model" in field_docs(type(load_config(None).algorithm.options))["beta"]


def test_cli_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "run.yaml"
    config.write_text("algorithm:\n  name: grpo\n  group_size: -1\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "algorithm.group_size=-1 is invalid" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_train_help_lists_fields(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "rollout.max_new_tokens = 8" in out and "algorithm.eps_high" in out
