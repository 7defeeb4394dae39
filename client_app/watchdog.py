"""A ClientApp process that cannot outlive its SuperNode or its message.

In a deployment, Flower 1.42 runs each message in a fresh `flwr-clientapp`
process, started by the node's `flower-superexec`, itself started by
`flower-supernode`. Each watches only its direct parent's pid with
`kill(pid, 0)`, which a zombie passes (a SuperExec whose SuperNode died is
reparented to a PID 1 that may never reap it), and a finished ClientApp
that cannot hand its reply to a dead SuperNode retries forever. Such
processes were seen alive (~135 MB each) 3-13 minutes after a SuperNode or
SuperLink went away, ignoring SIGTERM.

`watch()` starts a daemon thread in the `flwr-clientapp` process (and only
there: simulations run the ClientApp inside the server's own processes)
that ends the process with `os._exit` when

- its SuperExec or the SuperNode above it is gone or a zombie, or the
  process was reparented (checked every `CHECK_S` seconds), or
- `REPLY_GRACE_S` seconds after the app's reply was built (`mod`), the
  reply still has not been handed over.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

CHECK_S = 2.0
REPLY_GRACE_S = 45.0
PROCESS = "flwr-clientapp"
# A SuperNode's command line: Flower's, or the project's wrapper (anytime_fl/supernode.py).
SUPERNODES = ("flower-supernode", "anytime_fl.supernode")
_EXIT_ORPHANED = 75  # EX_TEMPFAIL: the node's services are gone
_EXIT_STUCK = 70  # EX_SOFTWARE: the reply could not be handed over

_state: dict = {"started": False, "replied_at": None}


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of pid, None when it does not exist."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def watched_pids(pid: int | None = None) -> list[int]:
    """The processes whose end should end `pid` (default: this one): its parent, and the
    SuperNode above it when the parent is a SuperExec started by one."""
    stat = _stat(os.getpid() if pid is None else pid)
    if stat is None or stat[1] <= 1:
        return []
    parent = stat[1]
    out = [parent]
    above = _stat(parent)
    if (
        "flower-superexec" in _cmdline(parent)
        and above
        and above[1] > 1
        and any(name in _cmdline(above[1]) for name in SUPERNODES)
    ):
        out.append(above[1])
    return out


def reason_to_stop(pids: list[int], parent: int, replied_at: float | None, now: float) -> str | None:
    """Why this process should end now, or None."""
    if os.getppid() != parent:
        return f"its parent {parent} is gone (reparented to {os.getppid()})"
    for pid in pids:
        if not _alive(pid):
            return f"process {pid} ({_cmdline(pid).split(' ')[0] or 'gone'}) that started it is gone"
    if replied_at is not None and now - replied_at > REPLY_GRACE_S:
        return f"its reply was not handed to the SuperNode within {REPLY_GRACE_S:.0f} s"
    return None


def watch(force: bool = False) -> bool:
    """Start the watchdog once, in a flwr-clientapp process (or anywhere with force=True)."""
    if _state["started"] or not (force or os.path.basename(sys.argv[0]) == PROCESS):
        return False
    if not sys.platform.startswith("linux"):
        return False  # /proc is how it looks
    _state["started"] = True
    parent = os.getppid()
    pids = watched_pids()

    def loop():
        while True:
            time.sleep(CHECK_S)
            why = reason_to_stop(pids, parent, _state["replied_at"], time.monotonic())
            if why:
                print(f"anytime-fl ClientApp (pid {os.getpid()}) exits: {why}", file=sys.stderr, flush=True)
                os._exit(_EXIT_STUCK if "reply" in why else _EXIT_ORPHANED)

    threading.Thread(target=loop, name="anytime-fl-clientapp-watchdog", daemon=True).start()
    return True


def mod(msg, context, call_next):
    """Flower ClientApp mod: notes when the app's reply is ready, so a process stuck handing
    it over ends."""
    watch()
    reply = call_next(msg, context)
    _state["replied_at"] = time.monotonic()
    return reply
