"""A sweep's search space: which config fields Optuna varies, and over what.

Each entry maps a dotted config key to a distribution::

    optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    algorithm.grpo.group_size: {type: int, low: 4, high: 16, step: 4}
    algorithm.name: {type: categorical, choices: [grpo, ppo]}

A key under ``algorithm.<name>.`` is **conditional** on that algorithm: it is sampled only in
trials that run ``<name>`` (the base config's algorithm, or the trial's ``algorithm.name``
when that is searched too), so one study can search "which algorithm, with which settings".
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlbench.config import RunConfig, build
from rlbench.config_files import set_dotted
from rlbench.errors import ConfigError, RLBenchError
from rlbench.registry import ALGORITHMS

TYPES = ("float", "int", "categorical")


class SearchSpaceError(RLBenchError):
    """A search space entry that cannot be sampled: names the parameter and the problem."""


@dataclass(frozen=True)
class Param:
    key: str
    """The dotted config key, e.g. ``optim.lr``."""
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @property
    def algorithm(self) -> str | None:
        """The algorithm this parameter belongs to (``algorithm.<name>.x``), else None."""
        parts = self.key.split(".")
        return parts[1] if len(parts) > 2 and parts[0] == "algorithm" else None

    def suggest(self, trial: Any) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler (a float needs a ``step``)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None and self.type == "float":
            raise SearchSpaceError(
                f"space.{self.key}: the grid sampler needs discrete values: give a float a step, "
                f"or make it categorical"
            )
        step = self.step or 1
        count = int(round((self.high - self.low) / step)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else values

    def examples(self) -> list[Any]:
        """Values that exercise the config's validation: the ends of the range, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


def parse_param(key: str, spec: Any) -> Param:
    where = f"space.{key}"
    if not isinstance(spec, Mapping) or spec.get("type") not in TYPES:
        raise SearchSpaceError(
            f"{where}={spec!r} is invalid: a distribution with type {', '.join(TYPES)}, e.g. "
            f"{{type: float, low: 1.0e-5, high: 1.0e-3, log: true}}"
        )
    kind = spec["type"]
    allowed = {"categorical": {"type", "choices"}}.get(kind, {"type", "low", "high", "log", "step"})
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SearchSpaceError(
            f"{where}: {unknown[0]!r} is not a field of a {kind} distribution: {', '.join(sorted(allowed))}"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{where}: choices={choices!r} is invalid: a non-empty list")
        return Param(key, kind, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    number = int if kind == "int" else (int, float)
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, str) and kind == "float":  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, number) or isinstance(value, bool):
            raise SearchSpaceError(
                f"{where}: {name}={value!r} is invalid: {'an integer' if kind == 'int' else 'a number'}"
            )
        if name == "low":
            low = value
        else:
            high = value
    if not low < high:
        raise SearchSpaceError(f"{where}: low={low!r} must be below high={high!r}")
    if not isinstance(log, bool):
        raise SearchSpaceError(f"{where}: log={log!r} is invalid: true or false")
    if log and low <= 0:
        raise SearchSpaceError(f"{where}: a log scale needs low > 0, got low={low!r}")
    if step is not None and (not isinstance(step, number) or isinstance(step, bool) or step <= 0 or log):
        raise SearchSpaceError(f"{where}: step={step!r} is invalid: a number > 0, and not with log: true")
    return Param(
        key, kind, float(low) if kind == "float" else low, float(high) if kind == "float" else high, log, step
    )


@dataclass
class SearchSpace:
    params: list[Param]

    def algorithms(self, base_algorithm: str) -> list[str]:
        """The algorithms trials can run: the searched ``algorithm.name`` choices, or the base's."""
        for param in self.params:
            if param.key == "algorithm.name":
                return [str(c) for c in param.choices]
        return [base_algorithm]

    def suggest(self, trial: Any, base_algorithm: str) -> dict[str, Any]:
        """The trial's values: ``algorithm.name`` first, then every parameter that applies to it."""
        values: dict[str, Any] = {}
        ordered = sorted(self.params, key=lambda p: p.key != "algorithm.name")
        for param in ordered:
            algorithm = values.get("algorithm.name", base_algorithm)
            if param.algorithm is None or param.algorithm == algorithm:
                values[param.key] = param.suggest(trial)
        return values

    def grid(self) -> dict[str, list[Any]]:
        if any(p.algorithm is not None for p in self.params) and any(
            p.key == "algorithm.name" for p in self.params
        ):
            raise SearchSpaceError(
                "space: the grid sampler cannot search conditional (per-algorithm) parameters together "
                "with algorithm.name; use tpe or random, or one sweep per algorithm"
            )
        return {p.key: p.grid() for p in self.params}


def parse_space(data: Any, base: Mapping[str, Any], source: str) -> SearchSpace:
    """Parses and checks a search space against the base config: every key must be a config
    field, and the ends of every range (every choice) must give a valid config."""
    if not isinstance(data, Mapping) or not data:
        raise SearchSpaceError(
            f"{source}: space={data!r} is invalid: a mapping of dotted config keys to distributions"
        )
    params = [parse_param(str(key), spec) for key, spec in data.items()]
    space = SearchSpace(params)
    base_algorithm = str((base.get("algorithm") or {}).get("name", "grpo"))
    names = ALGORITHMS.names()
    known = f"the algorithms: {', '.join(names)}"
    for param in params:
        if param.key == "algorithm.name":
            bad = [c for c in param.choices if c not in names]
            if bad:
                raise SearchSpaceError(
                    f"{source}: space.algorithm.name: unknown algorithm {bad[0]!r}; {known}"
                )
        if param.algorithm is not None and param.algorithm not in names:
            raise SearchSpaceError(
                f"{source}: space.{param.key}: unknown algorithm {param.algorithm!r}; {known}"
            )
        if param.algorithm is not None and param.algorithm not in space.algorithms(base_algorithm):
            raise SearchSpaceError(
                f"{source}: space.{param.key} applies to {param.algorithm}, which no trial runs "
                f"(algorithm: {', '.join(space.algorithms(base_algorithm))})"
            )
        for value in param.examples():  # the field exists and takes the range's ends
            data = copy.deepcopy(dict(base))
            if param.algorithm is not None:
                set_dotted(data, "algorithm.name", param.algorithm)
            try:
                set_dotted(data, param.key, value)
                build(RunConfig, data, "")
            except ConfigError as err:
                raise SearchSpaceError(f"{source}: space.{param.key}={value!r}: {err}") from None
    return space


def grid_size(grid: Mapping[str, list[Any]]) -> int:
    return math.prod(len(values) for values in grid.values())
