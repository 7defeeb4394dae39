"""A round or head fit in which the server accepted no node's reply stops the run.

Going on would write a round that trained nothing (or heads fitted on nothing) and end with
exit 0, each node's reply dropped with a warning in a long log: instead the run stops with one
line saying why the replies were dropped.
"""

from __future__ import annotations

from collections import Counter

SHOWN_REASONS = 3


class NothingAccepted(RuntimeError):
    """No reply of a round (or head fit) was accepted; the message says why."""


def nothing_accepted(label: str, replies: int, reasons: list[str], timeout: float) -> NothingAccepted:
    """The error for `label` (e.g. "round 2 train") whose `replies` replies were dropped for `reasons`."""
    if not replies:
        return NothingAccepted(
            f"{label}: no node replied within round-timeout={timeout:g}s, so nothing was learnt; "
            "check that the SuperNodes run, or raise round-timeout"
        )
    counts = Counter(_first_line(r) for r in reasons)
    shown = "; ".join(f"{n}x {r}" if n > 1 else r for r, n in counts.most_common(SHOWN_REASONS))
    more = f"; and {len(counts) - SHOWN_REASONS} other reasons" if len(counts) > SHOWN_REASONS else ""
    return NothingAccepted(f"{label}: all {replies} replies were dropped, so nothing was learnt: {shown}{more}")


def _first_line(reason: str, limit: int = 160) -> str:
    """The line of a reason that says what went wrong: a traceback's last one, else the first."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()] or [""]
    line = lines[-1] if "Traceback" in lines[0] else lines[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."
