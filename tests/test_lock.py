"""One live run per run folder (server_app/lock.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError
from server_app import lock
from tests.checks import one_line

ROOT = Path(__file__).resolve().parents[1]


def test_a_live_run_owns_its_folder_and_a_crashed_one_does_not(tmp_path):
    fd = lock.acquire(tmp_path)
    with pytest.raises(ConfigError) as err:
        lock.acquire(tmp_path)
    one_line(str(err.value), str(tmp_path), f"pid {os.getpid()}")
    lock.release(fd)
    lock.release(lock.acquire(tmp_path))
    # A holder killed with SIGKILL cannot clean up; the kernel drops its lock.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from server_app import lock; "
            "lock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError):
        lock.acquire(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait()
    lock.release(lock.acquire(tmp_path))
