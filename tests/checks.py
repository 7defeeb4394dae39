"""Assertions and run configs the test modules share."""

from __future__ import annotations

# A run small enough for the fake grid: two one- and two-block nodes, one round.
TINY = {
    "task": "digits",
    "backbone-weights": "",
    "num-server-rounds": 1,
    "local-epochs": 1,
    "batch-size": 32,
    "tiers": "1,2",
    "fraction-evaluate": 0.0,
    "personalize-epochs": 0,
    "min-nodes-timeout": 5,
}


def one_line(text: str, *needles: str) -> None:
    """An error as users should see it: one line, naming each of `needles`."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], (n, lines[0])
