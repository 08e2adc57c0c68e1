"""The comparison matrix, its cell store and its report's statistics (no training here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats
import yaml

from rlbench.cellstore import DONE, FAILED, MAX_ATTEMPTS, PENDING, RUNNING, CellStore
from rlbench.cli import main
from rlbench.matrix import Cell, MatrixError, load_matrix, parse_matrix
from rlbench.records import DONE as RECORD_DONE
from rlbench.records import FAILED as RECORD_FAILED
from rlbench.records import Experiment, RunRecord
from rlbench.registry import ALGORITHMS
from rlbench.report import Report, Table, cost_to_reach, seed_varies, tables_markdown, to_html, to_markdown
from rlbench.stats import bootstrap_ci, mean_ci, probability_of_improvement_ci, stratified_bootstrap_ci

CONFIGS = Path(__file__).parents[1] / "configs"


def write_matrix(tmp_path: Path, **fields: object) -> Path:
    data = {
        "name": "m",
        "base": str(CONFIGS / "grpo_addition.yaml"),
        "output_dir": str(tmp_path / "out"),
        "algorithms": ["grpo", "ppo"],
        "seeds": [0, 1],
        **fields,
    }
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------ the matrix


def test_cells_cross_every_axis_and_share_one_warm_start(tmp_path):
    path = write_matrix(
        tmp_path,
        tasks={"add2": {"name": "arithmetic", "digits": 2}, "sort": {"name": "sort"}},
        reward_noise={"flip_prob": [0.0, 0.2]},
        budget={"samples": 5000},
        set={"trainer.max_steps": 7},
    )
    matrix = load_matrix(path)
    cells = matrix.cells()
    assert len(cells) == 2 * 2 * 2 * 2  # tasks x noise levels x algorithms x seeds
    assert cells[0] == Cell("add2", "grpo", 0, 0.0)
    config = matrix.cell_config(Cell("sort", "ppo", 1, 0.2))
    assert (config.task.name, config.algorithm.name, config.seed) == ("sort", "ppo", 1)
    assert config.warmstart_seed == 0  # every seed starts from the same weights
    assert config.reward_noise.flip_prob == 0.2
    assert config.budget.samples == 5000
    assert config.trainer.max_steps == 7
    assert config.output_dir == str(tmp_path / "out" / "runs" / "sort-ppo-s1-flip_prob0.2")
    assert config.logging.experiment == "m" and config.logging.wandb_group == "m"
    assert config.logging.tags["rlbench.cell"] == "sort-ppo-s1-flip_prob0.2"
    assert config.logging.tags["rlbench.cell.noise"] == "flip_prob=0.2"


def test_warmstart_seed_null_gives_each_seed_its_own(tmp_path):
    matrix = load_matrix(write_matrix(tmp_path, warmstart_seed=None))
    assert matrix.cell_config(Cell("arithmetic", "grpo", 1)).warmstart_seed == 1


def test_the_written_matrix_reads_back_to_the_same_cells(tmp_path):
    matrix = load_matrix(write_matrix(tmp_path, reward_noise={"gaussian_std": [0.0, 0.5]}))
    again = parse_matrix(yaml.safe_load(matrix.dump()), tmp_path / "copy.yaml")
    assert again.cells() == matrix.cells()
    cell = matrix.cells()[-1]
    assert again.cell_config(cell) == matrix.cell_config(cell)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"algorithms": ["grpo", "ppq"]}, "algorithms='ppq' is invalid: unknown algorithm 'ppq'"),
        ({"tasks": {"t": {"name": "additon"}}}, "tasks.t.name='additon' is invalid: unknown task"),
        ({"reward_noise": {"flip": [0.1]}}, "one field, flip_prob or gaussian_std"),
        (
            {"reward_noise": {"flip_prob": [0.0, 1.5]}},
            "cell arithmetic-grpo-s0-flip_prob1.5: reward_noise.flip_prob=1.5",
        ),
        (
            {"set": {"algorithm.ppo.gamma": 2.0}},
            "cell arithmetic-grpo-s0: algorithm.ppo.gamma=2.0 is invalid: a number in [0, 1]",
        ),
        (
            {"set": {"trainer.max_stepz": 3}},
            "cell arithmetic-grpo-s0: trainer.max_stepz=3 is invalid: unknown field",
        ),
        ({"seeds": [0, 0]}, "each value once (0 repeated)"),
        ({"seedz": [0]}, "seedz=[0] is invalid: not a matrix key; the keys are name, base"),
        ({"tasks": {"w": {"name": "jsonl", "path": "/no/such.jsonl"}}}, "cell w-grpo-s0: task.path"),
        ({"set": {"seed": 3}}, "set.seed=3 is invalid: set by the matrix's own axes"),
        # the null it offers is the report's default (Report.threshold), not another rule
        (
            {"threshold": 1.5},
            "threshold=1.5 is invalid: an accuracy in (0, 1], or null (halfway from the warm "
            "start's mean accuracy to the best algorithm's mean final accuracy)",
        ),
    ],
)
def test_a_bad_matrix_names_the_cell_and_the_field(tmp_path, fields, expected):
    with pytest.raises(MatrixError) as err:
        load_matrix(write_matrix(tmp_path, **fields))
    assert expected in str(err.value)


def test_cli_refuses_a_bad_matrix_before_any_run_starts(tmp_path, capsys):
    path = write_matrix(tmp_path, algorithms=["grpo", "nope"])
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rlbench compare: error:" in err and "unknown algorithm 'nope'" in err and "grpo" in err
    assert not (tmp_path / "out").exists()  # nothing written, nothing run


# ------------------------------------------------------------------ the cell store


def test_each_cell_is_claimed_once_by_racing_workers(tmp_path):
    url = f"sqlite:///{tmp_path / 'cells.db'}"
    names = [f"c{i}" for i in range(6)]
    CellStore(url, "m").create(names)
    first, second = CellStore(url, "m"), CellStore(url, "m")
    claimed = []
    for i in range(6):  # two workers taking turns
        store, worker = (first, f"{os.uname().nodename}:{os.getpid()}") if i % 2 else (second, "far:1")
        claimed.append(store.claim(names, worker))
    assert sorted(claimed) == names
    assert first.claim(names, "far:2") is None
    assert first.counts(names) == {PENDING: 0, RUNNING: 6, DONE: 0, FAILED: 0}


def test_a_cell_whose_worker_died_is_claimed_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'cells.db'}"
    store = CellStore(url, "m")
    store.create(["a", "b"])
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = os.uname().nodename
    assert store.claim(["a", "b"], f"{host}:{int(dead.stdout)}") == "a"  # that process has exited
    assert store.claim(["a", "b"], "elsewhere:7") == "a"  # same machine, process gone: taken over
    assert store.claim(["a", "b"], "elsewhere:8") == "b"
    assert store.claim(["a", "b"], "elsewhere:9") is None  # alive (fresh heartbeats), elsewhere
    store.finish("a", "elsewhere:7", DONE, wall_s=3.0)
    store.release("b", "elsewhere:8")
    rows = {r.cell: r for r in store.rows()}
    assert (rows["a"].state, rows["a"].wall_s, rows["b"].state) == (DONE, 3.0, PENDING)
    assert rows["b"].attempts == 0  # an interruption is not an attempt


def test_a_cell_that_kills_its_worker_every_time_is_failed_not_retried_forever(tmp_path):
    store = CellStore(f"sqlite:///{tmp_path / 'cells.db'}", "m")
    store.create(["a"])
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = f"{os.uname().nodename}:{int(dead.stdout)}"
    for _ in range(MAX_ATTEMPTS):
        assert store.claim(["a"], gone) == "a"
    assert store.claim(["a"], gone) is None
    (row,) = store.rows()
    assert row.state == FAILED and f"died {MAX_ATTEMPTS} times" in row.cause
    assert store.claim(["a"], "w:1", retry_failed=True) == "a"


# ------------------------------------------------------------------ the report's figures


def record(cell: Cell, final: float, start: float = 0.2, **extra: list[tuple[int, float]]) -> RunRecord:
    """A finished run: eval accuracy ``start`` at step 0, 0.5 at step 10, ``final`` at step 20,
    and 100 samples, 1000 tokens and 10 s per step."""
    metrics = {
        "eval/accuracy": [(0, start), (10, 0.5), (20, final)],
        "cost/samples": [(s, 100.0 * (s + 1)) for s in range(20)],
        "cost/tokens_generated": [(s, 1000.0 * (s + 1)) for s in range(20)],
        "cost/wall_s": [(s, 10.0 * (s + 1)) for s in range(20)],
        **extra,
    }
    return RunRecord(cell.id, cell.task, cell.algorithm, cell.seed, cell.noise, RECORD_DONE, metrics=metrics)


def experiment(tmp_path: Path, records: list[RunRecord], **fields: object) -> Experiment:
    data = yaml.safe_load(write_matrix(tmp_path, **fields).read_text())
    return Experiment(parse_matrix(data, tmp_path / "matrix.yaml"), records, "test")


def test_cost_to_reach_reads_the_cost_spent_before_each_eval():
    run = record(Cell("t", "grpo", 0), final=0.8)
    assert cost_to_reach(run, "cost/samples", 0.5) == 1000.0  # eval at step 10: 10 steps of 100
    assert cost_to_reach(run, "cost/wall_s", 0.8) == 200.0
    assert cost_to_reach(run, "cost/samples", 0.1) == 0.0  # the warm start already reaches it
    assert cost_to_reach(run, "cost/samples", 0.9) is None


def test_summary_table_against_hand_computed_figures(tmp_path):
    kl = {"train/kl": [(19, 0.02)], "train/grad_norm_spikes": [(19, 3.0)]}
    records = [
        record(Cell("arithmetic", "grpo", 0), 0.5, **kl),
        record(Cell("arithmetic", "grpo", 1), 0.7, **{"train/collapse_step": [(12, 12.0)]}),
        record(Cell("arithmetic", "ppo", 0), 0.4),
        RunRecord(
            "arithmetic-ppo-s1", "arithmetic", "ppo", 1, None, RECORD_FAILED, cause="NaN loss at step 3"
        ),
    ]
    report = Report(experiment(tmp_path, records, threshold=0.55), plots_dir=None)
    table = report.summary_table("arithmetic", None, 0.55)
    assert table.header[2:4] == ["final accuracy, mean [95% t-interval]", "IQM [95% percentile bootstrap]"]
    grpo, ppo = table.rows
    # mean of 0.5 and 0.7, the IQM of two is the mean; two runs give no interval, one run
    # never a zero-width one
    assert grpo[:4] == ["grpo", "2/2", "0.600 [n/a: 2 runs]", "0.600 [n/a: 2 runs]"]
    # only seed 1 reaches 0.55, at its final eval (step 20): 20 steps of 100 samples
    assert grpo[4:7] == ["2.0k (1/2)", "20.0k (1/2)", "200 (1/2)"]
    assert grpo[7:] == ["1/2 (step 12)", "1.5", "0.0200"]
    assert ppo[:4] == ["ppo", "1/2", "0.400 [n/a: 1 run]", "0.400 [n/a: 1 run]"]
    assert ppo[4] == "never"
    improvement = report.improvement_table("arithmetic", None)
    assert improvement.header[0] == "P(row > column) [95% percentile bootstrap]"
    # P(grpo > ppo): 0.5 > 0.4 and 0.7 > 0.4, 2 of 2 pairs; P(ppo > grpo) = 0; ppo has one run
    assert improvement.rows == [["grpo", "-", "1.00 [n/a: 1 run]"], ["ppo", "0.00 [n/a: 1 run]", "-"]]
    failures = report.failures()
    assert failures.rows == [["arithmetic-ppo-s1", "failed", "NaN loss at step 3"]]


def test_probability_of_improvement_with_ties_and_its_interval(tmp_path):
    records = [record(Cell("arithmetic", "grpo", s), v) for s, v in enumerate([0.5, 0.7, 0.6])]
    records += [record(Cell("arithmetic", "ppo", s), v) for s, v in enumerate([0.4, 0.6, 0.3])]
    exp = experiment(tmp_path, records, seeds=[0, 1, 2])
    table = Report(exp, plots_dir=None).improvement_table("arithmetic", None)
    # grpo 0.5 beats 0.4 and 0.3; 0.7 beats all three; 0.6 beats 0.4 and 0.3 and ties 0.6:
    # 2 + 3 + 2.5 = 7.5 of 9 pairs = 0.83, and P(ppo > grpo) = 1.5 / 9 = 0.17
    low, high = probability_of_improvement_ci([0.5, 0.7, 0.6], [0.4, 0.6, 0.3], 0.95, 10_000, 0)
    assert table.rows[0][2] == f"0.83 [{low:.2f}, {high:.2f}]"
    assert table.rows[1][1].startswith("0.17 [")


def test_a_row_of_too_few_finished_runs_prints_no_interval_and_the_caveat_counts_them(tmp_path):
    seeds = [0, 1, 2, 3, 4]
    finals = [0.52, 0.61, 0.47, 0.70, 0.58]
    records = [record(Cell("arithmetic", "grpo", s), v) for s, v in zip(seeds, finals)]
    records += [record(Cell("arithmetic", "ppo", s), v) for s, v in ((0, 0.42), (1, 0.61))]
    report = Report(experiment(tmp_path, records, seeds=seeds), plots_dir=None)
    grpo, ppo = report.summary_table("arithmetic", None, 0.55).rows
    # 5 runs: the mean's t-interval (what scipy's one-sample t-test gives) and the IQM's bootstrap
    low, high = mean_ci(finals)
    expected = scipy.stats.ttest_1samp(finals, 0.0).confidence_interval(0.95)
    assert (low, high) == pytest.approx((expected.low, expected.high))
    iqm_low, iqm_high = bootstrap_ci(finals, "iqm", 0.95, 10_000, 0)
    assert grpo[:4] == [
        "grpo",
        "5/5",
        f"0.576 [{low:.3f}, {high:.3f}]",
        f"0.570 [{iqm_low:.3f}, {iqm_high:.3f}]",
    ]
    assert ppo[:4] == ["ppo", "2/5", "0.515 [n/a: 2 runs]", "0.515 [n/a: 2 runs]"]
    text = to_markdown(report.blocks())
    # 5 seeds planned, but the caveat is about the 2 runs ppo finished
    assert "Few seeds: the fewest finished runs behind a row is 2 (of 5 planned seeds)." in text
    assert "[0.380, 0.380]" not in text and "n/a: 2 runs" in text


def test_no_caveat_when_every_row_has_five_finished_runs(tmp_path):
    seeds = [0, 1, 2, 3, 4]
    records = [record(Cell("arithmetic", a, s), 0.5 + 0.01 * s) for a in ("grpo", "ppo") for s in seeds]
    assert "Few seeds" not in tables_markdown(experiment(tmp_path, records, seeds=seeds))


def test_paired_table_differences_seed_by_seed(tmp_path):
    records = [record(Cell("arithmetic", "grpo", s), v) for s, v in enumerate([0.6, 0.7, 0.5, 0.8])]
    # ppo's seed 4 has no grpo run to pair with: left out
    records += [record(Cell("arithmetic", "ppo", s), v) for s, v in enumerate([0.5, 0.5, 0.4, 0.6, 0.9])]
    records += [record(Cell("arithmetic", "rloo", s), v) for s, v in enumerate([0.6, 0.7])]
    exp = experiment(tmp_path, records, algorithms=["grpo", "ppo", "rloo"], seeds=[0, 1, 2, 3, 4])
    table = Report(exp, plots_dir=None).paired_table("arithmetic", None)
    assert table.header == [
        "A - B", "seeds", "mean difference [95% t-interval]", "sd of differences", "seeds to resolve"
    ]  # fmt: skip
    by_pair = {row[0]: row[1:] for row in table.rows}
    # grpo - ppo on seeds 0-3: differences [0.1, 0.2, 0.1, 0.2], mean 0.15, sd sqrt(0.01 / 3) =
    # 0.0577, t_{0.975, 3} = 3.1824 x 0.0577 / 2 = 0.0919; 3 seeds resolve it:
    # t_{0.975, 2} = 4.3027 x 0.0577 / sqrt(3) = 0.143 < 0.15
    assert by_pair["grpo - ppo"] == ["4", "+0.150 [0.058, 0.242]", "0.058", "3"]
    # grpo - rloo on seeds 0, 1: differences [0, 0]: no interval from 2 seeds, and no seed
    # count resolves a zero difference
    assert by_pair["grpo - rloo"] == ["2", "+0.000 [n/a: 2 seeds]", "0.000", "never"]
    # ppo - rloo: [-0.1, -0.2], mean -0.15, sd 0.0707; t_{0.975, n-1} x 0.0707 / sqrt(n) < 0.15
    # first at n = 4 (3.1824 x 0.0354 = 0.1125; at n = 3, 4.3027 x 0.0408 = 0.176)
    assert by_pair["ppo - rloo"] == ["2", "-0.150 [n/a: 2 seeds]", "0.071", "4"]
    text = tables_markdown(exp)
    assert "Final accuracy of A minus B, paired by seed" in text


def test_aggregate_over_tasks_uses_a_stratified_bootstrap(tmp_path):
    tasks = {"add": {"name": "arithmetic", "digits": 2}, "sort": {"name": "sort"}}
    scores = {"add": [0.6, 0.7, 0.5], "sort": [0.2, 0.3, 0.1]}
    records = [record(Cell(t, "grpo", s), v) for t, vs in scores.items() for s, v in enumerate(vs)]
    records += [record(Cell("add", "ppo", s), 0.4) for s in range(2)]
    exp = experiment(tmp_path, records, tasks=tasks, seeds=[0, 1, 2])
    report = Report(exp, plots_dir=None)
    table = report.aggregate_table(None)
    assert table.header == [
        "algorithm",
        "runs",
        "IQM [95% stratified bootstrap]",
        "mean [95% stratified bootstrap]",
    ]
    grpo, ppo = table.rows
    by_task = list(scores.values())
    # IQM of the 6 pooled scores, int(1.5) = 1 cut from each end: [0.2, 0.3, 0.5, 0.6] -> 0.4;
    # mean of the task means (0.6 + 0.2) / 2 = 0.4
    iqm_low, iqm_high = stratified_bootstrap_ci(by_task, "iqm", 0.95, 10_000, 0)
    mean_low, mean_high = stratified_bootstrap_ci(by_task, "mean", 0.95, 10_000, 0)
    assert grpo == [
        "grpo",
        "6/6",
        f"0.400 [{iqm_low:.3f}, {iqm_high:.3f}]",
        f"0.400 [{mean_low:.3f}, {mean_high:.3f}]",
    ]
    # each task's mean moves within its own seeds' range, so the mean of means stays in
    # [(0.5 + 0.1) / 2, (0.7 + 0.3) / 2] = [0.3, 0.5]
    assert 0.3 <= mean_low < 0.4 < mean_high <= 0.5
    assert ppo == ["ppo", "2/6", "- (no finished run on sort)", "-"]
    text = tables_markdown(exp)
    assert (
        "## All tasks" in text and "stratified bootstrap (each resample draws seeds within each task)" in text
    )
    one_task = tables_markdown(experiment(tmp_path, [r for r in records if r.task == "add"], seeds=[0, 1, 2]))
    assert "## All tasks" not in one_task


def test_aggregate_needs_three_runs_in_every_task_for_an_interval(tmp_path):
    tasks = {"add": {"name": "arithmetic", "digits": 2}, "sort": {"name": "sort"}}
    records = [record(Cell("add", "grpo", s), 0.5 + 0.1 * s) for s in range(3)]
    records += [record(Cell("sort", "grpo", s), 0.2 + 0.1 * s) for s in range(2)]
    exp = experiment(tmp_path, records, tasks=tasks, seeds=[0, 1, 2], algorithms=["grpo"])
    (grpo,) = Report(exp, plots_dir=None).aggregate_table(None).rows
    # pooled [0.2, 0.3, 0.5, 0.6, 0.7], cut int(1.25) = 1 from each end: (0.3 + 0.5 + 0.6) / 3
    # mean of means: (0.6 + 0.25) / 2 = 0.425
    assert grpo == ["grpo", "5/6", "0.467 [n/a: 2 runs on sort]", "0.425 [n/a: 2 runs on sort]"]


def test_report_says_what_a_seed_varies_from_the_runs_own_options(tmp_path, monkeypatch):
    from rlbench.registry import ALGORITHMS

    def varies(self):
        return f"prompts and samples (beta={self.config.beta:g})"

    monkeypatch.setattr(ALGORITHMS.get("grpo"), "seed_varies", property(varies))
    grpo = record(Cell("arithmetic", "grpo", 0), 0.6)
    grpo.algorithm_params = {"algorithm.grpo.beta": "0.02", "algorithm.grpo.group_size": "4"}
    # options that do not rebuild (here an unknown field) leave the line out, never crash
    ppo = record(Cell("arithmetic", "ppo", 0), 0.5)
    ppo.algorithm_params = {"algorithm.ppo.no_such_option": "1"}
    report = Report(experiment(tmp_path, [grpo, ppo]), plots_dir=None)
    assert report.seed_table().rows == [["grpo", "prompts and samples (beta=0.02)"]]
    assert "What a seed varies, per algorithm" in tables_markdown(report.experiment)
    assert seed_varies("no-such-algorithm", {}) is None
    assert (
        Report(experiment(tmp_path, [record(Cell("arithmetic", "grpo", 0), 0.6)]), None).seed_table() is None
    )


def test_run_directories_give_the_algorithm_options_mlflow_logs(tmp_path):
    from rlbench.config import dump_yaml
    from rlbench.records import from_directory

    # a non-default option, to see it travel: DPO's pairs shared by every seed
    fields = {"algorithms": ["grpo", "dpo"], "seeds": [0], "set": {"algorithm.dpo.pairs_seed": 3}}
    matrix = load_matrix(write_matrix(tmp_path, **fields))
    matrix.output_dir.mkdir(parents=True)
    (matrix.output_dir / "matrix.yaml").write_text(matrix.dump())
    for cell in matrix.cells():
        config = matrix.cell_config(cell)
        run_dir = matrix.run_dir(cell)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(dump_yaml(config))
        (run_dir / "summary.json").write_text("{}")
        prefix = f"algorithm.{cell.algorithm}."
        # Lightning's MLFlowLogger logs str(value)[:250] of each of config.flat()'s entries
        logged = {k: str(v)[:250] for k, v in config.flat().items() if k.startswith(prefix)}
        (run,) = [r for r in from_directory(matrix.output_dir).records if r.cell == matrix.cell_name(cell)]
        assert run.algorithm_params == logged and logged
        assert cell.algorithm != "dpo" or logged["algorithm.dpo.pairs_seed"] == "3"
        assert (
            seed_varies(cell.algorithm, logged)
            == ALGORITHMS.get(cell.algorithm)(config.algorithm.options).seed_varies
        )


def test_default_threshold_is_halfway_from_the_warm_start_to_the_best_mean(tmp_path):
    records = [record(Cell("arithmetic", "grpo", s), v, start=0.2) for s, v in enumerate([0.6, 0.8])]
    records.append(record(Cell("arithmetic", "ppo", 0), 0.3, start=0.2))
    threshold, how = Report(experiment(tmp_path, records), plots_dir=None).threshold("arithmetic")
    assert threshold == 0.45  # 0.2 + (0.7 - 0.2) / 2
    assert "halfway" in how


def test_report_states_seeds_budget_ci_method_warm_start_and_commit(tmp_path):
    run = record(Cell("arithmetic", "grpo", 0), 0.6)
    run.info = {"commit": "abc123", "warmstart_seed": "0", "stopped_by": "budget.samples=1000"}
    text = tables_markdown(experiment(tmp_path, [run], budget={"samples": 1000}))
    assert "Seeds: 0, 1." in text
    assert "Budget: budget.samples=1000 (1 runs ended by it)." in text
    assert "means: 95% t-interval over seeds" in text
    assert "IQM and P(X > Y): 95% percentile bootstrap over seeds (10,000 resamples" in text
    assert "over tasks: 95% stratified bootstrap" in text
    # the caveat counts finished runs, not the 2 planned seeds: ppo finished none
    assert "the fewest finished runs behind a row is 0 (of 2 planned seeds)" in text
    assert "one warm start (warmstart.seed=0) shared by every run" in text
    assert "Code commit: abc123." in text


def test_markdown_and_html_hold_the_same_table():
    table = Table(["algorithm", "P <x>"], [["grpo", "0.50 [0.1, 0.9]"]])
    assert to_markdown([table]) == "| algorithm | P <x> |\n| --- | --- |\n| grpo | 0.50 [0.1, 0.9] |\n"
    page = to_html([table], "t")
    assert "<th>P &lt;x&gt;</th>" in page and "<td>0.50 [0.1, 0.9]</td>" in page


def test_noise_matrix_report_draws_the_robustness_chart(tmp_path):
    records = []
    for level, accuracies in ((0.0, (0.7, 0.8)), (0.2, (0.5, 0.6))):
        for seed, final in enumerate(accuracies):
            run = record(Cell("arithmetic", "grpo", seed, level), final)
            run.cell = f"{run.cell}-flip_prob{level:g}"
            records.append(run)
    exp = experiment(tmp_path, records, algorithms=["grpo"], reward_noise={"flip_prob": [0.0, 0.2]})
    report = Report(exp, plots_dir=tmp_path / "plots")
    images = [b.path for b in report.blocks() if hasattr(b, "caption")]
    assert "plots/arithmetic-robustness.png" in images
    assert "plots/arithmetic-flip_prob0.2-curves-step.png" in images
    assert (tmp_path / "plots" / "arithmetic-robustness.png").stat().st_size > 10_000
    text = to_markdown(report.blocks())
    assert "### reward_noise.flip_prob = 0.2" in text and "| grpo | 2/2 | 0.550 [n/a: 2 runs] |" in text


def test_progress_line_counts_cells_and_estimates_the_time_left(monkeypatch):
    from rlbench.progress import ENV, MatrixStatus, clock

    status = MatrixStatus("c", done=2, failed=1, running=1, left=4, started=1000.0, cell_s=60.0, workers=2)
    monkeypatch.setattr("time.time", lambda: 1000.0 + 125)
    # before the running cell moves: 4 cells left at 60 s on 2 workers, plus this whole cell
    assert status.line() == "matrix: 2 done, 1 failed, 1 running, 4 left | 2m05s elapsed, ~3m00s left"
    # a quarter done after 20 s: 60 s more for it
    assert status.line(0.25, 20.0).endswith("~3m00s left")
    assert status.line(0.5, 20.0).endswith("~2m20s left")
    monkeypatch.setenv(ENV, status.to_env())
    assert MatrixStatus.from_env() == status
    assert (clock(59), clock(75), clock(3700)) == ("59s", "1m15s", "1h01m")


def test_tuned_rows_take_a_sweeps_best_parameters(tmp_path):
    import json

    sweep_dir = tmp_path / "sweeps" / "grpo"
    sweep_dir.mkdir(parents=True)
    params = {"optim.lr": 5.0e-4, "algorithm.grpo.beta": 0.02}
    (sweep_dir / "best.json").write_text(json.dumps({"trial": 3, "value": 0.5, "params": params}))
    matrix = load_matrix(write_matrix(tmp_path, tuned={"grpo": "sweeps/grpo"}))
    grpo, ppo = (
        matrix.cell_config(Cell("arithmetic", "grpo", 0)),
        matrix.cell_config(Cell("arithmetic", "ppo", 0)),
    )
    assert (grpo.optim.lr, grpo.algorithm.options.beta) == (5.0e-4, 0.02)
    assert ppo.optim.lr == 1.0e-4  # the base config's: only grpo was tuned
    again = parse_matrix(yaml.safe_load(matrix.dump()), tmp_path / "copy.yaml")  # inlined in matrix.yaml
    assert again.cell_config(Cell("arithmetic", "grpo", 0)) == grpo
    assert (
        "Tuned: grpo runs with its sweep's best parameters (optim.lr=0.0005, algorithm.grpo.beta=0.02)."
        in (tables_markdown(Experiment(matrix, [], "test")))
    )
    with pytest.raises(MatrixError, match="run the sweep first"):
        load_matrix(write_matrix(tmp_path, tuned={"ppo": "sweeps/ppo"}))
    with pytest.raises(MatrixError, match="one of the matrix's algorithms: grpo, ppo"):
        load_matrix(write_matrix(tmp_path, tuned={"dpo": "sweeps/grpo"}))


# ------------------------------------------------------------------ the MLflow experiment


def test_the_mlflow_ui_opens_a_matrix_experiment_on_its_runs(tmp_path):
    """MLflow 3 opens an experiment without a kind on its GenAI overview, empty for training
    runs: each cell's run marks the matrix's experiment as model training, unless a kind was
    chosen already (in the UI)."""
    import mlflow

    from rlbench.compare import prepare
    from rlbench.tracking import EXPERIMENT_KIND_TAG, build_loggers, start_loggers

    matrix = load_matrix(write_matrix(tmp_path))
    prepare(matrix)  # creates the experiment before any worker starts
    client = mlflow.MlflowClient(matrix.tracking_uri())

    def start_cell(cell: Cell) -> dict[str, str]:
        config = matrix.cell_config(cell)
        Path(config.output_dir).mkdir(parents=True)
        start_loggers(build_loggers(config, resume=False), config, resume=False)
        return client.get_experiment_by_name("m").tags

    first, second = matrix.cells()[:2]
    assert start_cell(first)[EXPERIMENT_KIND_TAG] == "custom_model_development"
    experiment_id = client.get_experiment_by_name("m").experiment_id
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "finetuning")
    assert start_cell(second)[EXPERIMENT_KIND_TAG] == "finetuning"
    assert len(client.search_runs([experiment_id])) == 2
