"""A matrix's report: ``report.md``, ``report.html`` and ``plots/*.png``, from run records alone.

Per task (and noise level) a summary table: final eval accuracy, its mean with a 95%
t-interval over seeds and its IQM with a 95% percentile bootstrap interval; the cost (samples,
tokens, seconds) to first reach an accuracy threshold; entropy collapses, grad-norm spikes and
the final KL. Then the probability that each algorithm beats each other (percentile bootstrap
interval), the mean difference of each pair paired by seed (t-interval, and the seeds it would
take to resolve), and the plots. With 2+ tasks, the IQM and mean over tasks x seeds with a
stratified bootstrap. Every interval names its method, none is given from fewer than
``MIN_RUNS_FOR_INTERVAL`` finished runs, and every figure comes from ``rlbench.stats``; the
seeds, what a seed varies per algorithm, budget, warm start and code commit are stated.
"""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlbench import plots, stats
from rlbench.records import DONE, FAILED, Experiment, RunRecord, from_directory, from_mlflow

CONFIDENCE, RESAMPLES, CI_SEED = 0.95, 10_000, 0
#: Fewest finished runs behind an interval. One run has none, and with two the t quantile is
#: 12.7 while a percentile bootstrap covers about half the time: either interval misleads.
MIN_RUNS_FOR_INTERVAL = 3
#: Each interval's method, as the tables' headers name it.
T_INTERVAL = f"{CONFIDENCE:.0%} t-interval"
BOOTSTRAP = f"{CONFIDENCE:.0%} percentile bootstrap"
STRATIFIED = f"{CONFIDENCE:.0%} stratified bootstrap"
CI_METHOD = (
    f"means: {T_INTERVAL} over seeds (Student t, mean +- t(n-1) x sd / sqrt(n)); IQM and "
    f"P(X > Y): {BOOTSTRAP} over seeds ({RESAMPLES:,} resamples, scipy; P(X > Y) resamples "
    f"both algorithms' seeds independently); paired differences: {T_INTERVAL} of the per-seed "
    f"differences; over tasks: {STRATIFIED} (seeds resampled within each task, as rliable "
    f"does). No interval from fewer than {MIN_RUNS_FOR_INTERVAL} finished runs"
)
#: (column, cost metric) of the cost-to-threshold columns.
COSTS = (("samples", "cost/samples"), ("tokens", "cost/tokens_generated"), ("seconds", "cost/wall_s"))
ACCURACY = "eval/accuracy"


# ------------------------------------------------------------------ a small document model


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: str
    caption: str


Block = Heading | Text | Table | Image


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Table):
            lines = [block.header, ["---"] * len(block.header), *block.rows]
            out.append("\n".join("| " + " | ".join(cells) + " |" for cells in lines))
        else:
            out.append(f"![{block.caption}]({block.path})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: Sequence[Block], title: str) -> str:
    e = html.escape
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{e(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{e(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{e(c)}</th>" for c in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            body.append(
                f'<figure><img src="{e(block.path)}" alt="{e(block.caption)}">'
                f"<figcaption>{e(block.caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# ------------------------------------------------------------------ figures per run


def cost_to_reach(record: RunRecord, cost: str, threshold: float) -> float | None:
    """The cumulative ``cost`` at the first eval whose accuracy reaches ``threshold``."""
    evals = record.curve(ACCURACY)
    xs = [plots.cost_before(record, cost, step, inclusive=False) for step, _ in evals]
    return stats.first_crossing(xs, [v for _, v in evals], threshold) if evals else None


def final_accuracy(record: RunRecord) -> float | None:
    return record.last(ACCURACY)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _runs(count: int, noun: str = "run") -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _interval(low: float, high: float, runs: int, noun: str = "run", digits: int = 3) -> str:
    """``[low, high]``, or ``[n/a: 2 runs]`` below ``MIN_RUNS_FOR_INTERVAL`` runs."""
    if runs < MIN_RUNS_FOR_INTERVAL:
        return f"[n/a: {_runs(runs, noun)}]"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _seeds_needed(difference: stats.PairedDifference) -> str:
    if difference.n < 2:
        return "-"  # no spread to judge by
    if difference.seeds_needed is None:
        return "never" if difference.mean == 0 else "-"
    return str(difference.seeds_needed)


def _param_value(text: str) -> Any:
    """A logged parameter's text back as a config value (``None``, ``True``, ``0.1``, ``[1, 2]``)."""
    from rlbench.config_files import parse_scalar

    if text == "None":  # str(None); YAML would read it as the string "None"
        return None
    if text.startswith("(") and text.endswith(")"):  # str() of a tuple
        text = f"[{text[1:-1]}]"
    return parse_scalar(text)


def seed_varies(algorithm: str, params: Mapping[str, str]) -> str | None:
    """What a seed varies for ``algorithm`` run with ``params`` (its logged options), from the
    plug-in's ``seed_varies``; None where the plug-in is not installed here, its options do not
    rebuild, or it has no such property: the report then leaves the line out."""
    from rlbench.config_files import set_dotted
    from rlbench.registry import ALGORITHMS
    from rlbench.typecheck import build_dataclass

    prefix = f"algorithm.{algorithm}."
    data: dict[str, Any] = {}
    try:
        for key, text in params.items():
            # Lightning's MLflow logger writes a nested option's keys with "/"
            set_dotted(data, key[len(prefix) :].replace("/", "."), _param_value(text))
        plugin = ALGORITHMS.get(algorithm)
        instance = plugin(build_dataclass(plugin.Config, data, prefix.rstrip(".")))
        phrase = getattr(instance, "seed_varies", None)
    except Exception:  # noqa: BLE001 -- a plug-in, maybe third-party or absent, must not break a report
        return None
    return phrase if isinstance(phrase, str) and phrase else None


def _count(value: float | None) -> str:
    """``12345`` -> ``12.3k``: costs at a glance."""
    if value is None:
        return "-"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:.0f}"


# ------------------------------------------------------------------ the report


class Report:
    """Builds the blocks of one experiment's report (and draws its plots into ``plots_dir``)."""

    def __init__(self, experiment: Experiment, plots_dir: Path | None) -> None:
        self.experiment, self.matrix = experiment, experiment.matrix
        self.plots_dir = plots_dir
        self.done = [r for r in experiment.records if r.status == DONE and final_accuracy(r) is not None]
        self._seed_varies: dict[tuple[str, tuple[tuple[str, str], ...]], str | None] = {}

    def runs(self, task: str, noise: float | None, algorithm: str) -> list[RunRecord]:
        return [r for r in self.done if (r.task, r.noise, r.algorithm) == (task, noise, algorithm)]

    def fewest_runs(self) -> int:
        """The fewest finished runs behind any row of the summary tables (0 if a row has none)."""
        return min(
            len(self.runs(task, noise, algorithm))
            for task in self.matrix.tasks
            for noise in self.levels()
            for algorithm in self.matrix.algorithms
        )

    def levels(self) -> list[float | None]:
        return list(self.matrix.noise_levels) if self.matrix.noise_field else [None]

    def threshold(self, task: str) -> tuple[float | None, str]:
        """The accuracy to reach: the matrix's, else halfway from the warm start's accuracy (the
        first eval) to the best algorithm's mean final accuracy, at the first noise level."""
        if self.matrix.threshold is not None:
            return self.matrix.threshold, "set by the matrix"
        level = self.levels()[0]
        runs = {a: self.runs(task, level, a) for a in self.matrix.algorithms}
        means = [_mean([final_accuracy(r) for r in rs]) for rs in runs.values()]
        best = max((m for m in means if m is not None), default=None)
        start = _mean([r.curve(ACCURACY)[0][1] for rs in runs.values() for r in rs])
        if best is None or start is None:
            return None, "no finished run"
        how = "halfway from the warm start's mean accuracy to the best algorithm's mean final accuracy"
        return round(start + 0.5 * max(0.0, best - start), 2), how

    # -------------------------------------------------------------- tables

    def summary_table(self, task: str, noise: float | None, threshold: float | None) -> Table:
        header = ["algorithm", "runs", f"final accuracy, mean [{T_INTERVAL}]", f"IQM [{BOOTSTRAP}]"]
        header += [f"{name} to {_number(threshold, 2)}" for name, _ in COSTS]
        header += ["entropy collapses", "grad-norm spikes", "final KL"]
        rows = []
        for algorithm in self.matrix.algorithms:
            runs = self.runs(task, noise, algorithm)
            planned = len(self.matrix.seeds)
            if not runs:
                rows.append([algorithm, f"0/{planned}", *["-"] * (len(header) - 2)])
                continue
            scores = [final_accuracy(r) for r in runs]
            s = stats.summarize(scores, CONFIDENCE)
            row = [algorithm, f"{len(runs)}/{planned}", f"{s.mean:.3f} {_interval(s.ci_low, s.ci_high, s.n)}"]
            iqm_low, iqm_high = (
                stats.bootstrap_ci(scores, "iqm", CONFIDENCE, RESAMPLES, CI_SEED)
                if s.n >= MIN_RUNS_FOR_INTERVAL
                else (math.nan, math.nan)
            )
            row.append(f"{s.iqm:.3f} {_interval(iqm_low, iqm_high, s.n)}")
            for _, cost in COSTS:
                reached = [] if threshold is None else [cost_to_reach(r, cost, threshold) for r in runs]
                hits = [c for c in reached if c is not None]
                row.append(
                    f"{_count(statistics.median(hits))} ({len(hits)}/{len(runs)})" if hits else "never"
                )
            collapses = [r.last("train/collapse_step") for r in runs]
            steps = sorted(int(c) for c in collapses if c is not None)
            row.append(
                f"{len(steps)}/{len(runs)}" + (f" (step {', '.join(map(str, steps))})" if steps else "")
            )
            row.append(_number(_mean([r.last("train/grad_norm_spikes") or 0.0 for r in runs]), 1))
            row.append(_number(_mean([r.last("train/kl") for r in runs]), 4))
            rows.append(row)
        return Table(header, rows)

    def improvement_table(self, task: str, noise: float | None) -> Table | None:
        """P(row beats column) on final accuracy, with its CI, for every pair of algorithms."""
        scores = {a: [final_accuracy(r) for r in self.runs(task, noise, a)] for a in self.matrix.algorithms}
        present = [a for a, s in scores.items() if s]
        if len(present) < 2:
            return None
        rows = []
        for x in present:
            row = [x]
            for y in present:
                if x == y:
                    row.append("-")
                    continue
                p = stats.probability_of_improvement(scores[x], scores[y])
                fewer = min(len(scores[x]), len(scores[y]))
                low, high = (
                    stats.probability_of_improvement_ci(scores[x], scores[y], CONFIDENCE, RESAMPLES, CI_SEED)
                    if fewer >= MIN_RUNS_FOR_INTERVAL
                    else (math.nan, math.nan)
                )
                row.append(f"{p:.2f} {_interval(low, high, fewer, digits=2)}")
            rows.append(row)
        return Table([f"P(row > column) [{BOOTSTRAP}]", *present], rows)

    def paired_table(self, task: str, noise: float | None) -> Table | None:
        """Per pair of algorithms, A - B in final accuracy over the seeds both finished: runs of
        one seed share the warm start and the prompt sequence, so the pairs cancel them."""
        by_seed = {
            a: {r.seed: final_accuracy(r) for r in self.runs(task, noise, a)} for a in self.matrix.algorithms
        }
        present = [a for a, scores in by_seed.items() if scores]
        if len(present) < 2:
            return None
        rows = []
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                shared = sorted(set(by_seed[a]) & set(by_seed[b]))
                if not shared:
                    rows.append([f"{a} - {b}", "0", "-", "-", "-"])
                    continue
                d = stats.paired_difference(
                    [by_seed[a][seed] for seed in shared], [by_seed[b][seed] for seed in shared], CONFIDENCE
                )
                sd = "-" if d.n < 2 else f"{d.sd:.3f}"
                interval = _interval(d.lo, d.hi, d.n, noun="seed")
                rows.append([f"{a} - {b}", str(d.n), f"{d.mean:+.3f} {interval}", sd, _seeds_needed(d)])
        header = [
            "A - B",
            "seeds",
            f"mean difference [{T_INTERVAL}]",
            "sd of differences",
            "seeds to resolve",
        ]
        return Table(header, rows)

    def aggregate_table(self, noise: float | None) -> Table:
        """IQM and mean over tasks x seeds per algorithm, seeds resampled within each task."""
        tasks = list(self.matrix.tasks)
        planned = len(tasks) * len(self.matrix.seeds)
        header = ["algorithm", "runs", f"IQM [{STRATIFIED}]", f"mean [{STRATIFIED}]"]
        rows = []
        for algorithm in self.matrix.algorithms:
            by_task = {t: [final_accuracy(r) for r in self.runs(t, noise, algorithm)] for t in tasks}
            total = sum(len(scores) for scores in by_task.values())
            missing = [t for t, scores in by_task.items() if not scores]
            if missing:  # without a task the aggregate is over other tasks than the other rows'
                rows.append([algorithm, f"{total}/{planned}", f"- (no finished run on {missing[0]})", "-"])
                continue
            fewest_task = min(tasks, key=lambda t: len(by_task[t]))
            fewest = len(by_task[fewest_task])
            row = [algorithm, f"{total}/{planned}"]
            for statistic in ("iqm", "mean"):
                scores = list(by_task.values())
                point = stats.aggregate_score(scores, statistic)
                if fewest >= MIN_RUNS_FOR_INTERVAL:
                    low, high = stats.stratified_bootstrap_ci(
                        scores, statistic, CONFIDENCE, RESAMPLES, CI_SEED
                    )
                    row.append(f"{point:.3f} [{low:.3f}, {high:.3f}]")
                else:
                    row.append(f"{point:.3f} [n/a: {_runs(fewest)} on {fewest_task}]")
            rows.append(row)
        return Table(header, rows)

    def seed_table(self) -> Table | None:
        """Per algorithm, what its seed varies (the plug-in's ``seed_varies``, for the options
        its finished runs logged); None when no algorithm says."""
        rows = []
        for algorithm in self.matrix.algorithms:
            phrases: list[str] = []
            for run in self.done:
                if run.algorithm != algorithm or not run.algorithm_params:
                    continue
                key = (algorithm, tuple(sorted(run.algorithm_params.items())))
                if key not in self._seed_varies:
                    self._seed_varies[key] = seed_varies(algorithm, run.algorithm_params)
                phrase = self._seed_varies[key]
                if phrase is not None and phrase not in phrases:
                    phrases.append(phrase)
            if phrases:
                rows.append([algorithm, "; ".join(phrases)])
        return Table(["algorithm", "what a seed varies"], rows) if rows else None

    def failures(self) -> Table | None:
        failed = [r for r in self.experiment.records if r.status == FAILED]
        missing = [r for r in self.experiment.records if r.status not in (DONE, FAILED)]
        rows = [[r.cell, "failed", r.cause or "unknown"] for r in failed]
        rows += [[r.cell, r.status, "no result yet"] for r in missing]
        return Table(["cell", "status", "cause"], rows) if rows else None

    # -------------------------------------------------------------- the document

    def preamble(self) -> list[Block]:
        m = self.matrix
        records = self.experiment.records
        commits = sorted({r.info["commit"] for r in records if "commit" in r.info})
        warm = sorted({r.info["warmstart_seed"] for r in records if "warmstart_seed" in r.info})
        if m.warmstart_seed is not None:
            warm_text = f"one warm start (warmstart.seed={m.warmstart_seed}) shared by every run of a task"
        else:
            warm_text = f"each run from the warm start of its own seed ({', '.join(warm) or '-'})"
        budget = ", ".join(f"budget.{k}={v:g}" for k, v in m.budget.items()) or "none (a fixed step count)"
        stopped = sum(r.info.get("stopped_by", "") not in ("", "None") for r in records)
        noise = (
            f"reward_noise.{m.noise_field} in {', '.join(f'{v:g}' for v in m.noise_levels)}"
            if m.noise_field
            else "none"
        )
        lines = [
            f"Runs: {len(self.done)} finished of {len(records)} "
            f"({len(m.algorithms)} algorithms x {len(m.tasks)} tasks x {len(m.seeds)} seeds"
            f"{f' x {len(m.noise_levels)} noise levels' if m.noise_field else ''}).",
            f"Algorithms: {', '.join(m.algorithms)}. Tasks: {', '.join(m.tasks)}. "
            f"Seeds: {', '.join(map(str, m.seeds))}. Reward noise: {noise}.",
            f"Warm start: {warm_text}. Budget: {budget}"
            f"{f' ({stopped} runs ended by it)' if m.budget else ''}.",
            f"Statistics: {CI_METHOD}. IQM: interquartile mean, scipy.stats.trim_mean(scores, 0.25) "
            f"(the mean below 4 seeds). Costs to a threshold: median over the runs that reached it "
            f"(how many did, in brackets), read at the eval steps.",
            f"Code commit: {', '.join(commits) or 'unknown'}.",
        ]
        for algorithm, params in m.tuned.items():
            settings = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
            )
            lines.append(f"Tuned: {algorithm} runs with its sweep's best parameters ({settings}).")
        fewest = self.fewest_runs()
        if fewest < 5:
            lines.append(
                f"Few seeds: the fewest finished runs behind a row is {fewest} "
                f"(of {len(m.seeds)} planned seeds). Below {MIN_RUNS_FOR_INTERVAL} a row gives no "
                f"interval; from {MIN_RUNS_FOR_INTERVAL} the t-intervals keep their 95% but are wide, "
                f"and the bootstrap intervals (IQM, P(X > Y)) cannot leave the range of the seeds' "
                f"scores and cover less than they say (for a mean, a nominal 95% bootstrap covers "
                f"about 75% at 3 seeds and 85% at 5): add seeds before drawing a conclusion."
            )
        out: list[Block] = [Heading(1, f"Comparison: {m.name}"), *[Text(t) for t in lines]]
        seeds = self.seed_table()
        if seeds is not None:
            out.append(
                Text(
                    "What a seed varies, per algorithm: an interval over seeds measures this "
                    "variation and no other."
                )
            )
            out.append(seeds)
        return out

    def blocks(self) -> list[Block]:
        out = self.preamble()
        for task in self.matrix.tasks:
            threshold, how = self.threshold(task)
            out.append(Heading(2, f"Task {task}"))
            out.append(Text(f"Accuracy threshold for the cost columns: {_number(threshold, 2)} ({how})."))
            for noise in self.levels():
                if noise is not None:
                    out.append(Heading(3, f"reward_noise.{self.matrix.noise_field} = {noise:g}"))
                out.append(self.summary_table(task, noise, threshold))
                improvement = self.improvement_table(task, noise)
                if improvement is not None:
                    out.append(
                        Text("Probability that a run of the row's algorithm ends above one of the column's:")
                    )
                    out.append(improvement)
                paired = self.paired_table(task, noise)
                if paired is not None:
                    out.append(
                        Text(
                            "Final accuracy of A minus B, paired by seed (the seeds both finished, "
                            "which share the warm start and the prompt sequence). Seeds to resolve: "
                            f"the fewest seeds whose {T_INTERVAL} would exclude 0 if the mean "
                            "difference and its sd stayed as observed (a rough guide from few seeds)."
                        )
                    )
                    out.append(paired)
            out.extend(self.plot_blocks(task))
        if len(self.matrix.tasks) >= 2:
            out.append(Heading(2, "All tasks"))
            out.append(
                Text(
                    "Final accuracy over tasks x seeds, as rliable aggregates: the IQM of every "
                    "task's runs pooled and the mean of the per-task means, with a stratified "
                    "bootstrap (each resample draws seeds within each task)."
                )
            )
            for noise in self.levels():
                if noise is not None:
                    out.append(Heading(3, f"reward_noise.{self.matrix.noise_field} = {noise:g}"))
                out.append(self.aggregate_table(noise))
        failures = self.failures()
        if failures is not None:
            out.extend([Heading(2, "Runs without a result"), failures])
        return out

    # -------------------------------------------------------------- plots

    def plot_blocks(self, task: str) -> list[Block]:
        if self.plots_dir is None:
            return []
        out: list[Block] = [Heading(3, "Plots")]
        for noise in self.levels():
            # every algorithm, those without a finished run too: each keeps its colour in every plot
            groups = {a: self.runs(task, noise, a) for a in self.matrix.algorithms}
            if not any(groups.values()):
                continue
            suffix = "" if noise is None else f"-{self.matrix.noise_field}{noise:g}"
            label = task if noise is None else f"{task}, {self.matrix.noise_field}={noise:g}"
            for axis in plots.X_AXES:
                name = f"{task}{suffix}-curves-{axis[0]}.png"
                plots.learning_curves(groups, axis, label, self.plots_dir / name)
                out.append(Image(f"plots/{name}", f"{label}: accuracy, reward, entropy and KL vs {axis[1]}"))
        if self.matrix.noise_field:
            out.extend(self.robustness(task))
        out.extend(self.pass_curve(task))
        return out

    def robustness(self, task: str) -> list[Block]:
        assert self.plots_dir is not None and self.matrix.noise_field is not None
        lines: dict[str, list[tuple[float, float, float, float]]] = {}
        for algorithm in self.matrix.algorithms:
            points = []
            for noise in self.matrix.noise_levels:
                scores = [final_accuracy(r) for r in self.runs(task, noise, algorithm)]
                if scores:
                    s = stats.summarize(scores, CONFIDENCE)
                    if s.n < MIN_RUNS_FOR_INTERVAL:  # a point without a bar, as the table gives n/a
                        points.append((noise, s.mean, math.nan, math.nan))
                    else:
                        points.append((noise, s.mean, s.ci_low, s.ci_high))
            lines[algorithm] = points
        if not any(lines.values()):
            return []
        name = f"{task}-robustness.png"
        plots.robustness(lines, self.matrix.noise_field, task, self.plots_dir / name)
        caption = f"{task}: final eval accuracy vs reward_noise.{self.matrix.noise_field}"
        return [Image(f"plots/{name}", caption)]

    def pass_curve(self, task: str) -> list[Block]:
        from rlbench.evaluation import pass_curve_ks, pass_metric

        assert self.plots_dir is not None
        level = self.levels()[0]
        runs = [r for a in self.matrix.algorithms for r in self.runs(task, level, a)]
        ks = {int(r.info.get("eval_samples", "1")) for r in runs}
        if len(ks) != 1 or (k := ks.pop()) <= 1:
            return []
        js = pass_curve_ks(k)

        def curve(records: list[RunRecord], at_start: bool) -> list[float]:
            values = []
            for j in js:
                metric = pass_metric(j, k)
                points = [r.curve(metric) for r in records]
                picked = [(p[0] if at_start else p[-1])[1] for p in points if p]
                values.append(sum(picked) / len(picked) if picked else float("nan"))
            return values

        curves: dict[str, tuple[list[int], list[float]]] = {"warm start": (js, curve(runs, at_start=True))}
        for algorithm in self.matrix.algorithms:
            mine = [r for r in runs if r.algorithm == algorithm]
            curves[algorithm] = (js, curve(mine, at_start=False)) if mine else ([], [])
        name = f"{task}-pass_at_k.png"
        plots.pass_at_k(curves, task, self.plots_dir / name)
        return [Image(f"plots/{name}", f"{task}: pass@k vs k at the final eval, and for the warm start")]


def tables_markdown(experiment: Experiment) -> str:
    """The report's text and tables without plots: what must match between its two sources."""
    return to_markdown(Report(experiment, plots_dir=None).blocks())


def write_report(
    directory: str | Path | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    output: str | Path | None = None,
) -> Path:
    """Writes ``report.md``, ``report.html`` and ``plots/`` for the matrix in ``directory``, or
    for MLflow ``experiment`` (from MLflow alone); returns the path of ``report.html``."""
    source: Any
    if experiment is not None:
        source = from_mlflow(experiment, tracking_uri or _default_uri(directory))
        out = Path(output) if output else Path(f"report-{experiment}")
    else:
        assert directory is not None
        source = from_directory(directory)
        out = Path(output) if output else Path(directory)
    report = Report(source, plots_dir=out / "plots")
    blocks = report.blocks()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(to_markdown(blocks))
    (out / "report.html").write_text(to_html(blocks, f"rlbench comparison: {source.matrix.name}"))
    return out / "report.html"


def _default_uri(directory: str | Path | None) -> str:
    base = Path(directory) if directory else Path(".")
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"
