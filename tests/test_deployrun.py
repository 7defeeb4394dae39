"""`anytime-fl deploy-run` against a fake `flwr`: resubmits with resume=true after a SuperLink
restart, stops on the app's own errors, and always names the command that continues the run."""

from __future__ import annotations

import fcntl
import json
import sys
from pathlib import Path

import pytest

from anytime_fl import deployrun

# A stand-in for the `flwr` CLI: every `flwr run` takes the next scripted outcome from
# state.json; `flwr ls` answers it (None = SuperLink unreachable); calls are logged.
FAKE = r"""
import fcntl, json, os, sys
from pathlib import Path
state_path = Path(__file__).with_name("state.json")
lock = open(state_path.with_suffix(".lock"), "w")
fcntl.flock(lock, fcntl.LOCK_EX)  # `flwr log` runs beside `flwr ls`
state = json.loads(state_path.read_text())
args = sys.argv[1:]
state["calls"].append(args)
out = None
if args[0] == "run":
    if state["outcomes"] and state["outcomes"][0] == "down":
        state["outcomes"].pop(0)
    else:
        state["runs"].append(state["outcomes"].pop(0))
        out = {"success": True, "run-id": str(len(state["runs"]))}
elif args[0] == "ls":
    status, details = state["runs"][int(args[args.index("--run-id") + 1]) - 1]
    out = {"success": True, "runs": [{"status": status, "status-details": details}]}
# atomically: deploy-run may end a `flwr log` follower mid-write
tmp = state_path.with_name(f"state.{os.getpid()}.tmp")
tmp.write_text(json.dumps(state))
os.replace(tmp, state_path)
if out is None and args[0] != "log":
    sys.exit(1)
if out is not None:
    print(json.dumps(out))
"""

RESTARTED = ("finished:failed", "Task failed with unknown error.")
DONE = ("finished:completed", "")


@pytest.fixture
def fake_flwr(tmp_path):
    script = tmp_path / "flwr.py"
    script.write_text(FAKE)
    exe = tmp_path / "flwr"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    exe.chmod(0o755)

    def run(outcomes, *extra):
        (tmp_path / "state.json").write_text(json.dumps({"outcomes": outcomes, "runs": [], "calls": []}))
        argv = [".", "prod", "--poll", "0.01", "--superlink-wait", "10", "--flwr", str(exe), *extra]
        code = deployrun.main(argv)
        # a `flwr log` follower may still be writing the state as deploy-run ends it
        with open(tmp_path / "state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return code, json.loads((tmp_path / "state.json").read_text())["calls"]

    return run


def _run_configs(calls):
    return [c[c.index("--run-config") + 1] for c in calls if c[0] == "run"]


def test_a_run_failed_by_a_superlink_restart_is_resumed_under_its_name(fake_flwr, capsys):
    code, calls = fake_flwr(
        [RESTARTED, "down", ("finished:failed", "No heartbeat received from the task"), DONE],
        "--run-config",
        "num-server-rounds=5 output-dir='/srv/out'",
    )
    assert code == 0
    configs = _run_configs(calls)
    assert len(configs) == 4  # 3 runs; the second submission was retried while the SuperLink was down
    assert configs[1] == configs[2]
    name = deployrun.run_config_value(configs[0], "run-name")
    assert name.startswith("deploy-") and "resume" not in configs[0]
    assert all(deployrun.run_config_value(c, "run-name") == name for c in configs)
    assert all(deployrun.run_config_value(c, "resume") is True for c in configs[1:])
    assert all(deployrun.run_config_value(c, "output-dir") == "/srv/out" for c in configs)
    out = capsys.readouterr().out
    assert f"run name '{name}'" in out and "resume=true" in out.splitlines()[0]
    assert ["log", "1", "prod", "--stream"] in calls


def test_the_apps_own_failure_is_final_and_names_the_continue_command(fake_flwr, capsys):
    bad = ("finished:failed", "ServerApp failed with exception: anytime-fl stopped: lr: must be > 0")
    code, calls = fake_flwr([bad], "--run-config", "run-name='fm' lr=-1")
    assert code == 1 and len(_run_configs(calls)) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "lr: must be > 0" in last
    assert last.endswith(
        "Continue with: anytime-fl deploy-run . prod --run-config 'run-name='\"'\"'fm'\"'\"' lr=-1 resume=true'"
    )


def test_a_superlink_failure_reported_by_the_app_is_resumed(fake_flwr):
    gone = (
        "finished:failed",
        "ServerApp failed with exception: anytime-fl stopped: round 3 train: pulling replies from the SuperLink "
        "failed for 301 s (14 tries)",
    )
    code, calls = fake_flwr([gone, DONE], "--run-config", "run-name='fm'")
    assert code == 0 and len(_run_configs(calls)) == 2


def test_a_resume_before_the_first_checkpoint_starts_the_run_afresh(fake_flwr):
    none_yet = (
        "finished:failed",
        "ServerApp failed with exception: anytime-fl stopped: resume: no checkpoint to resume from under /o/fm",
    )
    code, calls = fake_flwr([RESTARTED, none_yet, DONE], "--run-config", "run-name='fm'")
    assert code == 0
    configs = _run_configs(calls)
    assert [deployrun.run_config_value(c, "resume") for c in configs] == [None, True, None]


def test_a_superlink_that_stays_away_ends_with_the_continue_command(fake_flwr, capsys):
    code, _ = fake_flwr(["down"] * 100, "--run-config", "run-name='fm'")
    assert code == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "unreachable" in last and "Continue with: anytime-fl deploy-run" in last


def test_resumes_are_bounded(fake_flwr):
    code, calls = fake_flwr([RESTARTED] * 10, "--run-config", "run-name='fm'", "--max-resumes", "2")
    assert code == 1 and len(_run_configs(calls)) == 3


def test_deploy_run_is_an_anytime_fl_command():
    from anytime_fl.cli import COMMANDS

    assert COMMANDS["deploy-run"][0] == "anytime_fl.deployrun"
    assert Path(deployrun.__file__).is_file()
