"""The one registry type: decorator, duplicates, suggestions, entry points, `rlbench list`."""

from __future__ import annotations

import pytest

from rlbench.cli import main
from rlbench.registry import ALGORITHMS, TASKS, Registry, RegistryError


def test_register_and_get():
    registry: Registry = Registry("widget", "rlbench.test-widgets")

    @registry.register("spinner")
    class Spinner:
        """Spins."""

    assert registry.get("spinner") is Spinner and registry.names() == ["spinner"]


def test_duplicate_name_raises():
    registry: Registry = Registry("widget", "rlbench.test-widgets")
    registry.register("a")(int)
    with pytest.raises(RegistryError, match="widget 'a' is already registered by builtins.int"):
        registry.register("a")(float)


def test_unknown_name_suggests_and_lists():
    with pytest.raises(RegistryError) as info:
        ALGORITHMS.get("gpro")
    valid = ", ".join(ALGORITHMS.names())
    assert str(info.value) == f"unknown algorithm 'gpro' (did you mean 'grpo'?); valid algorithms: {valid}"


def test_builtins_come_from_entry_points():
    # Declared in pyproject.toml's entry-point groups, exactly as a third-party package would.
    assert ALGORITHMS._discover()["grpo"].value == "algorithms.grpo"
    assert TASKS._discover()["arithmetic"].value == "tasks.arithmetic"
    assert TASKS.get("arithmetic").__name__ == "Arithmetic"


def test_list_prints_descriptions(capsys: pytest.CaptureFixture[str]):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "grpo" in out and "Group Relative Policy Optimization" in out
    assert "arithmetic" in out and "tiny-llama" in out
