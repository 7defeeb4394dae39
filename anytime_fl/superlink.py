"""`flower-superlink` with a SQLite lock wait that survives a loaded server.

Flower 1.42 keeps the SuperLink's state in SQLite (`--database FILE`, or in
memory) and waits at most 5 s for a lock (`PRAGMA busy_timeout`). On a busy
server the thread holding the lock can be descheduled for longer; the
waiting request then fails with `database is locked` (a 500): a SuperNode's
update is dropped, and a 500 on the run launcher's own request ends it, so
later runs stay `pending`. Started as

    python -m anytime_fl.superlink <flower-superlink arguments>

the SuperLink waits up to ANYTIME_SQLITE_BUSY_MS (default 120000 ms)
instead. Everything else is Flower's own `flower-superlink`.
"""

from __future__ import annotations

import os
import sys

DEFAULT_BUSY_MS = 120_000


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


def main() -> None:
    raw = os.environ.get("ANYTIME_SQLITE_BUSY_MS", str(DEFAULT_BUSY_MS))
    if not raw.isdigit() or int(raw) <= 0:
        sys.exit(f"ANYTIME_SQLITE_BUSY_MS must be a positive number of milliseconds, got {raw!r}")
    if not patch_lock_wait(int(raw)):
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
