"""Config files: reading YAML, dotted ``key=value`` overrides, and the files that name a base
run config (a comparison matrix, a sweep). Errors name the file and, for YAML, the line."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from rlbench.errors import ConfigError, RLBenchError


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML file holds ({} for an empty file); a missing file, a syntax error
    (with its line) or a top level that is not a mapping is an ``RLBenchError``."""
    if not path.is_file():
        raise RLBenchError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        context, opened = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and opened:  # e.g. an unclosed list: say where it was opened
            problem += f" ({context} at line {opened.line + 1})"
        raise RLBenchError(f"config file {str(path)!r}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RLBenchError(
            f"config file {str(path)!r} must hold a mapping of sections (model:, task:, ...), "
            f"not a {type(data).__name__}"
        )
    return data


def spec_checker(
    data: Mapping[str, Any], keys: tuple[str, ...], path: Path, kind: str, error: type[RLBenchError]
) -> Callable[[str, Any, str], RLBenchError]:
    """For a file that names a base run config (a comparison matrix, a sweep): refuses keys
    not in ``keys`` and returns ``fail(key, value, allowed)``, the error naming the file."""

    def fail(key: str, value: Any, allowed: str) -> RLBenchError:
        return error(f"{path}: {key}={value!r} is invalid: {allowed}")

    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise fail(unknown[0], data[unknown[0]], f"not a {kind} key; the keys are {', '.join(keys)}")
    return fail


def read_base(base: str, path: Path, error: type[RLBenchError]) -> dict[str, Any]:
    """The run config ``base`` names, relative to the file ``path`` that names it."""
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    try:
        return read_yaml(base_path)
    except RLBenchError as err:
        raise error(f"{path}: base: {err}") from None


def parse_scalar(raw: str) -> Any:
    """An override's value as YAML reads it (``1e-4``, ``[0.9, 0.99]``, ``null``), else the text."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Sets ``a.b.c`` in nested mappings, making the sections it needs."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(part, child, f"{part!r} is a value, not a section; cannot set {key!r}")
        node = child
    node[leaf] = value
