"""One round's send-and-receive, as an operator can follow and a flaky SuperLink survives.

Flower's `Grid.send_and_receive` pushes the messages, then pulls every
pending reply in one request every 3 s, silently, and the first error of
the SuperLink (a 500 while its database is locked, a restart) ends the
ServerApp. Here:

- each reply is logged as it arrives (`round 2 train: 2/3 replies, waiting
  for node 81… (partition 2)`), and every 30 s while some are missing; in
  simulation only the 30 s lines (and the warnings) are, so a round stays a
  line or two;
- replies are pulled one message id at a time, so an error while pulling
  one never drops the others that came back in the same request;
- a failing push or pull is retried with growing waits (1 s, 2 s, 4 s … up
  to 30 s); after `superlink-patience` seconds without one success (or one
  call that long without an answer) the round ends with
  `SuperLinkUnavailable`, and the ServerApp checkpoints and stops, telling
  how to resume;
- every call runs in a thread the loop watches (server_app.pull), so the
  progress line keeps coming while Flower retries inside a call, and a
  reply whose upload stops (its node stopped mid-upload) is dropped after
  `upload-stall-timeout` seconds without a new part, not after Flower's
  180 s session expiry.

A grid without `push_messages`/`pull_messages` (the in-process LocalGrid)
is served by its own `send_and_receive`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Message
from flwr.common.logger import log

from core.records import metrics_or_empty

from . import checkpoint
from .pull import SuperLinkSilent, pull_reply, watched

POLL_S = 3.0
PROGRESS_EVERY_S = 30.0
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


# Module attributes so tests can run the waits on a fake clock.
_clock = time.monotonic
_sleep = time.sleep


class SuperLinkUnavailable(RuntimeError):
    """The SuperLink kept failing for longer than the run's patience."""


# node id -> partition id, as the nodes reported it (for "waiting for node ..." lines)
_partitions: dict[int, int] = {}


def _who(node: int) -> str:
    pid = _partitions.get(node)
    return f"node {node}" + (f" (partition {pid})" if pid is not None else "")


SHOWN_WAITING = 5


def _whom(pending) -> str:
    """The nodes still awaited; a long list is cut, so a line stays one line."""
    nodes = sorted(pending)
    shown = ", ".join(_who(n) for n in nodes[:SHOWN_WAITING])
    return shown + (f" and {len(nodes) - SHOWN_WAITING} more" if len(nodes) > SHOWN_WAITING else "")


class _Retry:
    """Calls that fail are retried with growing waits until `patience` runs out."""

    def __init__(self, patience: float, what: str):
        self.patience, self.what = patience, what
        self.failing_since: float | None = None
        self.failures = 0

    def __call__(self, fn: Callable):
        while True:
            try:
                out = fn()
            except SuperLinkSilent as err:  # one call already took the whole patience
                raise SuperLinkUnavailable(f"{self.what} failed: {err}") from err
            except Exception as err:  # noqa: BLE001 - any SuperLink/transport error is retried, then reported
                now = _clock()
                self.failing_since = self.failing_since or now
                if now - self.failing_since >= self.patience:
                    raise SuperLinkUnavailable(
                        f"{self.what} failed for {now - self.failing_since:.0f} s ({self.failures + 1} tries), "
                        f"last error {type(err).__name__}: {str(err)[:200]}"
                    ) from err
                wait = BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
                self.failures += 1
                log(
                    WARNING,
                    "%s failed (%s: %s); retrying in %.0f s",
                    self.what,
                    type(err).__name__,
                    str(err)[:200],
                    wait,
                )
                _sleep(wait)
                continue
            if self.failures:
                log(INFO, "%s works again after %d failed tries", self.what, self.failures)
            self.failing_since, self.failures = None, 0
            return out


def in_simulation(grid) -> bool:
    """Flower's simulation engine hands the ServerApp an InMemoryGrid; a deployment a SuperLink's grid."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # a Flower without it: treat as a deployment, which logs more
        return False
    return isinstance(grid, InMemoryGrid)


def exchange(
    grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    label: str,
    patience: float,
    stall: float = 30.0,
    per_reply: bool = True,
) -> list[Message]:
    """Send `messages`, return the replies that came back within `timeout` seconds.

    `label` names the round in the log (e.g. "round 2 train"); `stall` bounds
    the wait for a reply whose upload has stopped. `per_reply=False` (simulation,
    where replies come within seconds) keeps only the 30 s progress lines and the warnings.
    """
    messages = list(messages)
    if not messages:
        return []
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    nodes = [m.metadata.dst_node_id for m in messages]

    def pushing(waited):
        log(INFO, "%s: pushing %d messages, the SuperLink has not answered for %.0f s", label, len(messages), waited)

    ids = _Retry(patience, f"{label}: pushing {len(messages)} messages to the SuperLink")(
        lambda: watched(
            lambda: list(grid.push_messages(messages)), every=PROGRESS_EVERY_S, note=pushing, patience=patience
        )
    )
    pending = {mid: node for mid, node in zip(ids, nodes) if mid}
    if len(pending) < len(messages):
        log(WARNING, "%s: the SuperLink took %d of %d messages", label, len(pending), len(messages))
    total = len(pending)
    if per_reply:
        log(INFO, "%s: sent to %d nodes, waiting for their replies", label, total)
    pull = _Retry(patience, f"{label}: pulling replies from the SuperLink")
    replies: list[Message] = []
    start = _clock()
    last_note = [start]

    def progress(_waited=None):
        last_note[0] = _clock()
        log(
            INFO,
            "%s: %d/%d replies after %.0f s, waiting for %s",
            label,
            len(replies),
            total,
            last_note[0] - start,
            _whom(pending.values()),
        )

    while pending:
        for mid in list(pending):
            got = pull(
                lambda: watched(
                    lambda: pull_reply(grid, mid, stall), every=PROGRESS_EVERY_S, note=progress, patience=patience
                )
            )
            if got:
                node = pending.pop(mid)
                replies.extend(got)
                _note_reply(label, got[0], node, len(replies), total, pending, per_reply)
        if not pending:
            break
        now = _clock()
        if now - start >= timeout:
            log(
                WARNING,
                "%s: %d/%d replies after the round timeout (%.0f s); going on without %s",
                label,
                len(replies),
                total,
                timeout,
                _whom(pending.values()),
            )
            break
        if now - last_note[0] >= PROGRESS_EVERY_S:
            progress()
        _sleep(min(POLL_S, max(0.0, start + timeout - now)))
    return replies


class Exchange:
    """`exchange` bound to a run: its timeout, patience, and where it can resume from."""

    def __init__(self, grid, cfg: dict, run_dir: Path):
        self.grid, self.cfg, self.run_dir = grid, cfg, Path(run_dir)
        # A line per reply helps an operator waiting on real nodes; a simulation's round line says it all.
        self.per_reply = not in_simulation(grid)

    def __call__(self, messages: Iterable[Message], label: str) -> list[Message]:
        try:
            return exchange(
                self.grid,
                messages,
                timeout=self.cfg["round-timeout"],
                label=label,
                patience=self.cfg["superlink-patience"],
                stall=self.cfg["upload-stall-timeout"],
                per_reply=self.per_reply,
            )
        except SuperLinkUnavailable as err:
            raise SuperLinkUnavailable(f"{err}. {resume_hint(self.run_dir)}") from err


def resume_hint(run_dir: Path) -> str:
    """How to go on from the run's last checkpoint, in one sentence."""
    saved = checkpoint.load(run_dir)
    if saved is None:
        return f"No round was finished, so there is nothing to resume: start the run again (outputs in {run_dir})"
    done = saved["round"]
    return (
        f"Rounds 1-{done} are checkpointed in {run_dir}; once the SuperLink is back, continue with: "
        f"flwr run . <federation> --run-config \"resume=true output-dir='{run_dir.parent}' run-name='{run_dir.name}'\""
    )


def _note_reply(label: str, reply: Message, node: int, got: int, total: int, pending: dict, show: bool) -> None:
    if reply.has_error():
        what = f"{_who(node)} failed ({reply.error.reason[:160]})"
    else:
        metrics = metrics_or_empty(reply.content)
        if "partition-id" in metrics:
            _partitions[node] = int(metrics["partition-id"])
        what = f"{_who(node)} replied"
    if not show:
        return
    waiting = ", waiting for " + _whom(pending.values()) if pending else ""
    log(INFO, "%s: %d/%d replies (%s)%s", label, got, total, what, waiting)


def duplicate_partitions(replies: Iterable[Message]) -> dict[str, list[int]]:
    """Partition ids that more than one node reported: {partition id: [node ids]}."""
    by_pid: dict[int, list[int]] = {}
    for reply in replies:
        if reply.has_error():
            continue
        metrics = metrics_or_empty(reply.content)
        if "partition-id" in metrics:
            by_pid.setdefault(int(metrics["partition-id"]), []).append(int(reply.metadata.src_node_id))
    return {str(pid): sorted(nodes) for pid, nodes in sorted(by_pid.items()) if len(nodes) > 1}


def warn_duplicates(label: str, duplicates: dict[str, list[int]]) -> None:
    for pid, nodes in duplicates.items():
        log(
            WARNING,
            "%s: nodes %s all report partition-id %s: they train on the same data. Give every "
            'SuperNode its own --node-config "partition-id=<i> num-partitions=<n>"',
            label,
            ", ".join(map(str, nodes)),
            pid,
        )
