"""A flwr-clientapp process ends when the SuperExec or SuperNode above it goes, or when its
reply cannot be handed over (client_app.watchdog)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client_app import watchdog

ROOT = Path(__file__).resolve().parents[1]

# Three generations, named as Flower's: "flower-supernode" starts "flower-superexec",
# which starts the "ClientApp" that runs the watchdog and writes its pid.
CHILD = """
import sys, time
from client_app import watchdog
watchdog.CHECK_S = 0.1
watchdog.REPLY_GRACE_S = float(sys.argv[2])
watchdog.watch(force=True)
open(sys.argv[1], "w").write(str(__import__("os").getpid()))
if watchdog.REPLY_GRACE_S < 100:
    watchdog.mod(None, None, lambda m, c: "reply")
time.sleep(60)
"""
MIDDLE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
time.sleep(60)
"""


def _chain(tmp_path: Path, grace: float, supernode: str = "flower-supernode"):
    pid_file = tmp_path / "clientapp.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    middle = [sys.executable, "-c", MIDDLE, CHILD, str(pid_file), str(grace), "flower-superexec"]
    top_code = f"import subprocess, time; subprocess.Popen({middle!r}); time.sleep(60)"
    top = subprocess.Popen([sys.executable, "-c", top_code, supernode], env=env)
    end = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < end:
        time.sleep(0.1)
    return top, int(pid_file.read_text())


def _gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not watchdog._alive(pid):
            return True
        time.sleep(0.1)
    return False


# Flower's SuperNode, or the project's wrapper of it (python -m anytime_fl.supernode)
@pytest.mark.parametrize("supernode", ["flower-supernode", "anytime_fl.supernode"])
def test_the_clientapp_ends_when_the_supernode_above_its_superexec_dies(tmp_path, supernode):
    top, child = _chain(tmp_path, grace=1000, supernode=supernode)
    middle = watchdog._stat(child)[1]
    assert "flower-superexec" in watchdog._cmdline(middle)
    assert watchdog.watched_pids(child) == [middle, top.pid]
    try:
        assert watchdog._alive(child)
        top.send_signal(signal.SIGKILL)  # left unreaped for a while: a zombie, as under a PID 1 that never reaps
        assert _gone_within(child, 10), "the ClientApp outlived its SuperNode"
        assert watchdog._alive(middle)  # only the watched process ends itself here
    finally:
        for pid in (middle, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        top.wait(timeout=10)


def test_a_reply_that_cannot_be_handed_over_ends_the_process(tmp_path):
    top, child = _chain(tmp_path, grace=0.5)
    middle = watchdog._stat(child)[1]
    try:
        assert _gone_within(child, 10), "the ClientApp outlived its reply"
        assert watchdog._alive(top.pid)
    finally:
        os.kill(middle, signal.SIGKILL)
        top.kill()
        top.wait(timeout=10)


def test_the_watchdog_stays_off_outside_a_flwr_clientapp_process():
    assert os.path.basename(sys.argv[0]) != watchdog.PROCESS
    assert watchdog.watch() is False
    assert watchdog.reason_to_stop([os.getpid()], os.getppid(), None, time.monotonic()) is None
    assert "reply" in watchdog.reason_to_stop([], os.getppid(), 0.0, watchdog.REPLY_GRACE_S + 1)
