"""anytime_fl.superlink stops within its grace period while a log stream is attached.

Flower 1.42's SuperLink serves its APIs with uvicorn, which on SIGTERM waits
with no limit for open connections; `flwr run --stream` holds one for as
long as the run lasts, so the SuperLink sat at "Waiting for connections to
close" until it was killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvicorn

from anytime_fl import superlink
from tests.private_flower import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GRACE_S = 2
# The wrapper must be gone this long after SIGTERM: its grace, then Flower's own shutdown
# (it stops the run launcher and the ServerApp), slow on a loaded 2-core machine.
STOP_BOUND_S = GRACE_S + 40


def test_grace_is_passed_to_uvicorn_unless_given(monkeypatch):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append(kw))
    superlink.patch_stop_grace(7)
    superlink.patch_stop_grace(7)  # twice: still one layer
    uvicorn.run(app="x:y")
    uvicorn.run(app="x:y", timeout_graceful_shutdown=1)
    assert [c["timeout_graceful_shutdown"] for c in calls] == [7, 1]


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_bad_grace_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("ANYTIME_SUPERLINK_STOP_GRACE_S", value)
    monkeypatch.setattr(uvicorn, "run", uvicorn.run)
    with pytest.raises(SystemExit, match="ANYTIME_SUPERLINK_STOP_GRACE_S"):
        superlink.main()


def _ours(base: Path) -> list[int]:
    """Processes started from base (their FLWR_HOME is under it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(base).encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait(what, check, seconds, log: Path):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.mark.e2e
def test_sigterm_with_a_stream_attached_stops_the_superlink_within_its_grace(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        ANYTIME_SUPERLINK_STOP_GRACE_S=str(GRACE_S),
    )
    port = free_port()
    user_home = tmp_path / "user-home"
    user_home.mkdir()
    (user_home / "config.toml").write_text(
        f'[superlink]\ndefault = "t"\n\n[superlink.t]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    link_log, run_log = tmp_path / "superlink.log", tmp_path / "flwr-run.log"
    procs = []
    try:
        with open(link_log, "wb") as fh:
            link = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "anytime_fl.superlink",
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tmp_path,
                env={**env, "FLWR_HOME": str(tmp_path / "link-home"), "PYTHONPATH": str(ROOT)},
            )
        procs.append(link)
        _wait(
            "the SuperLink",
            lambda: "Application startup complete" in link_log.read_text(errors="replace"),
            300,
            link_log,
        )
        # A run nobody serves (no SuperNode): its ServerApp waits for nodes, the stream stays open.
        with open(run_log, "wb") as fh:
            procs.append(
                subprocess.Popen(
                    [BIN / "flwr", "run", str(ROOT), "t", "--stream", "--run-config", "num-server-rounds=1"],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=ROOT,
                    env={**env, "FLWR_HOME": str(user_home)},
                )
            )
        _wait(
            "the log stream", lambda: "ControlServicer.StreamLogs" in link_log.read_text(errors="replace"), 300, run_log
        )
        time.sleep(1)
        link.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        try:
            link.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the SuperLink was still running {STOP_BOUND_S} s after SIGTERM:\n{link_log.read_text()[-3000:]}"
            )
        took = time.monotonic() - stopped
        out = link_log.read_text(errors="replace")
        # uvicorn's own words when the bound, not the stream's end, stopped the wait
        assert "timeout graceful shutdown exceeded" in out, out[-3000:]
        assert took < STOP_BOUND_S
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        end = time.monotonic() + 20  # the run launcher and ServerApp follow their parent
        while _ours(tmp_path) and time.monotonic() < end:
            time.sleep(0.5)
        for pid in _ours(tmp_path):
            os.kill(pid, signal.SIGKILL)
