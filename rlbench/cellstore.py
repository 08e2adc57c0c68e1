"""Which cells of a matrix are done, running or left, in a database any number of workers share.

One table, ``rlbench_cells``, in any SQLAlchemy database: the SQLite file in the matrix's
``output_dir`` by default, or ``--storage postgresql://...`` (the same database an Optuna
study may use) for workers on many machines. A worker *claims* a cell with one conditional
``UPDATE ... WHERE state = <what it read> AND claims = <what it read>``: of two workers racing
for the same cell, exactly one sees its row change, so each cell runs once.

A running cell whose worker died is claimed again: its worker's heartbeat (every
``HEARTBEAT_S`` seconds) went stale for ``STALE_S``, or its worker was on this machine and
its process is gone (a restart right after a kill need not wait). The new worker resumes the
run from its last checkpoint.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

HEARTBEAT_S = 10.0
STALE_S = 60.0
#: A cell whose worker died this many times while running it is marked failed, not retried:
#: something in it kills the process (out of memory, a segfault).
MAX_ATTEMPTS = 3

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


@dataclass
class CellRow:
    cell: str
    position: int
    state: str
    worker: str | None
    heartbeat: float | None
    attempts: int
    cause: str | None
    wall_s: float | None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def worker_gone(worker: str | None, heartbeat: float | None, now: float) -> bool:
    """Whether a running cell's worker is gone: a stale heartbeat, or (same machine) no process."""
    if worker is None or heartbeat is None or now - heartbeat > STALE_S:
        return True
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid))


class CellStore:
    """The cells of one matrix (``matrix`` names it: one database can hold many)."""

    def __init__(self, url: str, matrix: str) -> None:
        import sqlalchemy as sa

        self.url, self.matrix = url, matrix
        options: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # wait for a writer rather than fail: workers commit rarely and briefly
            options["connect_args"] = {"timeout": 60}
        self.engine = sa.create_engine(url, **options)
        meta = sa.MetaData()
        self.table = sa.Table(
            "rlbench_cells",
            meta,
            sa.Column("matrix", sa.String(200), primary_key=True),
            sa.Column("cell", sa.String(200), primary_key=True),
            sa.Column("position", sa.Integer, nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("worker", sa.String(300)),
            sa.Column("heartbeat", sa.Float),
            sa.Column("claims", sa.Integer, nullable=False, default=0),
            sa.Column("attempts", sa.Integer, nullable=False, default=0),
            sa.Column("cause", sa.Text),
            sa.Column("wall_s", sa.Float),
        )
        self._meta = meta

    def create(self, cells: list[str]) -> None:
        """Creates the table (once, before workers start: creating it from two processes at
        once races) and adds the cells it does not hold yet, as pending."""
        import sqlalchemy as sa

        for attempt in range(3):  # workers on other machines may be creating it this moment
            try:
                self._meta.create_all(self.engine)
                break
            except sa.exc.DBAPIError:
                if attempt == 2:
                    raise
                time.sleep(1.0)
        try:
            self._add(cells)
        except sa.exc.IntegrityError:  # another worker added them first
            pass

    def _add(self, cells: list[str]) -> None:
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            known = {row.cell for row in conn.execute(sa.select(self.table.c.cell).where(self._mine()))}
            new = [
                {
                    "matrix": self.matrix,
                    "cell": c,
                    "position": i,
                    "state": PENDING,
                    "claims": 0,
                    "attempts": 0,
                }
                for i, c in enumerate(cells)
                if c not in known
            ]
            if new:
                conn.execute(sa.insert(self.table), new)

    def _mine(self) -> Any:
        return self.table.c.matrix == self.matrix

    def rows(self, cells: list[str] | None = None) -> list[CellRow]:
        import sqlalchemy as sa

        t = self.table
        query = sa.select(t).where(self._mine()).order_by(t.c.position)
        with self.engine.connect() as conn:
            rows = [
                CellRow(r.cell, r.position, r.state, r.worker, r.heartbeat, r.attempts, r.cause, r.wall_s)
                for r in conn.execute(query)
            ]
        return rows if cells is None else [r for r in rows if r.cell in set(cells)]

    def counts(self, cells: list[str]) -> dict[str, int]:
        counts = dict.fromkeys((PENDING, RUNNING, DONE, FAILED), 0)
        for row in self.rows(cells):
            counts[row.state] += 1
        return counts

    def claim(self, cells: list[str], worker: str, retry_failed: bool = False) -> str | None:
        """Claims the first cell that is left (pending, or running with its worker gone; failed
        too with ``retry_failed``) for ``worker``; None when none is left."""
        import sqlalchemy as sa

        t = self.table
        wanted = set(cells)
        while True:
            now = time.time()
            with self.engine.connect() as conn:
                rows = list(conn.execute(sa.select(t).where(self._mine()).order_by(t.c.position)))
            free = [
                r
                for r in rows
                if r.cell in wanted
                and (
                    r.state == PENDING
                    or (r.state == RUNNING and worker_gone(r.worker, r.heartbeat, now))
                    or (retry_failed and r.state == FAILED)
                )
            ]
            if not free:
                return None
            row = free[0]
            died = row.state == RUNNING  # its worker died while running it
            if died and row.attempts >= MAX_ATTEMPTS:
                cause = (
                    f"its worker process died {row.attempts} times while running it (killed? out of memory?)"
                )
                self._update(row, state=FAILED, worker=None, cause=cause)
                continue
            if self._update(
                row,
                state=RUNNING,
                worker=worker,
                heartbeat=now,
                claims=row.claims + 1,
                attempts=1 if row.state == FAILED else row.attempts + 1,
                cause=None,
            ):
                return row.cell
            # another worker changed the row first: read again

    def _update(self, row: Any, **values: Any) -> bool:
        """Changes ``row`` only if nobody changed it since it was read; whether it did."""
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(t)
                .where(self._mine(), t.c.cell == row.cell, t.c.state == row.state, t.c.claims == row.claims)
                .values(**values)
            )
        return result.rowcount == 1

    def _set(self, cell: str, holder: str, **values: Any) -> None:
        """Changes a cell worker ``holder`` holds (no-op if another worker took it over)."""
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(t).where(self._mine(), t.c.cell == cell, t.c.worker == holder).values(**values)
            )

    def beat(self, cell: str, worker: str) -> None:
        self._set(cell, worker, heartbeat=time.time())

    def finish(
        self, cell: str, worker: str, state: str, cause: str | None = None, wall_s: float | None = None
    ) -> None:
        self._set(cell, worker, state=state, cause=cause, wall_s=wall_s, heartbeat=time.time())

    def release(self, cell: str, worker: str) -> None:
        """Gives a cell back (the worker was interrupted): the next worker resumes it."""
        # an interruption is not an attempt that killed the worker: take it back
        self._set(
            cell, worker, state=PENDING, worker=None, heartbeat=None, attempts=self.table.c.attempts - 1
        )

    def mark_done(self, cell: str) -> None:
        """Records a cell whose run finished outside any worker (its ``summary.json`` exists)."""
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as conn:
            conn.execute(sa.update(t).where(self._mine(), t.c.cell == cell).values(state=DONE, cause=None))

    def dispose(self) -> None:
        self.engine.dispose()


class Heartbeat:
    """Beats for a claimed cell in a background thread until stopped."""

    def __init__(self, store: CellStore, cell: str, worker: str, every_s: float = HEARTBEAT_S) -> None:
        self.store, self.cell, self.worker, self.every_s = store, cell, worker, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{cell}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.store.beat(self.cell, self.worker)
            except Exception:  # noqa: BLE001 - a missed beat only risks a duplicate claim later
                pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
