"""Optuna sweeps: the search space and its errors, resumable studies, pruning, the best config."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from rlbench.cli import main
from rlbench.config import load_config
from rlbench.search_space import SearchSpaceError, parse_param
from rlbench.sweep import SweepError, load_sweep

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = {
    "trainer.max_steps": 4,
    "trainer.checkpoint_every": 4,
    "eval.every_n_steps": 2,
    "eval.num_prompts": 16,
    "rollout.prompts_per_step": 4,
    "algorithm.grpo.group_size": 4,
    "algorithm.ppo.group_size": 4,
    "warmstart.target_accuracy": 0.1,
    "logging.mlflow": False,
}


def write_sweep(tmp_path: Path, space: dict, **fields: object) -> Path:
    data = {
        "name": "s",
        "base": str(CONFIGS / "grpo_addition.yaml"),
        "output_dir": str(tmp_path / "sweep"),
        "set": {**TINY, "warmstart.cache_dir": str(tmp_path / "cache")},
        "space": space,
        "n_trials": 3,
        **fields,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


LR = {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True}


# ------------------------------------------------------------------ the search space


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"optim.lr": {"type": "gaussian"}}, "space.optim.lr={'type': 'gaussian'} is invalid: a distribution with type float, int, categorical"),  # noqa: E501
        ({"optim.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "space.optim.lr: low=0.1 must be below high=0.01"),  # noqa: E501
        ({"optim.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "a log scale needs low > 0"),
        ({"optim.lrr": LR}, "space.optim.lrr=1e-05: optim.lrr=1e-05 is invalid: unknown field (did you mean 'lr'?)"),  # noqa: E501
        ({"algorithm.grpo.beta": {"type": "float", "low": -1.0, "high": 0.1}}, "space.algorithm.grpo.beta=-1.0: algorithm.grpo.beta=-1.0 is invalid"),  # noqa: E501
        ({"algorithm.name": {"type": "categorical", "choices": ["grpo", "ppq"]}}, "unknown algorithm 'ppq'; the algorithms: "),  # noqa: E501
        ({"algorithm.ppo.kl_ctl": {"type": "float", "low": 0.0, "high": 0.1}}, "applies to ppo, which no trial runs (algorithm: grpo)"),  # noqa: E501
        ({"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "lo": 1}}, "'lo' is not a field of a float distribution"),  # noqa: E501
        ({"algorithm.grpo.group_size": {"type": "int", "low": 2, "high": 8.5}}, "high=8.5 is invalid: an integer"),  # noqa: E501
        ({"optim.lr": {"type": "categorical", "choices": []}}, "choices=[] is invalid: a non-empty list"),
    ],
)  # fmt: skip
def test_a_bad_search_space_names_the_parameter(tmp_path, space, expected):
    with pytest.raises(SearchSpaceError) as err:
        load_sweep(write_sweep(tmp_path, space))
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"sampler": {"name": "annealing"}}, "sampler={'name': 'annealing'} is invalid: a name (tpe, random, grid, cmaes)"),  # noqa: E501
        ({"sampler": "grid"}, "the grid sampler needs discrete values"),
        ({"objective": {"metric": "train/loss"}}, "objective.metric='train/loss' is invalid: a metric reported during training"),  # noqa: E501
        ({"prune_on": ["divergence"]}, "prune_on=['divergence'] is invalid: a list of collapse, nan"),
        ({"n_trials": 0}, "n_trials=0 is invalid: an integer >= 1"),
        ({"trials": 3}, "trials=3 is invalid: not a sweep key"),
        ({"pruner": {"name": "median", "n_startup": 2}}, "sampler/pruner:"),
    ],
)  # fmt: skip
def test_a_bad_sweep_file_names_the_field(tmp_path, fields, expected):
    with pytest.raises(SweepError) as err:
        load_sweep(write_sweep(tmp_path, {"optim.lr": LR}, **fields))
    assert expected in str(err.value)


def test_cli_reports_a_bad_sweep_with_status_2(tmp_path, capsys):
    path = write_sweep(tmp_path, {"optim.lr": {"type": "float", "low": 1.0, "high": 0.5}})
    assert main(["sweep", str(path)]) == 2
    assert "rlbench sweep: error:" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_per_algorithm_parameters_are_sampled_only_for_their_algorithm(tmp_path):
    space = {
        "algorithm.name": {"type": "categorical", "choices": ["grpo", "ppo"]},
        "optim.lr": LR,
        "algorithm.grpo.beta": {"type": "float", "low": 0.0, "high": 0.1},
        "algorithm.ppo.kl_ctl": {"type": "float", "low": 0.0, "high": 0.2},
    }
    sweep = load_sweep(write_sweep(tmp_path, space))
    trial = optuna.trial.FixedTrial({"algorithm.name": "ppo", "optim.lr": 1e-4, "algorithm.ppo.kl_ctl": 0.1})
    values = sweep.space.suggest(trial, sweep.base_algorithm)
    assert values == {"algorithm.name": "ppo", "optim.lr": 1e-4, "algorithm.ppo.kl_ctl": 0.1}
    config = sweep.trial_config(values, tmp_path / "t")
    assert (config.algorithm.name, config.algorithm.options.kl_ctl, config.optim.lr) == ("ppo", 0.1, 1e-4)
    assert config.trainer.max_steps == 4  # the sweep's shared settings


def test_grid_values_of_every_kind():
    assert parse_param("a", {"type": "int", "low": 4, "high": 16, "step": 4}).grid() == [4, 8, 12, 16]
    assert parse_param("b", {"type": "float", "low": 0.0, "high": 0.1, "step": 0.05}).grid() == [
        0.0,
        0.05,
        0.1,
    ]
    assert parse_param("c", {"type": "categorical", "choices": ["x", "y"]}).grid() == ["x", "y"]


# ------------------------------------------------------------------ what optuna-dashboard and MLflow show


def test_the_study_names_its_objective_after_the_metric(tmp_path):
    """optuna-dashboard labels an unnamed objective "Objective 0"; trials.csv calls it "value"."""
    from rlbench.sweep import create_study

    spec = load_sweep(write_sweep(tmp_path, {"optim.lr": LR}, objective={"metric": "eval/maj@k"}))
    spec.output_dir.mkdir(parents=True)
    url = spec.default_storage()
    study = create_study(spec, url, "s")
    assert optuna.load_study(study_name="s", storage=url).metric_names == ["eval/maj@k"]
    study.add_trial(
        optuna.trial.create_trial(
            params={"optim.lr": 1e-4},
            distributions={"optim.lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)},
            value=0.5,
        )
    )
    assert "value_eval/maj@k" in study.trials_dataframe().columns
    # a resumed sweep loads the same study, name and trials kept
    again = create_study(spec, url, "s")
    assert again.metric_names == ["eval/maj@k"] and len(again.trials) == 1


def test_the_study_run_opens_its_mlflow_experiment_on_runs(tmp_path):
    from mlflow import MlflowClient

    from rlbench.sweep import study_run
    from rlbench.tracking import EXPERIMENT_KIND_TAG

    path = write_sweep(tmp_path, {"optim.lr": LR})
    data = yaml.safe_load(path.read_text())
    data["set"]["logging.mlflow"] = True
    path.write_text(yaml.safe_dump(data))
    spec = load_sweep(path)
    run_id = study_run(spec, "s")
    assert run_id is not None and study_run(spec, "s") == run_id  # found again on a resume
    client = MlflowClient(f"sqlite:///{spec.output_dir.resolve() / 'mlflow.db'}")
    assert client.get_experiment_by_name("s").tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


# ------------------------------------------------------------------ running studies


@pytest.mark.slow
def test_a_sweep_resumes_to_more_trials_and_writes_a_config_train_accepts(tmp_path, capsys):
    path = write_sweep(tmp_path, {"optim.lr": LR}, sampler={"name": "random", "seed": 0}, pruner="none")
    assert main(["sweep", str(path)]) == 0
    out = tmp_path / "sweep"
    storage = f"sqlite:///{out / 'study.db'}"
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 3
    assert main(["sweep", str(path), "--n-trials", "5"]) == 0  # 5 finished in all: 2 more, not 5
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    printed = capsys.readouterr().out
    assert "3 of 5 trials finished" in printed and f"best: trial {study.best_trial.number}" in printed
    best = load_config(out / "best.yaml")
    assert best.optim.lr == study.best_trial.params["optim.lr"]
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == [
        "intermediate_values.png",
        "optimization_history.png",
        "parallel_coordinate.png",
        "param_importances.png",
        "slice.png",
    ]
    assert (out / "plots" / "slice.html").stat().st_size > 1000
    run = tmp_path / "from-best"
    assert main(["train", "--config", str(out / "best.yaml"), f"output_dir={run}", "--no-progress"]) == 0
    assert (run / "summary.json").is_file()


@pytest.mark.slow
def test_bad_trials_are_pruned(tmp_path):
    space = {"optim.lr": {"type": "categorical", "choices": [1.0e-5, 0.3]}}
    path = write_sweep(
        tmp_path,
        space,
        n_trials=6,
        sampler={"name": "random", "seed": 6},  # draws good, good, bad, good, bad, bad
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    )
    data = yaml.safe_load(path.read_text())  # a warm start that solves some problems: a signal to lose
    data["set"].update({"warmstart.target_accuracy": 0.25, "eval.num_prompts": 64})
    path.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(path)]) == 0
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")
    states = {t.number: (t.state.name, t.params["optim.lr"]) for t in study.trials}
    pruned = [n for n, (state, _) in states.items() if state == "PRUNED"]
    assert pruned and all(states[n][1] == 0.3 for n in pruned)  # only bad trials are pruned
    assert "pruned at step 2" in study.trials[pruned[0]].user_attrs["pruned_because"]


@pytest.mark.slow
def test_failing_trials_are_recorded_with_their_cause(tmp_path, capsys):
    empty = tmp_path / "no-model"
    empty.mkdir()
    path = write_sweep(tmp_path, {"optim.lr": LR}, n_trials=2, sampler="random", pruner="none")
    data = yaml.safe_load(path.read_text())
    data["set"].update({"model.name_or_path": str(empty), "warmstart.enabled": False})
    path.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(path)]) == 2  # every trial failed: the sweep stops and says why
    err = capsys.readouterr().err
    assert "2 trials failed in a row; the last:" in err and str(empty) in err
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert all(str(empty) in t.user_attrs["fail_cause"] for t in study.trials)
