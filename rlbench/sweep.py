"""``rlbench sweep``: an Optuna study over a run config's settings, resumable, on many workers.

A sweep file (YAML) names a base run config, the settings every trial shares and the search
space (``rlbench.search_space``)::

    name: grpo-addition                 # the Optuna study and the MLflow experiment
    base: ../configs/grpo_addition.yaml
    output_dir: runs/sweeps/grpo-addition
    set: {trainer.max_steps: 60}
    space:
      optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    objective: {metric: eval/accuracy, direction: maximize}   # the final eval's value
    n_trials: 8                         # finished (complete or pruned) trials the study should hold
    sampler: {name: tpe, seed: 0}       # tpe, random, grid, cmaes
    pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 20}   # median, hyperband, none
    prune_on: [collapse, nan]           # also prune a trial whose entropy collapses or loss goes NaN

Every trial is one in-process ``train`` (the pruner needs the trial object) writing into
``output_dir/trials/<number>``, an MLflow run nested under the study's run. The study lives
in an Optuna RDB storage (SQLite ``study.db`` in ``output_dir`` by default, PostgreSQL for
many machines) with heartbeats, so a killed worker's trial is failed and retried, never lost.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlbench.config import RunConfig, build, dump_yaml
from rlbench.config_files import read_base, read_yaml, set_dotted, spec_checker
from rlbench.errors import ConfigError, RLBenchError
from rlbench.search_space import SearchSpace, SearchSpaceError, grid_size, parse_space
from rlbench.workers import run_workers, this_worker

KEYS = (
    "name",
    "base",
    "output_dir",
    "set",
    "space",
    "objective",
    "n_trials",
    "sampler",
    "pruner",
    "prune_on",
)
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "hyperband", "none")
PRUNE_ON = ("collapse", "nan")
#: The metrics a trial reports while it trains (at every evaluation), so a pruner can use them.
OBJECTIVES = ("eval/accuracy", "eval/pass@k", "eval/maj@k", "eval/pass@1")
HEARTBEAT_S, GRACE_S = 5, 20
BEST_FILE, TRIALS_DIR, PLOTS_DIR = "best.yaml", "trials", "plots"


class SweepError(RLBenchError):
    """A sweep file that cannot run: names the file and the field."""


@dataclass
class Sweep:
    name: str
    output_dir: Path
    base: dict[str, Any]
    space: SearchSpace
    settings: dict[str, Any] = field(default_factory=dict)
    metric: str = "eval/accuracy"
    direction: str = "maximize"
    n_trials: int = 10
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    prune_on: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def base_algorithm(self) -> str:
        return str(
            self.settings.get("algorithm.name") or (self.base.get("algorithm") or {}).get("name", "grpo")
        )

    def default_storage(self) -> str:
        return f"sqlite:///{self.output_dir.resolve() / 'study.db'}"

    def trial_config(
        self, values: Mapping[str, Any], output_dir: str | Path, tags: Mapping[str, str] | None = None
    ) -> RunConfig:
        """The run config of a trial with ``values`` (dotted keys) writing into ``output_dir``."""
        data = copy.deepcopy(self.base)
        for key, value in {**self.settings, **values}.items():
            set_dotted(data, key, value)
        set_dotted(data, "output_dir", str(output_dir))
        if not (data.get("logging") or {}).get(
            "mlflow_tracking_uri"
        ):  # the study's run and its trials: one store
            set_dotted(
                data, "logging.mlflow_tracking_uri", f"sqlite:///{self.output_dir.resolve() / 'mlflow.db'}"
            )
        set_dotted(data, "logging.experiment", self.name)
        set_dotted(data, "logging.run_name", Path(output_dir).name)
        if not (data.get("logging") or {}).get("wandb_group"):  # with logging.wandb: one group per study
            set_dotted(data, "logging.wandb_group", self.name)
        if tags:
            set_dotted(data, "logging.tags", dict(tags))
        try:
            return build(RunConfig, data, "")
        except ConfigError as err:
            raise SweepError(f"{self.source}: {err}") from None

    def make_sampler(self) -> Any:
        import optuna

        options = {k: v for k, v in self.sampler.items() if k != "name"}
        name = self.sampler["name"]
        if name == "tpe":
            return optuna.samplers.TPESampler(**options)
        if name == "random":
            return optuna.samplers.RandomSampler(**options)
        if name == "grid":
            return optuna.samplers.GridSampler(self.space.grid(), **options)
        return optuna.samplers.CmaEsSampler(**options)  # needs `pip install cmaes`

    def make_pruner(self) -> Any:
        import optuna

        options = {k: v for k, v in self.pruner.items() if k != "name"}
        name = self.pruner["name"]
        if name == "median":
            return optuna.pruners.MedianPruner(**options)
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(**options)
        return optuna.pruners.NopPruner()


def load_sweep(path: str | Path, output_dir: str | Path | None = None) -> Sweep:
    """Reads and checks a sweep file (its search space against its base config; nothing runs)."""
    path = Path(path)
    data = read_yaml(path)
    where = str(path)
    fail = spec_checker(data, KEYS, path, "sweep", SweepError)
    base = data.get("base")
    if not isinstance(base, str):
        raise fail("base", base, "the path of a run config (relative to the sweep file)")
    base_data = read_base(base, path, SweepError)
    settings = data.get("set") or {}
    if not isinstance(settings, Mapping):
        raise fail("set", settings, "a mapping of dotted config keys to values")
    merged = copy.deepcopy(base_data)
    try:
        for key, value in settings.items():
            set_dotted(merged, str(key), value)
        build(RunConfig, merged, "")
    except ConfigError as err:
        raise SweepError(f"{where}: set: {err}") from None
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise fail("name", name, "a non-empty string (the Optuna study and MLflow experiment)")
    objective = data.get("objective") or {}
    metric = objective.get("metric", "eval/accuracy") if isinstance(objective, Mapping) else None
    direction = objective.get("direction", "maximize") if isinstance(objective, Mapping) else None
    if metric not in OBJECTIVES:
        raise fail("objective.metric", metric, f"a metric reported during training: {', '.join(OBJECTIVES)}")
    if direction not in ("maximize", "minimize"):
        raise fail("objective.direction", direction, "maximize or minimize")
    n_trials = data.get("n_trials", 10)
    if type(n_trials) is not int or n_trials < 1:
        raise fail("n_trials", n_trials, "an integer >= 1")
    sampler = _named(fail, "sampler", data.get("sampler") or {"name": "tpe"}, SAMPLERS)
    pruner = _named(fail, "pruner", data.get("pruner") or {"name": "median"}, PRUNERS)
    prune_on = data.get("prune_on") or []
    if not isinstance(prune_on, list) or not set(prune_on) <= set(PRUNE_ON):
        raise fail("prune_on", prune_on, f"a list of {', '.join(PRUNE_ON)}")
    space = parse_space(data.get("space"), merged, where)
    sweep = Sweep(
        name=name,
        output_dir=Path(output_dir or data.get("output_dir") or f"runs/sweeps/{name}"),
        base=base_data,
        space=space,
        settings=dict(settings),
        metric=metric,
        direction=direction,
        n_trials=n_trials,
        sampler=sampler,
        pruner=pruner,
        prune_on=list(prune_on),
        source=where,
    )
    try:
        sweep.make_sampler()  # a bad option, or grid over a continuous range, fails here
        sweep.make_pruner()
    except (TypeError, ValueError, ImportError, SearchSpaceError) as err:
        raise SweepError(f"{where}: sampler/pruner: {err}") from None
    return sweep


def _named(fail: Any, key: str, value: Any, names: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or value.get("name") not in names:
        raise fail(
            key, value, f"a name ({', '.join(names)}) with the {key}'s options, e.g. {{name: {names[0]}}}"
        )
    return dict(value)


# ------------------------------------------------------------------ running


def storage(url: str) -> Any:
    """Optuna RDB storage with heartbeats: a trial whose worker died (SIGKILL, lost machine) is
    marked failed when another worker next asks for a trial, and retried once."""
    import warnings

    import optuna

    # heartbeats have been "experimental" since Optuna 2.9: not worth a warning per trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine,
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
    )


def finished(study: Any) -> int:
    """Trials that count towards ``n_trials``: complete or pruned."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def running(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def sweep(
    path: str | Path,
    n_trials: int | None = None,
    storage_url: str | None = None,
    study_name: str | None = None,
    workers: int = 1,
    output_dir: str | Path | None = None,
) -> int:
    """Runs the study until it holds ``n_trials`` finished trials, then writes its results."""
    try:
        import optuna
    except ImportError:
        raise RLBenchError('rlbench sweep needs Optuna: pip install "rlbench[sweep]"') from None

    spec = load_sweep(path, output_dir)
    if workers < 1:
        raise RLBenchError(f"--workers={workers} is invalid: at least 1")
    target = n_trials or spec.n_trials
    if spec.sampler["name"] == "grid":
        target = min(target, grid_size(spec.space.grid()))
    url = storage_url or spec.default_storage()
    name = study_name or spec.name
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # created once, before any worker: two processes creating the schema at once race
    study = create_study(spec, url, name)
    parent = study_run(spec, name)
    if parent is not None:
        study.set_user_attr("mlflow_run_id", parent)
    print(f"study {name!r} ({url}): {finished(study)} of {target} trials finished")
    if workers == 1:
        work(spec, url, name, target)
    else:
        command = [sys.executable, "-m", "rlbench.cli", "sweep", str(path), "--worker", "--storage", url]
        command += ["--study-name", name, "--n-trials", str(target), "--output-dir", str(spec.output_dir)]
        run_workers(command, workers)
    study = optuna.load_study(study_name=name, storage=storage(url))
    return write_results(spec, study)


def create_study(spec: Sweep, url: str, name: str) -> Any:
    """The sweep's Optuna study in ``url`` (loaded if it exists), its objective named after
    ``spec.metric``: optuna-dashboard and ``trials.csv`` then say ``eval/accuracy``, not
    "Objective 0" and "value"."""
    import warnings

    import optuna

    study = optuna.create_study(
        storage=storage(url),
        study_name=name,
        direction=spec.direction,
        sampler=spec.make_sampler(),
        pruner=spec.make_pruner(),
        load_if_exists=True,
    )
    with warnings.catch_warnings():
        # "experimental" since Optuna 3.2, and what optuna-dashboard reads the name from
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([spec.metric])
    return study


def work(spec: Sweep, url: str, name: str, target: int) -> int:
    """One worker: runs trials until the study holds ``target`` finished ones (counting those
    other workers are running, so K workers overshoot by at most K - 1)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=name, storage=storage(url), sampler=spec.make_sampler(), pruner=spec.make_pruner()
    )
    failures = 0
    while True:
        # a dead worker's trial (no heartbeat for GRACE_S) is failed, and retried, only when a
        # worker asks for a trial; ask here too, or it would count as running forever
        optuna.storages.fail_stale_trials(study)
        if finished(study) + running(study) >= target:
            break
        ended: list[Any] = []  # this worker's trial, as Optuna hands it to callbacks when it ends
        study.optimize(
            lambda trial: objective(spec, study, trial),
            n_trials=1,
            catch=(Exception,),  # a failing trial is recorded as FAIL (with its cause) and the study goes on
            callbacks=[lambda _, trial, ended=ended: ended.append(trial)],
        )
        for trial in ended:
            cause = trial.user_attrs.get("fail_cause") or trial.user_attrs.get("pruned_because")
            value = "" if trial.value is None else f" {spec.metric}={trial.value:.4f}"
            print(
                f"trial {trial.number}: {trial.state.name}{value}{f' ({cause})' if cause else ''}", flush=True
            )
            failures = failures + 1 if trial.state.name == "FAIL" else 0
            if failures >= target:  # every trial fails: something outside the search space is wrong
                raise RLBenchError(f"{failures} trials failed in a row; the last: {cause}")
    return 0


def objective(spec: Sweep, study: Any, trial: Any) -> float:
    """Trains one trial and returns the final evaluation's ``spec.metric``."""
    import optuna

    from rlbench.guard import NonFiniteError
    from rlbench.pruning import TrialPruning
    from rlbench.run import train

    values = spec.space.suggest(trial, spec.base_algorithm)
    out = spec.output_dir / TRIALS_DIR / f"{trial.number:04d}"
    tags = {"rlbench.study": study.study_name, "rlbench.trial": str(trial.number)}
    parent = study.user_attrs.get("mlflow_run_id")
    if parent:
        tags["mlflow.parentRunId"] = parent  # nests the trial under the study's run in the MLflow UI
    config = spec.trial_config(values, out, tags)
    trial.set_user_attr("output_dir", str(out))
    trial.set_user_attr("worker", this_worker())
    pruning = TrialPruning(trial, spec.metric, spec.prune_on)
    log = spec.output_dir / "logs" / f"{trial.number:04d}.log"  # the run's own lines, off the sweep's console
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("a") as sink, contextlib.redirect_stdout(sink):
            train(config, progress_bar=False, callbacks=[pruning])
    except NonFiniteError as err:
        if "nan" in spec.prune_on:
            trial.set_user_attr("pruned_because", f"non-finite loss: {err}")
            raise optuna.TrialPruned(str(err)) from None
        trial.set_user_attr("fail_cause", f"{type(err).__name__}: {err}")
        raise
    except Exception as err:
        trial.set_user_attr("fail_cause", f"{type(err).__name__}: {err}")
        raise
    if pruning.pruned_because is not None:
        trial.set_user_attr("pruned_because", pruning.pruned_because)
        raise optuna.TrialPruned(pruning.pruned_because)
    if pruning.last_value is None or not math.isfinite(pruning.last_value):
        raise RLBenchError(f"trial {trial.number}: no final {spec.metric} was logged")
    return pruning.last_value


def study_run(spec: Sweep, name: str) -> str | None:
    """The MLflow run the trials nest under (found again on a resumed sweep), or None without MLflow."""
    config = spec.trial_config({}, spec.output_dir / "study")
    if not config.logging.mlflow:
        return None
    import logging

    from mlflow import MlflowClient

    from rlbench.tracking import ensure_experiment, mlflow_tracking_uri

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(mlflow_tracking_uri(config))
    experiment_id = ensure_experiment(client, spec.name)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`rlbench.study` = '{name}' and tags.`rlbench.kind` = 'study'"
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=f"study {name}", tags={"rlbench.study": name, "rlbench.kind": "study"}
    )
    return run.info.run_id


def write_results(spec: Sweep, study: Any) -> int:
    """Prints the best trial, writes it as a ready-to-run config, a trials table and the plots."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    print("trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    if not done:
        print("no trial completed: no best configuration", file=sys.stderr)
        return 1
    best = study.best_trial
    print(f"best: trial {best.number}, {spec.metric} = {best.value:.4f}")
    for key, value in best.params.items():
        print(f"  {key}: {value}")
    config = spec.trial_config(best.params, f"runs/{spec.name}-best")
    text = f"# best trial {best.number} of study {study.study_name!r}: {spec.metric} = {best.value:.4f}\n"
    text += f"# rlbench train --config {spec.output_dir / BEST_FILE}\n" + dump_yaml(config)
    (spec.output_dir / BEST_FILE).write_text(text)
    (spec.output_dir / "best.json").write_text(
        json.dumps({"trial": best.number, "value": best.value, "params": best.params}, indent=1)
    )
    study.trials_dataframe().to_csv(spec.output_dir / "trials.csv", index=False)
    record_best(spec, study, best)
    written = write_plots(study, spec.output_dir / PLOTS_DIR)
    print(f"best config: {spec.output_dir / BEST_FILE}; plots: {', '.join(written) or 'none'}")
    return 0


def record_best(spec: Sweep, study: Any, best: Any) -> None:
    """The study's MLflow run gets the best value (a metric, one point per invocation) and the
    best parameters (tags: they may change when the study resumes), and is marked finished."""
    parent = study.user_attrs.get("mlflow_run_id")
    if not parent:
        return
    from mlflow import MlflowClient

    from rlbench.tracking import mlflow_metric_key

    client = MlflowClient(spec.trial_config({}, spec.output_dir / "study").logging.mlflow_tracking_uri)
    client.log_metric(parent, f"best/{mlflow_metric_key(spec.metric)}", best.value, step=len(study.trials))
    client.set_tag(parent, "rlbench.best_trial", str(best.number))
    for key, value in best.params.items():
        client.set_tag(parent, f"best.{key}", str(value))
    client.set_terminated(parent, "FINISHED")


#: Optuna's plots: (name, function name in optuna.visualization and its .matplotlib).
PLOTS = (
    ("optimization_history", "plot_optimization_history"),
    ("param_importances", "plot_param_importances"),
    ("parallel_coordinate", "plot_parallel_coordinate"),
    ("slice", "plot_slice"),
    ("intermediate_values", "plot_intermediate_values"),
)


def write_plots(study: Any, out: Path) -> list[str]:
    """Each plot as interactive HTML (plotly) and PNG (matplotlib: no browser needed); a plot
    the study cannot draw yet (importances need 2 complete trials) is skipped."""
    import warnings

    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static

    out.mkdir(parents=True, exist_ok=True)
    written = []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the axis says what the objective is (eval/accuracy), not Optuna's "Objective Value"
    named = {"target_name": study.metric_names[0]} if study.metric_names else {}
    for name, function in PLOTS:
        options = named if function != "plot_intermediate_values" else {}  # it plots reports, not values
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" warnings of the matplotlib backend
            try:
                getattr(interactive, function)(study, **options).write_html(
                    out / f"{name}.html", include_plotlyjs="directory"
                )
                axes = getattr(static, function)(study, **options)
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
                figure.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
                plt.close(figure)
                written.append(name)
            except (ValueError, RuntimeError, ImportError, ZeroDivisionError):
                plt.close("all")
    return written
