"""SIGTERM ends the process: gracefully when Python runs, forcibly when a collective is stuck.

Each scenario runs in a child process: the pytest process itself is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rlbench.stopping import EXIT_CODE_SIGTERM, install_sigterm_watchdog

ROOT = Path(__file__).parents[1]


def write_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(body))
    return script


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout}s"
        time.sleep(0.05)


def test_sigterm_ends_a_rank_stuck_in_an_all_reduce(tmp_path: Path):
    script = write_script(
        tmp_path,
        f"""
        import signal, time
        from pathlib import Path
        import torch
        import torch.distributed as dist
        from rlbench.stopping import install_sigterm_watchdog

        tmp = Path({str(tmp_path)!r})
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method=f"file://{{tmp}}/store", rank=rank, world_size=2)
        if rank == 1:
            time.sleep(60)  # never joins the all-reduce
            sys.exit(0)

        watchdog = install_sigterm_watchdog(grace_s=1)

        def broken():
            raise OSError("tracking server unreachable")

        watchdog.on_forced_stop(broken)
        watchdog.on_forced_stop(lambda: (tmp / "forced").write_text("checkpoint kept"))

        # Like Lightning's handler: records and chains, but cannot run while the main thread is in C++.
        previous = signal.getsignal(signal.SIGTERM)

        def recording_handler(signum, frame):
            (tmp / "python_handler_ran").touch()
            previous(signum, frame)

        signal.signal(signal.SIGTERM, recording_handler)
        (tmp / "ready").touch()
        dist.all_reduce(torch.ones(4))
        print("all_reduce returned", flush=True)
        """,
    )
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        wait_for(tmp_path / "ready", ranks[0], timeout=30)
        time.sleep(1)  # let rank 0 get into the collective
        ranks[0].send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, err = ranks[0].communicate(timeout=15)
        elapsed = time.monotonic() - start
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()
    assert ranks[0].returncode == EXIT_CODE_SIGTERM, err
    assert elapsed >= 0.9, "exited before the grace period"
    assert "all_reduce returned" not in out
    # the forced path ran (the failing callback did not stop the next one), not the Python handler
    assert (tmp_path / "forced").read_text() == "checkpoint kept"
    assert not (tmp_path / "python_handler_ran").exists()
    assert "forcing exit" in err
    assert "tracking server unreachable" in err


def test_sigterm_while_running_python_exits_gracefully(tmp_path: Path):
    script = write_script(
        tmp_path,
        f"""
        from pathlib import Path
        from rlbench.stopping import install_sigterm_watchdog

        tmp = Path({str(tmp_path)!r})
        watchdog = install_sigterm_watchdog(grace_s=5)
        watchdog.on_forced_stop(lambda: (tmp / "forced").touch())
        try:
            (tmp / "ready").touch()
            total = 0
            while True:
                total += 1
        finally:
            (tmp / "finally_ran").touch()
        """,
    )
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(tmp_path / "ready", proc, timeout=15)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == EXIT_CODE_SIGTERM, err
    assert elapsed < 2.5, f"took {elapsed:.1f}s: the graceful path should not wait for the 5 s grace period"
    assert (tmp_path / "finally_ran").exists()
    assert not (tmp_path / "forced").exists()


def test_sigterm_of_a_forked_child_does_not_stop_the_parent(tmp_path: Path):
    # multiprocessing and DataLoader workers fork; Process.terminate() sends SIGTERM to the child
    script = write_script(
        tmp_path,
        """
        import multiprocessing, time
        from rlbench.stopping import install_sigterm_watchdog

        install_sigterm_watchdog(grace_s=0.5)
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        time.sleep(0.3)
        child.terminate()
        child.join()
        time.sleep(1.5)  # past the grace period the parent's deadline would have had
        print(child.exitcode, flush=True)
        """,
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(-signal.SIGTERM)  # the child got the default handler back


def test_wakeup_bytes_reach_the_previous_wakeup_fd(tmp_path: Path):
    script = write_script(
        tmp_path,
        """
        import os, select, signal
        from rlbench.stopping import install_sigterm_watchdog

        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        install_sigterm_watchdog()
        os.kill(os.getpid(), signal.SIGUSR1)
        ready, _, _ = select.select([read_fd], [], [], 5)
        print(list(os.read(read_fd, 64)) if ready else "nothing", flush=True)
        """,
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([int(signal.SIGUSR1)])


def test_uninstall_restores_the_previous_handler_and_wakeup_fd():
    def original_handler(signum, frame):
        pass

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    saved_handler = signal.signal(signal.SIGTERM, original_handler)
    saved_fd = signal.set_wakeup_fd(write_fd)
    try:
        watchdog = install_sigterm_watchdog(grace_s=1)
        assert signal.getsignal(signal.SIGTERM) is not original_handler
        watchdog.uninstall()
        watchdog.uninstall()  # idempotent
        assert signal.getsignal(signal.SIGTERM) is original_handler
        assert signal.set_wakeup_fd(-1) == write_fd
        watchdog._thread.join(timeout=5)
        assert not watchdog._thread.is_alive()
    finally:
        signal.set_wakeup_fd(saved_fd)
        signal.signal(signal.SIGTERM, saved_handler)
        os.close(read_fd)
        os.close(write_fd)


def test_install_outside_the_main_thread_is_refused():
    errors: list[BaseException] = []

    def install() -> None:
        try:
            install_sigterm_watchdog()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    with pytest.raises(RuntimeError, match="main thread"):
        raise errors[0]
