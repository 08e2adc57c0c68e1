"""A matrix's report: ``report.md``, ``report.html`` and ``plots/*.png``, from run records alone.

Per task (and noise level) a summary table: final eval accuracy, mean with its 95% percentile
bootstrap CI over seeds, and IQM; the cost (samples, tokens, seconds) to first reach an
accuracy threshold; entropy collapses, grad-norm spikes and the final KL. Then the probability
that each algorithm beats each other (with its CI), and the plots. Every figure comes from
``rlbench.stats``; the CI method, seeds, budget, warm start and code commit are stated.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlbench import plots, stats
from rlbench.records import DONE, FAILED, Experiment, RunRecord, from_directory, from_mlflow

CONFIDENCE, RESAMPLES, CI_SEED = 0.95, 10_000, 0
CI_METHOD = (
    f"{CONFIDENCE:.0%} percentile bootstrap over seeds ({RESAMPLES:,} resamples, scipy; "
    f"P(X > Y) resamples both algorithms' seeds independently)"
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

    def runs(self, task: str, noise: float | None, algorithm: str) -> list[RunRecord]:
        return [r for r in self.done if (r.task, r.noise, r.algorithm) == (task, noise, algorithm)]

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
        header = ["algorithm", "runs", "final accuracy, mean [95% CI]", "IQM"]
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
            s = stats.summarize(scores, CONFIDENCE, CI_SEED, RESAMPLES)
            row = [algorithm, f"{len(runs)}/{planned}", f"{s.mean:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"]
            row.append(f"{s.iqm:.3f}")
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
                low, high = stats.probability_of_improvement_ci(
                    scores[x], scores[y], CONFIDENCE, RESAMPLES, CI_SEED
                )
                row.append(f"{p:.2f} [{low:.2f}, {high:.2f}]")
            rows.append(row)
        return Table(["P(row > column)", *present], rows)

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
        if len(m.seeds) < 5:
            lines.append(
                f"With {len(m.seeds)} seeds per algorithm these intervals are crude (a bootstrap "
                f"interval cannot leave the range of the seeds' scores): read them as a lower "
                f"bound on the uncertainty, and add seeds before drawing a conclusion."
            )
        return [Heading(1, f"Comparison: {m.name}"), *[Text(t) for t in lines]]

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
            out.extend(self.plot_blocks(task))
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
                    s = stats.summarize(scores, CONFIDENCE, CI_SEED, RESAMPLES)
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
