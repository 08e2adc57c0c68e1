"""Shared fixtures: small configs that run in seconds on one CPU."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlbench.config import AUTO_PRECISION_ENV, RunConfig, load_config

torch.set_num_threads(2)
# trainer.precision "auto" picks bf16 on a CPU with native bf16: pinned here (and in the CLI
# processes tests start, which inherit it) so that no test depends on the CPU's kernels
os.environ.setdefault(AUTO_PRECISION_ENV, "32-true")


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., RunConfig]:
    """A tiny run config under ``tmp_path``; extra ``dotted.key=value`` strings override it."""

    def make(*overrides: str) -> RunConfig:
        base = [
            f"output_dir={tmp_path / 'run'}",
            f"warmstart.cache_dir={tmp_path / 'cache'}",
            "warmstart.enabled=false",
            "rollout.prompts_per_step=4",
            "rollout.max_new_tokens=4",
            "algorithm.grpo.group_size=4",
            "trainer.max_steps=3",
            "eval.num_prompts=16",
            "eval.every_n_steps=2",
            "trainer.precision=32-true",
        ]
        return load_config(None, [*base, *overrides])

    return make


def run_steps(module: Any, steps: int) -> dict[str, float]:
    """Trains ``module`` (an ``RLModule``) for ``steps`` rollout steps in a bare Trainer; its
    last step's metrics."""
    import lightning.pytorch as pl

    from rlbench.data import StepTicks

    module.config.trainer.max_steps = steps
    trainer = pl.Trainer(
        max_steps=100,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=StepTicks())
    return module.last_metrics


def postgres_bin() -> Path | None:
    """Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off PATH."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 (for the servers tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_tcp_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of our own on 127.0.0.1 (trust auth, a temporary data directory) and
    an empty database in it; its SQLAlchemy URL."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql; .ci/run installs it)")
    pytest.importorskip("psycopg", reason='psycopg 3 is needed: pip install "rlbench[postgres]"')
    # initdb refuses to run as root: run the server as the postgres user the package creates
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="rlbench-pg-"))
    data = root / "data"
    data.mkdir()
    if as_user:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    port = free_port()

    def pg(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres")
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
       "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start")  # fmt: skip
    try:
        pg("psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE rlbench")
        yield f"postgresql://postgres@127.0.0.1:{port}/rlbench"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


#: ``(test, line)`` figures the learning tests print with their margins: shown again in the
#: run's summary, since pytest hides a passing test's output.
MARGINS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MARGINS:
        terminalreporter.section("learning-test margins")
        for line in MARGINS:
            terminalreporter.write_line(line)
