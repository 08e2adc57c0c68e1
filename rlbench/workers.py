"""Local worker processes of ``rlbench compare`` and ``rlbench sweep``, and how a worker is named."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def this_worker() -> str:
    """``host:pid``: which process on which machine holds a cell or runs a trial."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_workers(command: list[str], workers: int) -> None:
    """Runs ``workers`` copies of ``command`` side by side and waits for them all; Ctrl-C is
    passed on to each, so they stop their work cleanly (it stays resumable)."""
    env = dict(os.environ)
    # K runs side by side, each with as many threads as cores, oversubscribe the CPU and ran up
    # to 10x slower here than one after another: share the cores (unless told otherwise)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    procs = [subprocess.Popen(command, env=env) for _ in range(workers)]
    try:
        for proc in procs:
            proc.wait()
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait()
        raise
