"""End the process on SIGTERM, even while the main thread is stuck inside a collective.

Python runs signal handlers only in the main thread, between bytecodes. A DDP rank blocked in a
gloo all-reduce that another rank never joins sits in C++ for as long as the collective's timeout
(tens of minutes), so the SIGTERM handler that Lightning installs never runs and a scheduler's
SIGTERM does nothing.

CPython's C-level signal handler, however, does run at once, in whichever thread receives the
signal, and it writes the signal number to the fd given to ``signal.set_wakeup_fd``. The watchdog
points that fd at a pipe and reads the other end in a daemon thread, which therefore learns of a
SIGTERM even while the main thread is stuck. Two paths follow:

* graceful: the Python-level handler raises ``SystemExit(EXIT_CODE_SIGTERM)`` in the main thread as
  soon as it runs Python again, so ``finally`` blocks run and Lightning (which catches
  ``BaseException`` during ``fit``) tears down and finalizes its loggers;
* forced: if the process is still alive ``grace_s`` seconds after the SIGTERM, the thread runs the
  callbacks registered with ``on_forced_stop`` (keep the checkpoint, mark the MLflow run) and ends
  the process with ``os._exit(EXIT_CODE_SIGTERM)``.

Limits: the Python-level SIGTERM handler must stay a Python callable (handlers that chain to it, as
Lightning's does, are fine); ``SIG_DFL`` or ``SIG_IGN`` removes the C-level handler and with it the
wakeup byte. A forked child does not inherit the watchdog. Once interpreter shutdown has begun,
daemon threads no longer run, so a hang that late cannot be forced.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

EXIT_CODE_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process that SIGTERM ended

_Handler = Callable[[int, FrameType | None], Any] | int | None


class SigtermWatchdog:
    """Turns SIGTERM into an exit: gracefully if the main thread runs Python, forcibly after ``grace_s``.

    Create it with ``install_sigterm_watchdog``.
    """

    def __init__(self, grace_s: float) -> None:
        self._grace_s = grace_s
        self._callbacks: list[Callable[[], None]] = []
        self._installed = False
        self._read_fd, self._write_fd = os.pipe()
        # set_wakeup_fd refuses a blocking fd: the C handler must never block inside a signal handler
        os.set_blocking(self._write_fd, False)
        self._thread = threading.Thread(target=self._watch, name="rlbench-sigterm-watchdog", daemon=True)
        self._previous_handler: _Handler = None
        self._previous_wakeup_fd = -1
        self._sigterm = threading.Event()

    def on_forced_stop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` before a forced exit; callbacks run in registration order, each on its own."""
        self._callbacks.append(fn)

    def uninstall(self) -> None:
        """Restore the previous SIGTERM handler and wakeup fd and stop the watchdog thread.

        Call it from the main thread; calling it again does nothing. After a SIGTERM has arrived
        the deadline stays armed: the process was asked to end, and a hang after this call (in
        teardown, in an atexit hook) must still not keep it alive.
        """
        if not self._installed:
            return
        _require_main_thread("SigtermWatchdog.uninstall")
        self._installed = False
        self._restore_handler()
        current_wakeup_fd = signal.set_wakeup_fd(self._previous_wakeup_fd, warn_on_full_buffer=False)
        if current_wakeup_fd != self._write_fd:
            signal.set_wakeup_fd(current_wakeup_fd, warn_on_full_buffer=False)
        # The reader sees end-of-file and returns; it owns the read end and closes it.
        os.close(self._write_fd)

    def _restore_handler(self) -> None:
        # Put back only what is still ours; a handler installed after us is its owner's business.
        if signal.getsignal(signal.SIGTERM) == self._handle_sigterm:
            previous = self._previous_handler
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _install(self) -> None:
        self._previous_handler = signal.signal(signal.SIGTERM, self._handle_sigterm)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._installed = True
        # A forked child would share the pipe: its SIGTERM would arm the parent's deadline.
        os.register_at_fork(after_in_child=self._detach_in_child)
        self._thread.start()

    @property
    def sigterm_received(self) -> bool:
        """Whether a SIGTERM has arrived: whatever the main thread raises from then on (a
        collective failing because the forced path killed its peer), the process is ending
        because it was asked to, and should exit with ``EXIT_CODE_SIGTERM``."""
        return self._sigterm.is_set()

    def _handle_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._sigterm.set()
        if callable(self._previous_handler):
            self._previous_handler(signum, frame)
        raise SystemExit(EXIT_CODE_SIGTERM)

    def _watch(self) -> None:
        while True:
            data = os.read(self._read_fd, 64)
            if not data:  # uninstall closed the write end
                os.close(self._read_fd)
                return
            self._forward(data)
            if signal.SIGTERM in data:
                self._sigterm.set()
                break
        # Only this thread reads the pipe and it stops reading here, so a second SIGTERM can
        # neither start a second timer nor shorten this one.
        time.sleep(self._grace_s)
        self._force_exit()

    def _forward(self, data: bytes) -> None:
        # Whoever set the previous wakeup fd (an asyncio loop, say) still expects its bytes.
        if self._previous_wakeup_fd >= 0:
            try:
                os.write(self._previous_wakeup_fd, data)
            except OSError:
                pass  # full or closed: the C handler would have dropped the byte too

    def _force_exit(self) -> None:
        # A cleanup can hang too (an unreachable MLflow server, a full stderr pipe): bound it.
        backstop = threading.Timer(self._grace_s, os._exit, args=(EXIT_CODE_SIGTERM,))
        backstop.daemon = True
        backstop.start()
        _say(f"SIGTERM received and the process is still alive after {self._grace_s:g}s; forcing exit")
        for fn in self._callbacks:
            try:
                fn()
            except BaseException as exc:  # even SystemExit: nothing may stand between us and the exit
                _say(f"forced-stop callback {getattr(fn, '__qualname__', fn)!r} failed: {exc!r}")
        os._exit(EXIT_CODE_SIGTERM)

    def _detach_in_child(self) -> None:
        # The child has no watchdog thread; give it back the signal setup it would have had.
        if not self._installed:
            return
        self._installed = False
        self._restore_handler()
        signal.set_wakeup_fd(self._previous_wakeup_fd, warn_on_full_buffer=False)
        os.close(self._read_fd)
        os.close(self._write_fd)


def install_sigterm_watchdog(grace_s: float = 10.0) -> SigtermWatchdog:
    """Make SIGTERM end this process, even while the main thread is blocked in C code.

    Call it from the main thread before anything that may block in a collective. ``grace_s`` is
    how long the graceful path (``SystemExit`` in the main thread) gets before the forced one.
    """
    _require_main_thread("install_sigterm_watchdog")
    watchdog = SigtermWatchdog(grace_s)
    watchdog._install()
    return watchdog


def _require_main_thread(what: str) -> None:
    # signal.signal and signal.set_wakeup_fd only work there; say so instead of their ValueError.
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"{what} must be called from the main thread (signal handlers live there)")


def _say(message: str) -> None:
    # os.write, not print: the main thread may be stuck holding sys.stderr's lock.
    try:
        os.write(2, f"rlbench: {message}\n".encode(errors="replace"))
    except OSError:
        pass
