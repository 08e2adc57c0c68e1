"""A comparison matrix: algorithms x tasks x seeds (x reward-noise levels) from one base config.

A matrix file (YAML) names a base run config and the axes to cross::

    name: addition                       # MLflow experiment; default: the file's stem
    base: ../configs/grpo_addition.yaml  # relative to this file
    output_dir: runs/compare/addition    # runs/<cell>/, the report, mlflow.db, cells.db
    algorithms: [grpo, ppo, dpo, rloo]
    tasks:                               # label -> task section; default: the base's task
      addition: {name: arithmetic, digits: 2}
    seeds: [0, 1]
    warmstart_seed: 0                    # every cell starts from the same weights; null: per seed
    reward_noise: {flip_prob: [0.0, 0.1, 0.2]}   # optional: one field, its levels
    budget: {samples: 20000}             # optional: compute-matched runs
    threshold: 0.6                       # optional: accuracy for "cost to reach"; default:
                                         # halfway from the warm start to the best mean final
    set: {trainer.max_steps: 150}        # dotted overrides for every cell
    tuned: {grpo: ../runs/sweeps/grpo-addition}   # optional: an algorithm's best sweep parameters

Every cell's config is built and validated when the matrix is loaded, so a bad cell fails
before any run starts, naming the cell and the field.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlbench.config import RunConfig, build
from rlbench.config_files import read_base, read_yaml, set_dotted, spec_checker
from rlbench.errors import ConfigError, RLBenchError
from rlbench.registry import ALGORITHMS, TASKS, RegistryError

#: The reward-noise fields a matrix can sweep (``reward_noise.<field>``).
NOISE_FIELDS = ("flip_prob", "gaussian_std")
#: The budget fields a matrix can fix (``budget.<field>``).
BUDGET_FIELDS = ("samples", "tokens_generated", "wall_s")
KEYS = (
    "name",
    "base",
    "output_dir",
    "algorithms",
    "tasks",
    "seeds",
    "warmstart_seed",
    "reward_noise",
    "budget",
    "threshold",
    "set",
    "tuned",
)
#: Where a matrix's runs, logs and copy of itself live under its ``output_dir``.
RUNS_DIR, LOGS_DIR, MATRIX_FILE = "runs", "logs", "matrix.yaml"


class MatrixError(RLBenchError):
    """A matrix file that cannot run: names the file, the cell (if any) and the field."""


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: its coordinates on every axis."""

    task: str
    """The task's label in the matrix (``tasks:`` key)."""
    algorithm: str
    seed: int
    noise: float | None = None
    """The value of the matrix's noise field (``reward_noise.<field>``); None without a noise axis."""

    @property
    def id(self) -> str:
        """``addition-grpo-s0`` (``-flip_prob0.1`` on a noise axis): the run's directory name."""
        return f"{self.task}-{self.algorithm}-s{self.seed}"

    def named(self, noise_field: str | None) -> str:
        return self.id if noise_field is None else f"{self.id}-{noise_field}{self.noise:g}"

    def tags(self, noise_field: str | None) -> dict[str, str]:
        """The cell's coordinates as MLflow tags (what ``rlbench report --experiment`` reads)."""
        tags = {
            "rlbench.cell": self.named(noise_field),
            "rlbench.cell.task": self.task,
            "rlbench.cell.algorithm": self.algorithm,
            "rlbench.cell.seed": str(self.seed),
        }
        if noise_field is not None:
            tags["rlbench.cell.noise"] = f"{noise_field}={self.noise:g}"
        return tags


@dataclass
class Matrix:
    name: str
    output_dir: Path
    base: dict[str, Any]
    """The base config, as read from its file (before any matrix setting)."""
    algorithms: list[str]
    tasks: dict[str, dict[str, Any]]
    seeds: list[int]
    warmstart_seed: int | None = 0
    noise_field: str | None = None
    noise_levels: list[float] = field(default_factory=list)
    budget: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    """The accuracy the report's cost columns count to; None: halfway from the warm start's mean
    accuracy to the best algorithm's mean final accuracy (``Report.threshold``)."""
    settings: dict[str, Any] = field(default_factory=dict)
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per algorithm, the best parameters of a sweep (``best.json``), set in its cells."""
    source: str = ""
    """Where the matrix came from (its file), for error messages."""

    def cells(self) -> list[Cell]:
        """Every cell, task-major then noise level, algorithm and seed (the order runs go in)."""
        levels: list[float | None] = list(self.noise_levels) if self.noise_field else [None]
        return [
            Cell(task, algorithm, seed, level)
            for task in self.tasks
            for level in levels
            for algorithm in self.algorithms
            for seed in self.seeds
        ]

    def cell_name(self, cell: Cell) -> str:
        return cell.named(self.noise_field)

    def run_dir(self, cell: Cell) -> Path:
        return self.output_dir / RUNS_DIR / self.cell_name(cell)

    def tracking_uri(self) -> str:
        """The MLflow store every cell logs to: ``logging.mlflow_tracking_uri`` from ``set:``
        (a server), else an SQLite store in ``output_dir``."""
        uri = self.settings.get("logging.mlflow_tracking_uri")
        return str(uri) if uri else f"sqlite:///{self.output_dir.resolve() / 'mlflow.db'}"

    def cell_config(self, cell: Cell) -> RunConfig:
        """The validated run config of ``cell``; ``MatrixError`` names the cell and the field."""
        data = copy.deepcopy(self.base)
        data["task"] = copy.deepcopy(self.tasks[cell.task])
        tuned = {k: v for k, v in self.tuned.get(cell.algorithm, {}).items() if k != "algorithm.name"}
        values: dict[str, Any] = {
            **self.settings,
            **tuned,
            "algorithm.name": cell.algorithm,
            "seed": cell.seed,
            "warmstart.seed": self.warmstart_seed,
            "output_dir": str(self.run_dir(cell)),
            "logging.experiment": self.name,
            "logging.run_name": self.cell_name(cell),
            "logging.mlflow_tracking_uri": self.tracking_uri(),
            "logging.tags": cell.tags(self.noise_field),
            **{f"budget.{name}": value for name, value in self.budget.items()},
        }
        if self.noise_field is not None:
            values[f"reward_noise.{self.noise_field}"] = cell.noise
        if "logging.wandb_group" not in self.settings:  # with logging.wandb: one W&B group per matrix
            values["logging.wandb_group"] = self.name
        try:
            for key, value in values.items():
                set_dotted(data, key, value)
            return build(RunConfig, data, "")
        except ConfigError as err:
            raise MatrixError(f"{self.source}: cell {self.cell_name(cell)}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The matrix as a self-contained YAML mapping (the base config inlined), which is what
        ``output_dir/matrix.yaml`` holds: ``rlbench report`` and re-runs read it back."""
        out: dict[str, Any] = {
            "name": self.name,
            "base": self.base,
            "output_dir": str(self.output_dir),
            "algorithms": self.algorithms,
            "tasks": self.tasks,
            "seeds": self.seeds,
            "warmstart_seed": self.warmstart_seed,
        }
        if self.noise_field is not None:
            out["reward_noise"] = {self.noise_field: self.noise_levels}
        if self.budget:
            out["budget"] = self.budget
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.settings:
            out["set"] = self.settings
        if self.tuned:
            out["tuned"] = self.tuned
        return out

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_matrix(path: str | Path, output_dir: str | Path | None = None) -> Matrix:
    """Reads and validates a matrix file, every cell's config included (nothing runs)."""
    path = Path(path)
    data = read_yaml(path)
    matrix = parse_matrix(data, path, output_dir)
    checked: set[str] = set()
    for cell in matrix.cells():
        config = matrix.cell_config(cell)
        if cell.task not in checked:  # a task reads its data when built: a missing file fails here
            checked.add(cell.task)
            try:
                TASKS.get(config.task.name)(config.task.options)
            except RLBenchError as err:
                raise MatrixError(f"{matrix.source}: cell {matrix.cell_name(cell)}: {err}") from None
    return matrix


def parse_matrix(data: Mapping[str, Any], path: Path, output_dir: str | Path | None = None) -> Matrix:
    where = str(path)
    fail = spec_checker(data, KEYS, path, "matrix", MatrixError)
    base = data.get("base")
    if isinstance(base, Mapping):  # an inlined base (what output_dir/matrix.yaml holds)
        base_data = copy.deepcopy(dict(base))
    elif isinstance(base, str):
        base_data = read_base(base, path, MatrixError)
    else:
        raise fail("base", base, "the path of a run config (relative to the matrix file)")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise fail("name", name, "a non-empty string (the MLflow experiment)")
    out = output_dir if output_dir is not None else data.get("output_dir", f"runs/compare/{name}")
    if not isinstance(out, (str, Path)):
        raise fail("output_dir", out, "a directory path")

    algorithms = data.get("algorithms")
    if not isinstance(algorithms, list) or not algorithms:
        raise fail("algorithms", algorithms, f"a list of algorithm names: {', '.join(ALGORITHMS.names())}")
    for name_ in algorithms:
        try:
            ALGORITHMS.get(name_)
        except (RegistryError, TypeError) as err:
            raise fail("algorithms", name_, str(err)) from None
    _no_repeats(fail, "algorithms", algorithms)

    tasks_data = data.get("tasks")
    if tasks_data is None:  # the base config's own task, labelled by its name
        task = dict(base_data.get("task") or {"name": "arithmetic"})
        tasks_data = {str(task.get("name", "arithmetic")): task}
    if not isinstance(tasks_data, Mapping) or not tasks_data:
        raise fail(
            "tasks", tasks_data, "a mapping of labels to task sections, e.g. {addition: {name: arithmetic}}"
        )
    tasks: dict[str, dict[str, Any]] = {}
    for label, section in tasks_data.items():
        if not isinstance(section, Mapping) or "name" not in section:
            raise fail(
                f"tasks.{label}", section, "a task section with a name, e.g. {name: arithmetic, digits: 2}"
            )
        try:
            TASKS.get(section["name"])
        except (RegistryError, TypeError) as err:
            raise fail(f"tasks.{label}.name", section["name"], str(err)) from None
        if not str(label).replace("_", "").replace("-", "").isalnum():
            raise fail("tasks", label, "labels of letters, digits, '-' and '_' (they name run directories)")
        tasks[str(label)] = dict(section)

    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise fail("seeds", seeds, "a non-empty list of integers")
    _no_repeats(fail, "seeds", seeds)
    warmstart_seed = data.get("warmstart_seed", 0)
    if warmstart_seed is not None and type(warmstart_seed) is not int:
        raise fail("warmstart_seed", warmstart_seed, "an integer, or null for each run's own seed")

    noise_field, levels = None, []
    noise = data.get("reward_noise")
    if noise is not None:
        if not isinstance(noise, Mapping) or len(noise) != 1 or next(iter(noise)) not in NOISE_FIELDS:
            raise fail(
                "reward_noise", noise, f"one field, {' or '.join(NOISE_FIELDS)}, with a list of levels"
            )
        noise_field, levels = next(iter(noise.items()))
        if not isinstance(levels, list) or not levels or not all(_is_number(v) for v in levels):
            raise fail(f"reward_noise.{noise_field}", levels, "a non-empty list of noise levels (numbers)")
        _no_repeats(fail, f"reward_noise.{noise_field}", levels)
        levels = [float(v) for v in levels]

    budget = data.get("budget") or {}
    if not isinstance(budget, Mapping) or not set(budget) <= set(BUDGET_FIELDS):
        raise fail("budget", budget, f"a mapping of {', '.join(BUDGET_FIELDS)} to limits")
    threshold = data.get("threshold")
    if threshold is not None and not (_is_number(threshold) and 0 < threshold <= 1):
        raise fail(
            "threshold",
            threshold,
            "an accuracy in (0, 1], or null (halfway from the warm start's mean accuracy to the "
            "best algorithm's mean final accuracy)",
        )
    settings = data.get("set") or {}
    if not isinstance(settings, Mapping) or not all(isinstance(k, str) for k in settings):
        raise fail(
            "set", settings, "a mapping of dotted config keys to values, e.g. {trainer.max_steps: 150}"
        )
    fixed = {"algorithm.name", "seed", "output_dir", "logging.experiment", "logging.run_name", "logging.tags"}
    for key in settings:
        if key in fixed or key.startswith("task.") or key == "task":
            raise fail(
                f"set.{key}", settings[key], "set by the matrix's own axes (algorithms, tasks, seeds, ...)"
            )
    tuned = _tuned(fail, data.get("tuned") or {}, list(algorithms), path)
    return Matrix(
        name=name,
        output_dir=Path(out),
        base=base_data,
        algorithms=list(algorithms),
        tasks=tasks,
        seeds=list(seeds),
        warmstart_seed=warmstart_seed,
        noise_field=noise_field,
        noise_levels=levels,
        budget=dict(budget),
        threshold=None if threshold is None else float(threshold),
        settings=dict(settings),
        tuned=tuned,
        source=where,
    )


def _tuned(fail: Any, data: Any, algorithms: list[str], path: Path) -> dict[str, dict[str, Any]]:
    """``tuned:``: per algorithm, a sweep's output_dir (its ``best.json``) or the parameters inline."""
    import json

    if not isinstance(data, Mapping):
        raise fail("tuned", data, "a mapping of algorithm names to sweep output directories")
    tuned: dict[str, dict[str, Any]] = {}
    for algorithm, source in data.items():
        if algorithm not in algorithms:
            raise fail(
                f"tuned.{algorithm}", source, f"one of the matrix's algorithms: {', '.join(algorithms)}"
            )
        if isinstance(source, Mapping):  # inlined (what output_dir/matrix.yaml holds)
            tuned[algorithm] = dict(source)
            continue
        best = Path(str(source))
        best = (best if best.is_absolute() else path.parent / best) / "best.json"
        if not best.is_file():
            raise fail(
                f"tuned.{algorithm}",
                source,
                f"a sweep's output_dir holding best.json ({best} does not exist: run the sweep first)",
            )
        params = json.loads(best.read_text())["params"]
        if params.get("algorithm.name", algorithm) != algorithm:
            raise fail(
                f"tuned.{algorithm}",
                source,
                f"a sweep whose best trial ran {algorithm}, not {params['algorithm.name']}",
            )
        tuned[algorithm] = params
    return tuned


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _no_repeats(fail: Any, key: str, values: list[Any]) -> None:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise fail(key, values, f"each value once ({', '.join(repeated)} repeated)")
