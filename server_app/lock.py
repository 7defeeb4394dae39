"""One live run per run folder.

The lock is an flock on `<run-dir>/.lock`: the kernel drops it when the
process that holds it ends, however it ends, so a crashed or killed run
never leaves its folder locked. The file keeps the holder's pid and host
only to name it in the refusal.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
from pathlib import Path

from core.config import ConfigError
from core.run_files import LOCK as NAME

_held: list[int] = []  # file descriptors of the locks this process holds


def acquire(run_dir: Path) -> int:
    """Lock run_dir for this process, or raise ConfigError naming the live run that holds it."""
    path = Path(run_dir) / NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError("output-dir", f"cannot write in {run_dir}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = f" (pid {holder.get('pid')} on {holder.get('host')})" if holder else ""
        raise ConfigError(
            "run-name",
            f"{run_dir} is in use by a live run{who}; stop it first "
            "(Ctrl-C on scripts/simulate.sh, or `flwr stop RUN_ID`) or pick another run-name",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    _held.append(fd)
    return fd


def release(fd: int) -> None:
    if fd in _held:
        _held.remove(fd)
        os.close(fd)  # closing the only descriptor drops the flock


def releasing(fn):
    """Release every run-folder lock `fn` took, however it returns (in-process tests run many runs)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = len(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            for fd in _held[before:]:
                release(fd)

    return wrapper
