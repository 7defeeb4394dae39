"""scripts/simulate.sh as a user drives it, against a stand-in `flwr` on PATH (seconds, no SuperLink):
presets merged with overrides, the project's own config message, the run's status as the exit
code, and Ctrl-C stopping the run on the SuperLink. tests/test_simulate_fault.py runs the real one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from tests.ctrl_c import default_sigint

pytestmark = pytest.mark.e2e  # scripts/simulate.sh in subprocesses

ROOT = Path(__file__).resolve().parents[1]

FAKE_FLWR = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE/calls"
case "$1" in
    run) while [ $# -gt 0 ]; do [ "$1" = "--run-config" ] && cp "$2" "$FAKE/merged.toml"; shift; done
         echo '{"success": true, "run-id": "42"}' ;;
    log) echo "round 1/3 | test acc per exit: 0.2"; exec sleep "${FAKE_LOG_SECONDS:-0}" ;;
    ls)  printf '{"success": true, "runs": [{"run-id": "42", "status": "%s", "status-details": "%s"}]}\n' \
             "$(cat "$FAKE/status")" "because" ;;
    stop) echo "finished:stopped" > "$FAKE/status" ;;
esac
"""


@pytest.fixture
def fake_flwr(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flwr").write_text(FAKE_FLWR)
    (bin_dir / "flwr").chmod(0o755)
    (tmp_path / "status").write_text("finished:completed")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE": str(tmp_path),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PYTHONPATH": str(ROOT),
    }
    return tmp_path, env


def simulate(env, *args, **kw):
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "simulate.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def calls(fake):
    path = fake / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_the_readme_preset_plus_override_command_runs_one_merged_file(fake_flwr):
    fake, env = fake_flwr
    readme = (ROOT / "README.md").read_text()
    # The README's offline recipe, word for word.
    assert """--run-config presets/cifar100.toml --run-config "data-dir='/data/cifar100'\"""" in readme
    done = simulate(
        {**env, "NUM_SUPERNODES": "100"},
        "--run-config",
        "presets/cifar100.toml",
        "--run-config",
        "data-dir='/data/cifar100'",
    )
    assert done.returncode == 0, done.stderr
    merged = parse_config_args([str(fake / "merged.toml")])
    assert merged["task"] == "cifar100" and merged["data-dir"] == "/data/cifar100" and merged["pretrained"] is True
    assert merged["output-dir"] == str(ROOT / "outputs")
    run = calls(fake)[0]
    assert run.startswith("run . ") and "num-supernodes=100" in run and run.count("--run-config") == 1


def test_a_config_mistake_gets_the_projects_message_and_flower_is_not_called(fake_flwr):
    fake, env = fake_flwr
    done = simulate(env, "--run-config", "num-server-round=3")
    assert done.returncode == 2
    assert "did you mean 'num-server-rounds'" in done.stderr
    assert calls(fake) == []


def test_min_nodes_beyond_the_federation_is_refused_before_flower_starts(fake_flwr):
    fake, env = fake_flwr
    done = simulate({**env, "NUM_SUPERNODES": "4"}, "--run-config", "min-nodes=10")
    assert done.returncode == 2
    assert "run config 'min-nodes': is 10 but the federation has 4 nodes" in done.stderr
    assert calls(fake) == []


def test_a_failed_run_exits_non_zero_naming_it(fake_flwr):
    fake, env = fake_flwr
    (fake / "status").write_text("finished:failed")
    done = simulate(env, "--run-config", "num-server-rounds=3")
    assert done.returncode == 1
    assert "run 42 did not complete: finished:failed | because" in done.stderr


def test_ctrl_c_stops_the_run_on_the_superlink(fake_flwr):
    fake, env = fake_flwr
    # As in a test run started as a background job of a non-interactive shell: SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "simulate.sh")],
            env={**env, "FAKE_LOG_SECONDS": "60"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=default_sigint,  # Ctrl-C works even if this test run ignores SIGINT
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 60
    while not any(c.startswith("log 42") for c in calls(fake)) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stop 42" in calls(fake)
    assert "run 42 stopped" in err
    # the hint names the run's folder, which the script chose and passed on
    name = parse_config_args([str(fake / "merged.toml")])["run-name"]
    assert re.fullmatch(r"\d{8}-\d{6}", name), name
    assert f"bash scripts/simulate.sh --run-config \"resume=true run-name='{name}'\"" in err, err
