"""`flower-superlink` with a SQLite lock wait that survives a loaded server.

Flower 1.42 keeps the SuperLink's state in SQLite (`--database FILE`, or in
memory) and waits at most 5 s for a lock (`PRAGMA busy_timeout`). On a busy
server the thread holding the lock can be descheduled for longer; the
waiting request then fails with `database is locked` (a 500): a SuperNode's
update is dropped, and a 500 on the run launcher's own request ends it, so
later runs stay `pending`. Started as

    python -m anytime_fl.superlink <flower-superlink arguments>

the SuperLink waits up to ANYTIME_SQLITE_BUSY_MS (default 120000 ms)
instead.

On SIGTERM Flower's HTTP server (uvicorn) waits for every open connection
to close before it stops, with no limit: a `flwr run --stream` or
`flwr log --stream` attached to a run keeps it at "Waiting for connections
to close" until the supervisor kills it. Through this wrapper it waits at
most ANYTIME_SUPERLINK_STOP_GRACE_S seconds (default 5, uvicorn's
`timeout_graceful_shutdown`), then cancels the open requests and stops as
usual. Everything else is Flower's own `flower-superlink`.
"""

from __future__ import annotations

import functools
import os
import sys

DEFAULT_BUSY_MS = 120_000
DEFAULT_STOP_GRACE_S = 5


def patch_lock_wait(ms: int) -> bool:
    """Raise the SQLite busy timeout Flower sets on each connection; False when
    this Flower release keeps its pragmas elsewhere (then nothing changes)."""
    try:
        from flwr.supercore import sql_mixin
    except ImportError:
        return False
    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not pragmas or "busy_timeout" not in dict(pragmas):
        return False
    sql_mixin.SQLITE_PRAGMAS = tuple((k, str(ms) if k == "busy_timeout" else v) for k, v in pragmas)
    return True


def patch_stop_grace(seconds: int) -> None:
    """Bound the wait for open connections when the SuperLink is asked to stop."""
    import uvicorn

    run = getattr(uvicorn.run, "__wrapped__", uvicorn.run)

    @functools.wraps(run)
    def bounded_run(*args, **kwargs):
        kwargs.setdefault("timeout_graceful_shutdown", seconds)
        return run(*args, **kwargs)

    uvicorn.run = bounded_run


def _positive_env(name: str, default: int, unit: str) -> int:
    raw = os.environ.get(name, str(default))
    if not raw.isdigit() or int(raw) <= 0:
        sys.exit(f"{name} must be a positive number of {unit}, got {raw!r}")
    return int(raw)


def main() -> None:
    busy_ms = _positive_env("ANYTIME_SQLITE_BUSY_MS", DEFAULT_BUSY_MS, "milliseconds")
    patch_stop_grace(_positive_env("ANYTIME_SUPERLINK_STOP_GRACE_S", DEFAULT_STOP_GRACE_S, "seconds"))
    if not patch_lock_wait(busy_ms):
        print(
            "anytime_fl.superlink: this Flower release has no SQLITE_PRAGMAS to adjust; "
            "starting flower-superlink unchanged",
            file=sys.stderr,
        )
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
