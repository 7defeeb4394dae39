"""Ctrl-C for a child process, whatever the test run's own SIGINT disposition.

A test run started as a background job of a non-interactive shell inherits SIGINT ignored,
children inherit that through exec, and bash cannot trap a signal ignored at entry: a test
that sends SIGINT to scripts/simulate.sh starts it with the default disposition, as a
terminal's foreground program has."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """A `preexec_fn` for subprocess.Popen: SIGINT back to its default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
