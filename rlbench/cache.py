"""Build-once cache directories, safe when several processes ask for the same entry at once.

Every rank of a ``torchrun`` job, and every worker of a comparison or sweep, may ask for the
same preset or warm start at the same moment. The first one builds it under an exclusive file
lock; the others wait on the lock and then find the entry complete. An entry is built in a
private temporary directory and renamed into place, so a half-built entry is never seen,
even after a crash (a stale temporary directory is simply rebuilt).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def build_once(directory: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """``directory``, built by ``build(tmp)`` unless ``complete(directory)`` already holds.

    ``build`` writes the entry into the empty directory it is given; it is renamed to
    ``directory`` when ``build`` returns. Concurrent callers build it exactly once.
    """
    if complete(directory):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.with_name(directory.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            if complete(directory):  # built by another process while this one waited
                return directory
            tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                build(tmp)
                if directory.exists():  # an incomplete leftover of a crashed build
                    shutil.rmtree(directory)
                tmp.replace(directory)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return directory
