"""`anytime-fl deploy-run`: `flwr run` on a deployment, resumed by itself after a SuperLink restart.

Flower 1.42 cannot carry a run across a SuperLink restart: the SuperLink's
run launcher (SuperExec) and the ServerApp it started watch their parent
and stop with it ("Task stopped by user."), and the restarted SuperLink
lists the run as `finished:failed`. The run's rounds are checkpointed on
the server, so the run goes on where it stopped when it is submitted again
with `resume=true` and its `run-name`. This command does that:

    anytime-fl deploy-run . my-deployment --run-config "num-server-rounds=15 output-dir='/srv/out'"

1. gives the run a `run-name` when the run config has none, and prints it
   with the command that resumes it by hand;
2. submits it (`flwr run ... --format json`), follows its log
   (`flwr log --stream`) and asks for its status (`flwr ls --run-id`)
   every `--poll` seconds;
3. when the run ends `finished:failed` for a reason that is not the app's
   own (a SuperLink that went away; the app's configuration or data errors
   are final), submits it again with `resume=true`, at most
   `--max-resumes` times; a resume with no checkpoint yet starts the run
   afresh under the same name;
4. exits 0 when the run completed, 1 otherwise, then with one line naming
   the command that continues it, also when the SuperLink stays unreachable
   for `--superlink-wait` seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time

COMPLETED = "finished:completed"
APP_FAILED = "ServerApp failed with exception"
# An app failure that is the SuperLink's, not the app's (server_app.exchange.SuperLinkUnavailable).
SUPERLINK_FAILED = ("the SuperLink failed", "no answer from the SuperLink")
NO_CHECKPOINT = "no checkpoint to resume from"
LOG_TAIL_S = 10.0


def _parse(argv):
    p = argparse.ArgumentParser(prog="anytime-fl deploy-run", description=__doc__.split("\n\n")[0])
    p.add_argument("app", help="the app's folder (the repository), as for `flwr run`")
    p.add_argument("federation", help="the SuperLink connection's name in $FLWR_HOME/config.toml")
    p.add_argument("--run-config", default="", help="run-config overrides, as for `flwr run --run-config`")
    p.add_argument("--max-resumes", type=int, default=5, help="resubmissions after failures (default 5)")
    p.add_argument(
        "--superlink-wait",
        type=float,
        default=600.0,
        help="seconds the SuperLink may stay unreachable before this gives up (default 600)",
    )
    p.add_argument("--poll", type=float, default=10.0, help="seconds between status checks (default 10)")
    p.add_argument("--flwr", default=None, help=argparse.SUPPRESS)  # tests use a fake `flwr`
    args = p.parse_args(argv)
    for name in ("max_resumes", "superlink_wait", "poll"):
        if getattr(args, name) < 0 or (name == "poll" and args.poll <= 0):
            p.error(f"--{name.replace('_', '-')} must be {'positive' if name == 'poll' else '>= 0'}")
    return args


def run_config_value(overrides: str, key: str):
    """`key`'s value in a --run-config string, None when absent (Flower's own parser)."""
    from flwr.common.config import parse_config_args

    return parse_config_args([overrides]).get(key) if overrides.strip() else None


class Supervisor:
    def __init__(self, args):
        self.args = args
        self.flwr = args.flwr or shutil.which("flwr") or "flwr"
        self.overrides = args.run_config.strip()
        name = run_config_value(self.overrides, "run-name")
        if not name:
            name = time.strftime("deploy-%Y%m%d-%H%M%S")
            self.overrides = f"{self.overrides} run-name='{name}'".strip()
        self.run_name = name
        self.resume = bool(run_config_value(self.overrides, "resume"))
        self.base = " ".join(f"{k}={v}" for k, v in _pairs(self.overrides) if k != "resume")

    def say(self, text: str) -> None:
        print(f"anytime-fl deploy-run: {text}", flush=True)

    def continue_command(self) -> str:
        return (
            f"anytime-fl deploy-run {shlex.quote(self.args.app)} {shlex.quote(self.args.federation)} "
            f"--run-config {shlex.quote(self.base + ' resume=true')}"
        )

    def _flwr(self, *cmd: str, timeout: float = 120) -> dict | None:
        """A `flwr` command's JSON answer, None when the SuperLink could not be reached."""
        try:
            out = subprocess.run([self.flwr, *cmd, "--format", "json"], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        try:
            data = json.loads(out.stdout[out.stdout.find("{") :])
        except ValueError:
            return None
        return data if data.get("success") else None

    def _until_reachable(self, what: str, call):
        start = time.monotonic()
        while True:
            value = call()
            if value is not None:
                return value
            if time.monotonic() - start >= self.args.superlink_wait:
                return None
            self.say(f"{what}: the SuperLink does not answer; asking again in {self.args.poll:.0f} s")
            time.sleep(self.args.poll)

    def submit(self) -> str | None:
        config = self.base + (" resume=true" if self.resume else "")
        answer = self._until_reachable(
            "submitting",
            lambda: self._flwr("run", self.args.app, self.args.federation, "--run-config", config),
        )
        return None if answer is None else str(answer["run-id"])

    def status(self, run_id: str) -> tuple[str, str] | None:
        answer = self._flwr("ls", self.args.federation, "--run-id", run_id, timeout=60)
        if answer is None or not answer.get("runs"):
            return None
        run = answer["runs"][0]
        return run["status"], run.get("status-details", "")

    def follow(self, run_id: str) -> tuple[str, str] | None:
        """Stream the run's log until it ends; its final (status, details), None if the SuperLink stayed away."""
        stream = subprocess.Popen(
            [self.flwr, "log", run_id, self.args.federation, "--stream"], stdin=subprocess.DEVNULL
        )
        try:
            while True:
                state = self._until_reachable(f"run {run_id}", lambda: self.status(run_id))
                if state is None or state[0].startswith("finished"):
                    break
                time.sleep(self.args.poll)
            # `flwr log --stream` ends by itself once the run has ended: let it print the run's last
            # lines rather than cut them off (and stop it below only if it does not).
            try:
                stream.wait(timeout=LOG_TAIL_S if state is not None else 0)
            except subprocess.TimeoutExpired:
                pass
            return state
        finally:
            if stream.poll() is None:
                stream.terminate()
                try:
                    stream.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    stream.kill()
                    stream.wait()

    def __call__(self) -> int:
        self.say(
            f"run name '{self.run_name}'; if this command is stopped, continue the run with: {self.continue_command()}"
        )
        resumes = 0
        while True:
            run_id = self.submit()
            if run_id is None:
                return self.give_up(f"the SuperLink was unreachable for {self.args.superlink_wait:.0f} s")
            self.say(f"run {run_id} submitted ({'resuming' if self.resume else 'starting'} '{self.run_name}')")
            state = self.follow(run_id)
            if state is None:
                return self.give_up(f"the SuperLink was unreachable for {self.args.superlink_wait:.0f} s")
            status, details = state
            if status == COMPLETED:
                self.say(f"run {run_id} completed ('{self.run_name}')")
                return 0
            if not status.endswith(":failed"):
                return self.give_up(f"run {run_id} ended {status} {details}".strip())
            if NO_CHECKPOINT in details and self.resume:
                self.say(f"run {run_id}: no round was checkpointed yet; starting '{self.run_name}' afresh")
                self.resume = False
                continue
            if details.startswith(APP_FAILED) and not any(s in details for s in SUPERLINK_FAILED):
                return self.give_up(f"run {run_id} failed: {details}")
            if resumes >= self.args.max_resumes:
                return self.give_up(f"run {run_id} failed ({details}) after {resumes} resumes")
            resumes += 1
            self.resume = True
            self.say(f"run {run_id} failed ({details}); resuming '{self.run_name}' ({resumes}/{self.args.max_resumes})")

    def give_up(self, why: str) -> int:
        self.say(f"stopped: {why}. Continue with: {self.continue_command()}")
        return 1


def _pairs(overrides: str) -> list[tuple[str, str]]:
    """The key=value pairs of a --run-config string, values as written (Flower's own pattern)."""
    import re

    return re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        return Supervisor(args)()
    except ValueError as err:  # a --run-config Flower cannot parse
        print(f"anytime-fl deploy-run: --run-config: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
